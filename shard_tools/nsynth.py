"""Recipe ``nsynth``: NSynth, 305,979 four-second notes of 1,006 instruments (Engel et al. 2017).

Layout under ``--root`` (the three archives from magenta.tensorflow.org/datasets/nsynth, unpacked
side by side; any subset of the splits may be present)::

    nsynth-train/examples.json          {"<note_str>": {...}, ...}
    nsynth-train/audio/<note_str>.wav   16 kHz mono 16-bit, 4 s (64,000 frames)
    nsynth-valid/examples.json, nsynth-valid/audio/*.wav
    nsynth-test/examples.json,  nsynth-test/audio/*.wav

Each ``examples.json`` entry holds ``note_str`` (e.g. ``guitar_acoustic_010-060-100``, which is
also the wav's name), ``pitch`` (MIDI 9..120), ``velocity`` (25, 50, 75, 100, 127), ``instrument``
(a global int id), ``instrument_str``, ``instrument_family`` (0..10) and ``instrument_family_str``,
``instrument_source`` (0..2) and ``instrument_source_str``, ``qualities`` (ten 0/1 ints) and
``qualities_str`` (the names of the qualities set), ``sample_rate``. Splits are NSynth's own:
``nsynth-train`` -> ``train``, ``nsynth-valid`` -> ``valid``, ``nsynth-test`` -> ``test``; the
instruments of valid/test do not occur in train.

Sample labels (raw values, see docs/architecture.md): ``pitch``, ``velocity``, ``instrument``,
``instrument_str``, ``instrument_family``, ``instrument_family_str``, ``instrument_source``,
``instrument_source_str`` and ``qualities`` (a list of quality names). Manifest label specs:
``pitch`` (class; names = every MIDI number from the lowest to the highest pitch of the notes
written, or ``--pitch-range`` when given), ``velocity`` (class; the velocities present),
``instrument_family_str`` (class; NSynth's 11 families in NSynth's index order),
``instrument_source_str`` (class; acoustic, electronic, synthetic) and ``qualities`` (multi_hot;
NSynth's 10 quality names in index order).

A note listed in ``examples.json`` whose wav is missing or empty, or whose entry lacks a field, is
reported as skipped; wav files that ``examples.json`` does not list are ignored (they have no
labels). ``--pitch-range 21-108`` keeps only notes in that MIDI range (the piano range often used
for pitch probes); the notes left out are counted in the printed summary, not as skipped files.

    shard-tools build nsynth --root /data/nsynth --out shards/nsynth --mono
"""

from __future__ import annotations

import argparse
import json

from shard_tools.layout import Root, read_text, require_file
from shard_tools.recipe import Item, Recipe, Skip, make_key

DATASET = "nsynth"
SPLITS = {"train": "nsynth-train", "valid": "nsynth-valid", "test": "nsynth-test"}

# NSynth's vocabularies, in NSynth's own index order (instrument_family, instrument_source,
# qualities), so that an index in the manifest equals NSynth's integer label.
FAMILIES = ["bass", "brass", "flute", "guitar", "keyboard", "mallet", "organ", "reed", "string",
            "synth_lead", "vocal"]
SOURCES = ["acoustic", "electronic", "synthetic"]
QUALITIES = ["bright", "dark", "distortion", "fast_decay", "long_release", "multiphonic",
             "nonlinear_env", "percussive", "reverb", "tempo-synced"]

_INT_FIELDS = ("pitch", "velocity", "instrument", "instrument_family", "instrument_source")
_STR_FIELDS = ("instrument_str", "instrument_family_str", "instrument_source_str")


def parse_pitch_range(text: str) -> tuple[int, int]:
    """``"21-108"`` -> ``(21, 108)`` (inclusive MIDI numbers)."""
    try:
        lo, hi = (int(x) for x in text.split("-", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pitch-range: {text!r} is not LO-HI, e.g. 21-108") from None
    if not 0 <= lo <= hi <= 127:
        raise argparse.ArgumentTypeError(f"--pitch-range: need 0 <= LO <= HI <= 127, got {text!r}")
    return lo, hi


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("nsynth recipe")
    g.add_argument("--splits", default=None, metavar="LIST",
                   help="comma-separated splits to build, from train,valid,test (default: every "
                        "nsynth-<split>/ folder present under --root)")
    g.add_argument("--pitch-range", type=parse_pitch_range, default=None, metavar="LO-HI",
                   help="keep only notes with LO <= pitch <= HI (MIDI), e.g. 21-108 (default: all)")


def _labels_of(entry: dict) -> dict:
    """The sample labels of one examples.json entry; raises KeyError/ValueError when malformed."""
    labels: dict = {}
    for k in _INT_FIELDS:
        labels[k] = int(entry[k])
    for k in _STR_FIELDS:
        labels[k] = str(entry[k])
    if "qualities_str" in entry:
        qualities = [str(q) for q in entry["qualities_str"]]
    else:
        flags = [int(q) for q in entry["qualities"]]
        if len(flags) != len(QUALITIES):
            raise ValueError(f"qualities has {len(flags)} flags, expected {len(QUALITIES)}")
        qualities = [name for name, on in zip(QUALITIES, flags) if on]
    labels["qualities"] = qualities
    return labels


def _wanted_splits(root: Root, text: str | None) -> list[str]:
    if text:
        names = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in names if s not in SPLITS]
        if bad:
            raise ValueError(f"--splits: unknown split(s) {bad}; choose from {', '.join(SPLITS)}")
        for s in names:
            require_file(root.path(f"{SPLITS[s]}/examples.json"),
                         f"NSynth's {SPLITS[s]}/examples.json (unpack {SPLITS[s]}.jsonwav.tar.gz into --root)")
        return names
    present = [s for s, d in SPLITS.items() if root.is_file(f"{d}/examples.json")]
    if not present:
        raise FileNotFoundError(
            f"{root.path('nsynth-train/examples.json')}: file not found; expected NSynth's layout "
            f"under --root {root.url}: nsynth-{{train,valid,test}}/examples.json + audio/<note_str>.wav "
            f"(unpack the nsynth-*.jsonwav.tar.gz archives there)")
    return present


def prepare(root: str, args: argparse.Namespace) -> Recipe:
    """Read ``examples.json`` of each split present and list one item per note."""
    tree = Root(root)
    pitch_range = getattr(args, "pitch_range", None)
    items: list[Item] = []
    skipped: list[Skip] = []
    left_out = 0
    pitches: set[int] = set()
    velocities: set[int] = set()
    for split in _wanted_splits(tree, getattr(args, "splits", None)):
        meta_path = tree.path(f"{SPLITS[split]}/examples.json")
        try:
            examples = json.loads(read_text(meta_path))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{meta_path}: not readable JSON ({exc}); re-extract it from the NSynth archive") from exc
        if not isinstance(examples, dict):
            raise ValueError(f"{meta_path}: expected a JSON object mapping note_str to its attributes")
        for note_str in sorted(examples):
            entry = examples[note_str]
            rel = f"{SPLITS[split]}/audio/{note_str}.wav"
            wav = tree.path(rel)
            try:
                if not isinstance(entry, dict):
                    raise ValueError("entry is not an object")
                labels = _labels_of(entry)
            except (KeyError, ValueError, TypeError) as exc:
                missing = f"lacks field {exc}" if isinstance(exc, KeyError) else str(exc)
                skipped.append(Skip(wav, f"bad label entry: {meta_path} entry {note_str!r} {missing}"))
                continue
            if pitch_range and not pitch_range[0] <= labels["pitch"] <= pitch_range[1]:
                left_out += 1
                continue
            if not tree.usable(rel, skipped):
                continue
            pitches.add(labels["pitch"])
            velocities.add(labels["velocity"])
            items.append(Item(path=wav, source=rel, split=split, id=note_str,
                              key=make_key(DATASET, note_str), labels=labels))
    if left_out:
        lo, hi = pitch_range
        print(f"[nsynth] --pitch-range {lo}-{hi}: left out {left_out} notes outside the range")
    if pitch_range:
        pitch_names = list(range(pitch_range[0], pitch_range[1] + 1))
    else:
        pitch_names = list(range(min(pitches), max(pitches) + 1)) if pitches else []
    labels_spec = {
        "pitch": {"kind": "class", "names": pitch_names},
        "velocity": {"kind": "class", "names": sorted(velocities)},
        "instrument_family_str": {"kind": "class", "names": list(FAMILIES)},
        "instrument_source_str": {"kind": "class", "names": list(SOURCES)},
        "qualities": {"kind": "multi_hot", "names": list(QUALITIES)},
    }
    return Recipe(dataset=DATASET, items=items, skipped=skipped, labels=labels_spec, root=tree.url,
                  files_in=len(items) + len(skipped))

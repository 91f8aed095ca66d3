"""Recipe ``musicnet``: MusicNet, 330 classical recordings (34 h, 44.1 kHz) with aligned notes.

Layout under ``--root`` (``musicnet.tar.gz`` from zenodo.org/record/5120004 unpacked, plus
``musicnet_metadata.csv`` beside the folders)::

    musicnet_metadata.csv   id,composer,composition,movement,ensemble,source,transcriber,catalog_name,seconds
    train_data/<id>.wav     320 recordings, 44.1 kHz
    train_labels/<id>.csv   start_time,end_time,instrument,note,start_beat,end_beat,note_value
    test_data/<id>.wav      10 recordings
    test_labels/<id>.csv

In the label csvs ``start_time`` and ``end_time`` are sample indices at 44.1 kHz (the rate of the
original recordings; e.g. ``9182,90078,43,53,4.0,1.5,Dotted Quarter``), not seconds; ``--label-rate``
changes 44100 if your labels were made for another rate. ``instrument`` is MusicNet's General MIDI
program number, 1-based (1 piano, 7 harpsichord, 41 violin, 42 viola, 43 cello, 44 contrabass,
61 horn, 69 oboe, 71 bassoon, 72 clarinet, 74 flute); ``note`` is the MIDI note number.

Segments: each recording is cut into ``--segment`` second windows every ``--hop`` seconds
(default 20 and 10, as in the wav2vec 2.0 music paper). Windows start at 0, hop, 2*hop, ... and
only whole windows are kept, so at most ``hop`` seconds at the end of a recording go unused; a
recording shorter than one window gives one sample of its whole length. The length comes from the
wav header (``soundfile.info``). A segment's ``labels``: ``instruments`` and ``notes`` (sorted
distinct values of every note sounding in it, i.e. with ``start < segment end`` and
``end > segment start``), ``composer`` and ``ensemble`` from the metadata (null when the
recording is not in it); ``segment`` holds its [start, end] seconds in the recording.

Splits: MusicNet's test recordings -> ``test``. ``--valid-every N`` (default 10) moves whole train
recordings to ``valid``: with the train ids sorted numerically, the ones at positions N-1, 2N-1,
... (every Nth, about 1/N of them); 0 keeps all in train. Whole recordings move, so no audio is
shared between train and valid.

Reported as skipped: a wav that is empty or whose header cannot be read, a wav without its label
csv, a label csv without its wav, and a label csv that cannot be parsed.

    shard-tools build musicnet --root /data/musicnet --out shards/musicnet --mono --sample-rate 16000
"""

from __future__ import annotations

import argparse
import csv
import io

import soundfile as sf

from shard_tools.layout import Root, read_header_table, read_text, require_file
from shard_tools.recipe import Item, Recipe, Skip, make_key

DATASET = "musicnet"
METADATA = "musicnet_metadata.csv"
PARTS = {"train": ("train_data", "train_labels"), "test": ("test_data", "test_labels")}
# The instruments of MusicNet (1-based GM programs); kept in the vocabulary even when a build
# does not contain all of them, so that vocabularies agree between builds.
INSTRUMENTS = [1, 7, 41, 42, 43, 44, 61, 69, 71, 72, 74]
LABEL_COLUMNS = ("start_time", "end_time", "instrument", "note")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("musicnet recipe")
    g.add_argument("--segment", type=float, default=20.0, help="segment length in seconds (default: 20)")
    g.add_argument("--hop", type=float, default=10.0, help="seconds between segment starts (default: 10)")
    g.add_argument("--valid-every", type=int, default=10, metavar="N",
                   help="every Nth train recording (sorted by id) goes to valid; 0: no valid split (default: 10)")
    g.add_argument("--label-rate", type=int, default=44100,
                   help="sample rate the label csv times are counted in (default: 44100)")


def segment_starts(duration: float, segment: float, hop: float) -> list[tuple[float, float]]:
    """Whole ``segment``-second windows every ``hop`` seconds; one window of the whole file if shorter."""
    if duration <= segment:
        return [(0.0, duration)]
    out = []
    k = 0
    # the small tolerance keeps a window that ends exactly at the file's end despite float rounding
    while k * hop + segment <= duration + 1e-9:
        out.append((round(k * hop, 6), round(k * hop + segment, 6)))
        k += 1
    return out


def read_notes(path: str, label_rate: int) -> list[tuple[float, float, int, int]]:
    """A label csv -> ``(start_s, end_s, instrument, note)`` per row; ValueError when malformed."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    missing = [c for c in LABEL_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"no column(s) {missing} (header: {reader.fieldnames})")
    notes = []
    for row in reader:
        try:
            start, end = float(row["start_time"]) / label_rate, float(row["end_time"]) / label_rate
            notes.append((start, end, int(row["instrument"]), int(row["note"])))
        except (TypeError, ValueError):
            raise ValueError(f"line {reader.line_num}: start_time/end_time/instrument/note not numbers") from None
    return notes


def sounding(notes: list[tuple[float, float, int, int]], start: float, end: float) -> tuple[list[int], list[int]]:
    """Sorted distinct instruments and notes of the notes overlapping ``[start, end)``."""
    inst, pitch = set(), set()
    for s, e, i, n in notes:
        if s < end and e > start:
            inst.add(i)
            pitch.add(n)
    return sorted(inst), sorted(pitch)


def read_metadata(path: str) -> dict[str, dict[str, str]]:
    header, rows = read_header_table(path, delimiter=",", expected="id,composer,...,seconds")
    if "id" not in header:
        raise ValueError(f"{path}: no 'id' column (header: {header}); is this musicnet_metadata.csv?")
    col = header.index("id")
    return {r[col]: dict(zip(header, r)) for _, r in rows if len(r) > col}


def _valid_ids(train_ids: list[str], every: int) -> set[str]:
    if every <= 0:
        return set()
    ordered = sorted(train_ids, key=lambda s: (int(s) if s.isdigit() else float("inf"), s))
    return set(ordered[every - 1::every])


def prepare(root: str, args: argparse.Namespace) -> Recipe:
    tree = Root(root)
    segment = float(getattr(args, "segment", 20.0))
    hop = float(getattr(args, "hop", 10.0))
    every = int(getattr(args, "valid_every", 10))
    label_rate = int(getattr(args, "label_rate", 44100))
    if segment <= 0 or hop <= 0:
        raise ValueError(f"--segment and --hop must be positive, got {segment} and {hop}")
    if every < 0:
        raise ValueError(f"--valid-every must be >= 0, got {every}")
    if not any(tree.is_dir(d) for d, _ in PARTS.values()):
        raise FileNotFoundError(f"{tree.path('train_data')}: folder not found; expected MusicNet's layout "
                                f"under --root {tree.url}: train_data/, train_labels/, test_data/, test_labels/, {METADATA}")
    meta = read_metadata(require_file(tree.path(METADATA),
                                      f"MusicNet's {METADATA} (id,composer,...,seconds) in --root"))

    items: list[Item] = []
    skipped: list[Skip] = []
    composers: set[str] = set()
    ensembles: set[str] = set()
    notes_seen: set[int] = set()
    inst_seen: set[int] = set()
    for part, (data_dir, label_dir) in PARTS.items():
        wavs = {n[:-4] for n in tree.listdir(data_dir) if n.lower().endswith(".wav")}
        csvs = {n[:-4] for n in tree.listdir(label_dir) if n.lower().endswith(".csv")}
        for rid in sorted(csvs - wavs):
            skipped.append(Skip(tree.path(f"{data_dir}/{rid}.wav"),
                                f"missing file: {label_dir}/{rid}.csv has no {data_dir}/{rid}.wav"))
        valid = _valid_ids(sorted(wavs & csvs), every) if part == "train" else set()
        for rid in sorted(wavs):
            rel = f"{data_dir}/{rid}.wav"
            wav = tree.path(rel)
            if rid not in csvs:
                skipped.append(Skip(wav, f"no labels: {label_dir}/{rid}.csv not found"))
                continue
            if not tree.usable(rel, skipped):
                continue
            try:
                with tree.open(rel) as f:  # the header only: the frame count
                    info = sf.info(f)
                duration = info.frames / info.samplerate
            except Exception as exc:  # LibsndfileError / RuntimeError on a damaged header
                skipped.append(Skip(wav, f"not decodable audio: header unreadable ({exc})"))
                continue
            if duration <= 0:
                skipped.append(Skip(wav, "no audio frames: the header declares 0 frames"))
                continue
            try:
                notes = read_notes(tree.path(f"{label_dir}/{rid}.csv"), label_rate)
            except (OSError, ValueError) as exc:
                skipped.append(Skip(wav, f"bad label file: {label_dir}/{rid}.csv {exc}"))
                continue
            m = meta.get(rid, {})
            composer, ensemble = m.get("composer") or None, m.get("ensemble") or None
            composers.update([composer] if composer else [])
            ensembles.update([ensemble] if ensemble else [])
            split = "valid" if rid in valid else part
            for start, end in segment_starts(duration, segment, hop):
                inst, pitch = sounding(notes, start, end)
                inst_seen.update(inst)
                notes_seen.update(pitch)
                items.append(Item(path=wav, source=rel, split=split, id=rid,
                                  key=make_key(DATASET, rid, f"{int(round(start * 1000)):09d}"),
                                  labels={"instruments": inst, "notes": pitch, "composer": composer,
                                          "ensemble": ensemble},
                                  segment=(start, end)))
    lo = min([21, *notes_seen])
    hi = max([108, *notes_seen])
    labels_spec = {
        "instruments": {"kind": "multi_hot", "names": sorted(set(INSTRUMENTS) | inst_seen)},
        "notes": {"kind": "multi_hot", "names": list(range(lo, hi + 1))},
        "composer": {"kind": "class", "names": sorted(composers)},
        "ensemble": {"kind": "class", "names": sorted(ensembles)},
    }
    return Recipe(dataset=DATASET, items=items, skipped=skipped, labels=labels_spec, root=tree.url,
                  files_in=len({it.path for it in items}) + len(skipped))

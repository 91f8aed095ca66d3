"""``shard-tools demo``: render a small real-instrument dataset (no download) and shard it.

Renders notes and short multi-instrument pieces with the General MIDI soundfont that pretty_midi
ships (``TimGM6mb.sf2``) through midirenderer, writes them in the on-disk layouts of two real
datasets, then shards both through the real recipes, exactly as if they had been downloaded:

- ``WORKDIR/nsynth/``: NSynth's layout (``nsynth-{train,valid,test}/examples.json`` with NSynth's
  field names + ``audio/<note_str>.wav``, 16 kHz mono, 4 s: note on at 0 s, off at 3 s, 1 s of
  release, as in NSynth). Instruments are GM programs grouped into NSynth's 11 families
  (:data:`PROGRAMS`); each program plays ``--notes-per-instrument`` distinct (pitch, velocity)
  pairs drawn from its family's pitch range and NSynth's five velocities. As in NSynth, the valid
  and test instruments never occur in train: in each family the last program of the list below is
  test, the one before it valid, the rest train. Sharded with ``shard-tools build nsynth`` into
  ``OUT/nsynth/``.
- ``WORKDIR/mtat/``: MagnaTagATune's layout (folders ``0``-``f`` of 16 kHz mono mp3 +
  ``annotations_final.csv``, TAB-separated, quoted). Each clip is a generated piece of
  ``--clip-seconds`` seconds: a random key and tempo, a chord progression, and 1-3 instruments
  (melody, chords, bass line and/or a drum pattern). Tags: the instruments playing
  (:data:`CLIP_INSTRUMENTS`), a tempo bucket (``slow`` < 90 BPM <= ``medium`` < 130 BPM <= ``fast``)
  and ``solo`` for a single instrument. Clip i goes to folder ``hex(i % 16)``, so the default
  split (0-b train, c valid, d-f test) applies. Sharded with ``shard-tools build mtat`` into
  ``OUT/mtat/``.

Program -> family map (GM program numbers are 0-based, as in pretty_midi; * = valid, ** = test)::

    bass        32 Acoustic Bass, 33 Fingered, 34 Picked, 36 Slap, 38 Synth Bass 1,
                35 Fretless*, 39 Synth Bass 2**                               pitch 28-55
    brass       56 Trumpet, 57 Trombone, 58 Tuba, 61 Brass Section, 62 Synth Brass,
                60 French Horn*, 59 Muted Trumpet**                           pitch 40-80
    flute       73 Flute, 72 Piccolo, 75 Pan Flute, 77 Shakuhachi, 79 Ocarina,
                74 Recorder*, 76 Blown Bottle**                               pitch 60-96
    guitar      24 Nylon, 25 Steel, 26 Jazz, 29 Overdriven, 28 Muted,
                27 Clean*, 30 Distortion**                                    pitch 40-80
    keyboard    0 Grand Piano, 4 E.Piano 1, 6 Harpsichord, 2 E.Grand, 3 Honky-tonk,
                7 Clavinet, 1 Bright Piano*, 5 E.Piano 2**                    pitch 28-96
    mallet      12 Marimba, 11 Vibraphone, 15 Dulcimer,
                10 Music Box*, 108 Kalimba**                                  pitch 53-96
    organ       16 Drawbar, 20 Reed Organ, 17 Percussive Organ, 21 Accordion,
                18 Rock Organ*, 23 Tango Accordion**                          pitch 36-90
    reed        64 Soprano Sax, 66 Tenor Sax, 70 Bassoon, 22 Harmonica,
                69 English Horn*, 71 Clarinet**                               pitch 40-84
    string      40 Violin, 41 Viola, 42 Cello, 43 Contrabass, 48 Strings, 45 Pizzicato,
                50 Synth Strings, 44 Tremolo*, 49 Slow Strings**              pitch 36-90
    synth_lead  80 Square, 81 Sawtooth, 82 Calliope,
                87 Bass+Lead*, 83 Chiff**                                     pitch 36-90
    vocal       52 Choir Aahs, 54 Synth Voice, 91 Choir Pad,
                85 Voice Lead*, 53 Voice Oohs**                               pitch 45-80

The programs and ranges were chosen by measuring the rendered notes' f0 (YIN) against the MIDI
key: left out are programs whose soundfont samples sound at another octave or fall silent in
part of the range (e.g. 8 Celesta, 9 Glockenspiel, 13 Xylophone, 31 Guitar Harmonics, 65 Alto
Sax, 68 Oboe, 84 Charang, 86 Fifths Lead). The drawbar organs 16-18 sound an octave below the key in this soundfont (a 16'
stop), so they are played one octave up and labelled with the pitch that sounds. ``instrument``
is the GM program; ``instrument_source`` is acoustic, electronic or synthetic per program;
``qualities`` are assigned per program from the instrument's nature (e.g. percussive for
plucked and struck sounds, distortion for overdriven guitars), not annotated by listening as
NSynth's are. Loudness follows velocity (a fixed gain for every note), so velocity is audible.

Deterministic for a ``--seed``: the same flags give byte-identical files and shards (on one
machine and library versions; another CPU's float rounding may flip a last bit). The
rendered layouts are kept when ``--root WORKDIR`` is given (and reused by a re-run with the same
flags), else written to a temporary folder that is removed at the end.

    shard-tools demo --out demo_shards                                # about 900 notes, 160 clips
    shard-tools demo --out demo_shards --notes-per-instrument 40 --clips 800 --root demo_src
    shard-tools demo --out fluid_shards --soundfont /usr/share/sounds/sf2/FluidR3_GM.sf2  # other instruments
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import soundfile as sf

from pipeline import fsio
from pipeline.audio import resample
from shard_tools.nsynth import FAMILIES, QUALITIES, SOURCES  # NSynth's vocabularies: the recipe owns them

SAMPLE_RATE = 16000
NOTE_SECONDS = 4.0
NOTE_OFF = 3.0
VELOCITIES = (25, 50, 75, 100, 127)
# One gain for every note (no per-note normalisation), so that velocity stays audible; at
# velocity 127 this soundfont peaks around 0.1-0.25 full scale.
NOTE_GAIN = 4.0
HEX = "0123456789abcdef"
OWNER_MARKER = ".musicssl-demo"  # marks a --root folder as written by this command



@dataclass(frozen=True)
class Program:
    program: int  # GM program, 0-based
    name: str
    source: str  # acoustic | electronic | synthetic
    qualities: tuple[str, ...] = ()
    transpose: int = 0  # semitones added to the played key so that the sounding pitch equals the label


_P = Program
# Per family: train programs first, then the valid program, then the test program (see docstring).
PROGRAMS: dict[str, list[Program]] = {
    "bass": [_P(32, "Acoustic Bass", "acoustic", ("percussive",)), _P(33, "Electric Bass (finger)", "electronic", ("percussive",)),
             _P(34, "Electric Bass (pick)", "electronic", ("percussive", "bright")), _P(36, "Slap Bass 1", "electronic", ("percussive", "bright")),
             _P(38, "Synth Bass 1", "synthetic"), _P(35, "Fretless Bass", "electronic", ("dark",)), _P(39, "Synth Bass 2", "synthetic")],
    "brass": [_P(56, "Trumpet", "acoustic", ("bright",)), _P(57, "Trombone", "acoustic"), _P(58, "Tuba", "acoustic", ("dark",)),
              _P(61, "Brass Section", "acoustic", ("multiphonic",)), _P(62, "Synth Brass 1", "synthetic"),
              _P(60, "French Horn", "acoustic", ("dark",)), _P(59, "Muted Trumpet", "acoustic")],
    "flute": [_P(73, "Flute", "acoustic"), _P(72, "Piccolo", "acoustic", ("bright",)), _P(75, "Pan Flute", "acoustic"),
              _P(77, "Shakuhachi", "acoustic", ("nonlinear_env",)), _P(79, "Ocarina", "acoustic"),
              _P(74, "Recorder", "acoustic"), _P(76, "Blown Bottle", "acoustic")],
    "guitar": [_P(24, "Acoustic Guitar (nylon)", "acoustic", ("percussive",)), _P(25, "Acoustic Guitar (steel)", "acoustic", ("percussive", "bright")),
               _P(26, "Electric Guitar (jazz)", "electronic", ("percussive",)), _P(29, "Overdriven Guitar", "electronic", ("distortion",)),
               _P(28, "Electric Guitar (muted)", "electronic", ("percussive", "fast_decay")),
               _P(27, "Electric Guitar (clean)", "electronic", ("percussive",)), _P(30, "Distortion Guitar", "electronic", ("distortion",))],
    "keyboard": [_P(0, "Acoustic Grand Piano", "acoustic", ("percussive",)), _P(4, "Electric Piano 1", "electronic", ("percussive",)),
                 _P(6, "Harpsichord", "acoustic", ("percussive", "bright")), _P(2, "Electric Grand Piano", "electronic", ("percussive",)),
                 _P(3, "Honky-tonk Piano", "acoustic", ("percussive",)), _P(7, "Clavinet", "electronic", ("percussive", "fast_decay")),
                 _P(1, "Bright Acoustic Piano", "acoustic", ("percussive", "bright")), _P(5, "Electric Piano 2", "electronic", ("percussive",))],
    "mallet": [_P(12, "Marimba", "acoustic", ("percussive", "fast_decay")), _P(11, "Vibraphone", "acoustic", ("percussive", "long_release")),
               _P(15, "Dulcimer", "acoustic", ("percussive",)),
               _P(10, "Music Box", "acoustic", ("percussive", "fast_decay")), _P(108, "Kalimba", "acoustic", ("percussive", "fast_decay"))],
    "organ": [_P(16, "Drawbar Organ", "electronic", (), 12), _P(20, "Reed Organ", "acoustic"),
              _P(17, "Percussive Organ", "electronic", ("percussive",), 12), _P(21, "Accordion", "acoustic", ("multiphonic",)),
              _P(18, "Rock Organ", "electronic", (), 12), _P(23, "Tango Accordion", "acoustic", ("multiphonic",))],
    "reed": [_P(64, "Soprano Sax", "acoustic"), _P(66, "Tenor Sax", "acoustic"), _P(70, "Bassoon", "acoustic", ("dark",)),
             _P(22, "Harmonica", "acoustic"), _P(69, "English Horn", "acoustic"), _P(71, "Clarinet", "acoustic")],
    "string": [_P(40, "Violin", "acoustic"), _P(41, "Viola", "acoustic"), _P(42, "Cello", "acoustic", ("dark",)),
               _P(43, "Contrabass", "acoustic", ("dark",)), _P(48, "String Ensemble 1", "acoustic", ("multiphonic",)),
               _P(45, "Pizzicato Strings", "acoustic", ("percussive", "fast_decay")), _P(50, "Synth Strings 1", "synthetic", ("long_release",)),
               _P(44, "Tremolo Strings", "acoustic", ("nonlinear_env",)), _P(49, "String Ensemble 2", "acoustic", ("multiphonic",))],
    "synth_lead": [_P(80, "Lead 1 (square)", "synthetic", ("bright",)), _P(81, "Lead 2 (sawtooth)", "synthetic", ("bright",)),
                   _P(82, "Lead 3 (calliope)", "synthetic"), _P(87, "Lead 8 (bass + lead)", "synthetic"),
                   _P(83, "Lead 4 (chiff)", "synthetic")],
    "vocal": [_P(52, "Choir Aahs", "acoustic", ("multiphonic",)), _P(54, "Synth Voice", "synthetic"),
              _P(91, "Pad 4 (choir)", "synthetic", ("long_release",)), _P(85, "Lead 6 (voice)", "synthetic"),
              _P(53, "Voice Oohs", "acoustic")],
}
PITCH_RANGE: dict[str, tuple[int, int]] = {
    "bass": (28, 55), "brass": (40, 80), "flute": (60, 96), "guitar": (40, 80), "keyboard": (28, 96),
    "mallet": (53, 96), "organ": (36, 90), "reed": (40, 84), "string": (36, 90), "synth_lead": (36, 90),
    "vocal": (45, 80),
}

# MTAT-style clips: tag -> GM programs that may play it; "drums" is the GM drum kit (channel 10).
# Only train programs of PROGRAMS (or programs PROGRAMS does not list, such as 19): the clips are
# pretraining audio too, and valid/test instruments must stay unheard in training.
CLIP_INSTRUMENTS: dict[str, list[int]] = {
    "piano": [0, 2], "guitar": [24, 25, 26], "strings": [48], "violin": [40], "cello": [42],
    "flute": [73, 72], "bass": [32, 33, 34], "organ": [19, 20], "synth": [80, 81], "sax": [64, 66],
    "brass": [56, 57, 61], "harpsichord": [6], "choir": [52], "drums": [],
}
TEMPO_TAGS = ("slow", "medium", "fast")
CLIP_TAGS = sorted([*CLIP_INSTRUMENTS, *TEMPO_TAGS, "solo"])


def split_programs(family: str, per_family: int = 0) -> dict[str, list[Program]]:
    """The programs of a family per split; ``per_family`` > 0 keeps that many (>= 3: the first
    ``per_family - 2`` train programs, plus the valid and test program)."""
    progs = PROGRAMS[family]
    train = progs[:-2] if per_family <= 0 else progs[: max(1, per_family - 2)]
    return {"train": train, "valid": [progs[-2]], "test": [progs[-1]]}


def instrument_names() -> dict[int, str]:
    """GM program -> NSynth-style ``instrument_str`` (``<family>_<source>_<nnn>``), numbered per
    (family, source) in table order, independent of which programs a run keeps."""
    out: dict[int, str] = {}
    for family, progs in PROGRAMS.items():
        counts: dict[str, int] = {}
        for p in progs:
            n = counts.get(p.source, 0)
            counts[p.source] = n + 1
            out[p.program] = f"{family}_{p.source}_{n:03d}"
    return out


# ---------------------------------------------------------------------------------------------
# rendering (runs in worker processes)

_SOUNDFONT: tuple[str, bytes] | None = None  # (path, content) of the soundfont this process last read


@functools.cache
def _default_soundfont() -> str:
    """The GM soundfont pretty_midi ships (``TimGM6mb.sf2``), looked up once per process."""
    import pretty_midi

    default = os.path.join(pretty_midi.__path__[0], "TimGM6mb.sf2")
    if not os.path.isfile(default):
        raise FileNotFoundError(f"{default}: the GM soundfont pretty_midi ships is missing; reinstall pretty_midi "
                                f"(pip install --force-reinstall pretty_midi)")
    return default


def soundfont_path(path: str = "") -> str:
    """``path`` (``--soundfont``) checked to be a SoundFont 2 file, or, when empty, the GM
    soundfont pretty_midi ships (``TimGM6mb.sf2``); an absolute path."""
    if not path:
        return _default_soundfont()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--soundfont {path}: no such file; give a General MIDI .sf2 file (e.g. Debian's "
                                f"fluid-soundfont-gm package: /usr/share/sounds/sf2/FluidR3_GM.sf2)")
    with open(path, "rb") as f:
        head = f.read(12)
    if head[:4] != b"RIFF" or head[8:12] != b"sfbk":
        raise ValueError(f"--soundfont {path}: not a SoundFont 2 file (no RIFF/sfbk header); give a General MIDI .sf2 file")
    return os.path.abspath(path)


def _init_worker(sf2: str) -> None:
    """Read the soundfont ``sf2`` once per process (midirenderer takes its bytes on every call)."""
    global _SOUNDFONT
    if _SOUNDFONT is None or _SOUNDFONT[0] != sf2:
        with open(sf2, "rb") as f:
            _SOUNDFONT = (sf2, f.read())


def _lowpass_taps(n: int = 191) -> np.ndarray:
    # windowed-sinc low-pass at 7.2 kHz for 48 kHz input (0.9 x the 8 kHz Nyquist of 16 kHz);
    # Blackman window: about -74 dB stopband, plenty for 16-bit output
    k = np.arange(n) - (n - 1) / 2
    cutoff = 0.9 / 3
    h = cutoff * np.sinc(cutoff * k) * np.blackman(n)
    return (h / h.sum()).astype(np.float64)


_TAPS = _lowpass_taps()


def decimate3(x: np.ndarray) -> np.ndarray:
    """48 kHz -> 16 kHz: low-pass and keep every third sample, computing only the kept outputs
    (numpy only: a worker process that never imports scipy starts seconds faster)."""
    half = (len(_TAPS) - 1) // 2
    padded = np.pad(x.astype(np.float32), (half, half))
    frames = np.lib.stride_tricks.sliding_window_view(padded, len(_TAPS))[::3]  # (len(x) / 3, taps)
    return (frames @ _TAPS[::-1].astype(np.float32)).astype(np.float32)


def _render(pm, seconds: float, sample_rate: int = SAMPLE_RATE, soundfont: str = "") -> np.ndarray:
    """A PrettyMIDI object -> float32 mono at ``sample_rate``, exactly ``seconds`` long, rendered
    with ``soundfont`` (a checked path, see :func:`soundfont_path`; empty: pretty_midi's)."""
    import midirenderer
    import pretty_midi

    # midirenderer stops at the last MIDI event: a no-op controller at ``seconds`` keeps the
    # release tail up to there
    pm.instruments[0].control_changes.append(pretty_midi.ControlChange(number=110, value=0, time=seconds))
    buf = io.BytesIO()
    pm.write(buf)
    _init_worker(soundfont or soundfont_path())
    wav = midirenderer.render_wave_from(_SOUNDFONT[1], buf.getvalue())
    audio, sr = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    if sample_rate == SAMPLE_RATE and sr == 3 * SAMPLE_RATE:
        mono = decimate3(mono)
    else:
        mono = resample(mono[None], int(sr), sample_rate)[0]
    n = int(round(seconds * sample_rate))
    out = np.zeros(n, dtype=np.float32)
    out[: min(n, len(mono))] = mono[:n]
    return out


def render_note(program: int, pitch: int, *, velocity: int = 100, seconds: float, held: float | None = None,
                sample_rate: int = SAMPLE_RATE, soundfont: str = "") -> np.ndarray:
    """One real instrument note from a GM soundfont (default: the one pretty_midi ships), through midirenderer.

    GM ``program`` plays MIDI ``pitch`` at ``velocity`` from 0 s for ``held`` seconds (default: all
    of ``seconds``); the result is float32 mono at ``sample_rate``, exactly ``seconds`` long (the
    release tail up to there, zeros after), at the soundfont's own level (not normalised). The demo
    datasets and the tests' rendered notes both come from here.
    """
    import pretty_midi

    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(program=program)
    inst.notes.append(pretty_midi.Note(velocity=velocity, pitch=pitch, start=0.0,
                                       end=seconds if held is None else held))
    pm.instruments.append(inst)
    return _render(pm, seconds, sample_rate, soundfont)


def nsynth_note(program: int, key: int, velocity: int, soundfont: str = "") -> np.ndarray:
    """One NSynth-style note: ``key`` held 3 s of a 4 s, 16 kHz mono float32 signal."""
    audio = render_note(program, key, velocity=velocity, seconds=NOTE_SECONDS, held=NOTE_OFF, soundfont=soundfont) * NOTE_GAIN
    peak = float(np.abs(audio).max())
    return audio * (0.99 / peak) if peak > 0.99 else audio


def _note_task(task: tuple) -> tuple[str, float]:
    path, program, key, velocity, soundfont = task
    audio = nsynth_note(program, key, velocity, soundfont)
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return path, float(np.abs(audio).max())


def _clip_task(task: tuple) -> tuple[str, float]:
    path, parts, seconds, soundfont = task
    import pretty_midi

    pm = pretty_midi.PrettyMIDI()
    for program, is_drum, notes in parts:
        inst = pretty_midi.Instrument(program=program, is_drum=is_drum)
        inst.notes.extend(pretty_midi.Note(velocity=v, pitch=p, start=s, end=e) for p, v, s, e in notes)
        pm.instruments.append(inst)
    audio = _render(pm, seconds, soundfont=soundfont)
    peak = float(np.abs(audio).max())
    if peak > 0:
        audio = audio * (0.8 / peak)  # a mix: normalised, unlike single notes
    sf.write(path, audio, SAMPLE_RATE, format="MP3")
    return path, peak


# ---------------------------------------------------------------------------------------------
# planning (main process, seeded)


@dataclass(frozen=True)
class DemoConfig:
    notes_per_instrument: int = 12
    programs_per_family: int = 0
    clips: int = 160
    clip_seconds: float = 6.0
    seed: int = 0
    soundfont: str = ""  # a .sf2 path; "": the GM soundfont pretty_midi ships


def plan_notes(cfg: DemoConfig, root: str) -> tuple[dict[str, dict[str, dict]], list[tuple]]:
    """examples.json content per split and the render tasks, drawn from ``cfg.seed``."""
    rng = np.random.default_rng([cfg.seed, 1])
    names = instrument_names()
    examples: dict[str, dict[str, dict]] = {"train": {}, "valid": {}, "test": {}}
    tasks: list[tuple] = []
    for family in FAMILIES:
        lo, hi = PITCH_RANGE[family]
        for split, progs in split_programs(family, cfg.programs_per_family).items():
            for p in progs:
                grid = [(pitch, vel) for pitch in range(lo, hi + 1) for vel in VELOCITIES]
                n = min(cfg.notes_per_instrument, len(grid))
                # spread pitches: one draw per equal-width pitch band, then a random velocity
                bands = np.array_split(np.arange(lo, hi + 1), n) if n <= hi - lo + 1 else None
                chosen: list[tuple[int, int]] = []
                if bands is not None:
                    for band in bands:
                        chosen.append((int(rng.choice(band)), int(rng.choice(VELOCITIES))))
                else:
                    idx = rng.choice(len(grid), size=n, replace=False)
                    chosen = [grid[i] for i in sorted(idx)]
                for pitch, vel in chosen:
                    inst = names[p.program]
                    note_str = f"{inst}-{pitch:03d}-{vel:03d}"
                    examples[split][note_str] = {
                        "note": 0,  # numbered below, once every note is known
                        "note_str": note_str,
                        "instrument": p.program,
                        "instrument_str": inst,
                        "pitch": pitch,
                        "velocity": vel,
                        "sample_rate": SAMPLE_RATE,
                        "qualities": [1 if q in p.qualities else 0 for q in QUALITIES],
                        "qualities_str": [q for q in QUALITIES if q in p.qualities],
                        "instrument_family": FAMILIES.index(family),
                        "instrument_family_str": family,
                        "instrument_source": SOURCES.index(p.source),
                        "instrument_source_str": p.source,
                    }
                    path = os.path.join(root, f"nsynth-{split}", "audio", f"{note_str}.wav")
                    tasks.append((path, p.program, pitch + p.transpose, vel, cfg.soundfont))
    number = 0
    for split in ("train", "valid", "test"):
        for note_str in sorted(examples[split]):
            examples[split][note_str]["note"] = number
            number += 1
    return examples, tasks


def _scale(root_pc: int, minor: bool) -> list[int]:
    steps = (0, 2, 3, 5, 7, 8, 10) if minor else (0, 2, 4, 5, 7, 9, 11)
    return [root_pc + s for s in steps]


def plan_clip(rng: np.random.Generator, seconds: float) -> tuple[list[str], list[tuple], float]:
    """Tags, MIDI parts ``(program, is_drum, [(pitch, velocity, start, end)])`` and tempo of one clip."""
    n_inst = int(rng.choice([1, 2, 3], p=[0.25, 0.45, 0.30]))
    tags = sorted(str(t) for t in rng.choice(sorted(CLIP_INSTRUMENTS), size=n_inst, replace=False))
    bpm = float(rng.uniform(60.0, 180.0))
    beat = 60.0 / bpm
    scale = _scale(int(rng.integers(0, 12)), bool(rng.integers(0, 2)))
    degrees = [int(rng.choice([0, 3, 4, 5])) for _ in range(4)]  # I IV V vi, per bar
    n_beats = int(np.ceil(seconds / beat))

    def chord(bar: int, octave: int) -> list[int]:
        d = degrees[bar % 4]
        return [12 * octave + scale[(d + k) % 7] + 12 * ((d + k) // 7) for k in (0, 2, 4)]

    melodic = [t for t in tags if t not in ("bass", "drums")]
    parts: list[tuple] = []
    for t in tags:
        notes: list[tuple[int, int, float, float]] = []
        if t == "drums":
            for b in range(n_beats):
                s = b * beat
                notes.append((36 if b % 2 == 0 else 38, 100, s, s + 0.1))  # kick / snare
                notes.extend((42, 70, s + h * beat / 2, s + h * beat / 2 + 0.05) for h in (0, 1))  # hi-hat
            parts.append((0, True, notes))
            continue
        program = int(rng.choice(CLIP_INSTRUMENTS[t]))
        if t == "bass":
            for b in range(n_beats):
                notes.append((chord(b // 4, 3)[0], 95, b * beat, (b + 0.9) * beat))
        elif melodic.index(t) == 1:  # second melodic instrument: block chords, one per bar
            for bar in range(int(np.ceil(n_beats / 4))):
                notes.extend((p, 70, bar * 4 * beat, (bar + 1) * 4 * beat * 0.98) for p in chord(bar, 5))
        else:  # first melodic instrument: a melody walking the scale in quarters and eighths
            step, t0 = int(rng.integers(0, 7)), 0.0
            while t0 < seconds:
                dur = beat if rng.random() < 0.6 else beat / 2
                step = int(np.clip(step + rng.integers(-2, 3), 0, 13))
                pitch = 12 * 5 + scale[step % 7] + 12 * (step // 7)
                notes.append((pitch, int(rng.integers(80, 115)), t0, t0 + dur * 0.95))
                t0 += dur
        parts.append((program, False, notes))
    tempo_tag = "slow" if bpm < 90 else "medium" if bpm < 130 else "fast"
    tags = sorted([*tags, tempo_tag, *(["solo"] if n_inst == 1 else [])])
    return tags, parts, bpm


def plan_clips(cfg: DemoConfig, root: str) -> tuple[list[tuple[int, str, list[str]]], list[tuple]]:
    rng = np.random.default_rng([cfg.seed, 2])
    rows, tasks = [], []
    secs = int(round(cfg.clip_seconds))
    for i in range(cfg.clips):
        clip_id = i + 1
        tags, parts, _ = plan_clip(rng, cfg.clip_seconds)
        rel = f"{HEX[i % 16]}/musicssl_demo-rendered_clips-{clip_id:05d}-0-{secs}.mp3"
        rows.append((clip_id, rel, tags))
        tasks.append((os.path.join(root, rel), parts, cfg.clip_seconds, cfg.soundfont))
    return rows, tasks


def write_annotations(path: str, rows: list[tuple[int, str, list[str]]]) -> None:
    """MTAT's annotations_final.csv: TAB-separated, every value double-quoted, like the real file."""
    lines = ["\t".join(f'"{v}"' for v in ["clip_id", *CLIP_TAGS, "mp3_path"])]
    for clip_id, rel, tags in rows:
        lines.append("\t".join(f'"{v}"' for v in [clip_id, *(int(t in tags) for t in CLIP_TAGS), rel]))
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# driver


def _render_task(task: tuple) -> tuple[str, float]:
    return _note_task(task[1:]) if task[0] == "note" else _clip_task(task[1:])


def _run_tasks(tasks: list[tuple], workers: int, progress: bool, soundfont: str = "") -> None:
    """Run ``("note", ...)`` / ``("clip", ...)`` render tasks, in one process pool when workers > 1."""
    from tqdm import tqdm

    from shard_tools.workers import Pool, stop_point

    bar = tqdm(total=len(tasks), desc="render notes + clips", unit="file", disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1:
            for t in tasks:
                _render_task(t)
                bar.update(1)
                stop_point()
            return

        # forkserver/spawn, never fork (no inherited locks of the parent's threads); the workers
        # exit with this process, even when it is killed
        with Pool(workers, initializer=_init_worker, initargs=(soundfont or soundfont_path(),)) as pool:
            for _ in pool.map(_render_task, tasks, chunksize=max(1, min(8, len(tasks) // (workers * 8)))):
                bar.update(1)
                stop_point()
    finally:
        bar.close()


def render_layouts(root: str, cfg: DemoConfig, *, workers: int = 1, progress: bool = True) -> dict:
    """Render the NSynth-layout notes and MTAT-layout clips under ``root``; returns counts.

    Skipped when ``root/demo_config.json`` (written last) records the same config: the files are
    already there.
    """
    marker = os.path.join(root, "demo_config.json")
    owned = os.path.join(root, OWNER_MARKER)
    # A re-render deletes root/nsynth and root/mtat: only ever in a folder this command created.
    if os.path.isdir(root) and os.listdir(root) and not os.path.exists(owned):
        raise ValueError(f"--root {root}: this folder holds files the demo did not write; give a new or empty "
                         f"folder (the demo replaces its nsynth/ and mtat/ subfolders)")
    os.makedirs(root, exist_ok=True)
    open(owned, "a").close()
    examples, note_tasks = plan_notes(cfg, os.path.join(root, "nsynth"))
    rows, clip_tasks = plan_clips(cfg, os.path.join(root, "mtat"))
    counts = {"notes": {s: len(v) for s, v in examples.items()},
              "clips": {s: sum(1 for _, rel, _ in rows if _folder_split(rel) == s) for s in ("train", "valid", "test")}}
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == asdict(cfg):
                if progress:
                    print(f"[demo] {root}: already rendered with these flags; reusing it")
                return counts | {"reused": True}
        os.remove(marker)
    for split, ex in examples.items():
        folder = os.path.join(root, "nsynth", f"nsynth-{split}")
        if os.path.isdir(folder):
            shutil.rmtree(folder)  # a different config: stale notes would otherwise stay listed nowhere
        os.makedirs(os.path.join(folder, "audio"))
        with open(os.path.join(folder, "examples.json"), "w") as f:
            json.dump(ex, f, indent=1, sort_keys=True)
    mtat_root = os.path.join(root, "mtat")
    if os.path.isdir(mtat_root):
        shutil.rmtree(mtat_root)
    for c in HEX:
        os.makedirs(os.path.join(mtat_root, c))
    write_annotations(os.path.join(mtat_root, "annotations_final.csv"), rows)
    # clips first: they are the longest tasks, so the pool ends with short ones and finishes evenly
    _run_tasks([("clip", *t) for t in clip_tasks] + [("note", *t) for t in note_tasks], workers, progress, cfg.soundfont)
    with open(marker, "w") as f:
        json.dump(asdict(cfg), f)
    return counts | {"reused": False}


def _folder_split(rel: str) -> str:
    from shard_tools.mtat import FOLDER_SPLIT

    return FOLDER_SPLIT[rel.split("/", 1)[0]]


def build_demo(out: str, *, root: str | None = None, cfg: DemoConfig = DemoConfig(), workers: int = 1,
               codec: str = "flac", shard_size: int = 256_000_000, progress: bool = True,
               command: str = "") -> dict:
    """Render the demo layouts and shard them into ``out/nsynth`` and ``out/mtat``; returns a summary."""
    from shard_tools import mtat, nsynth
    from shard_tools.build import build_dataset

    t0 = time.time()
    tmp = None
    if root is None:
        tmp = root = tempfile.mkdtemp(prefix="musicssl-demo-")
    try:
        counts = render_layouts(root, cfg, workers=workers, progress=progress)
        t_render = time.time() - t0
        reports = {}
        for name, module, args in (
            ("nsynth", nsynth, argparse.Namespace(splits=None, pitch_range=None)),
            ("mtat", mtat, argparse.Namespace(top_k=50, split_files=None, audio_dir=None)),
        ):
            recipe = module.prepare(os.path.join(root, name), args)
            reports[name] = build_dataset(recipe, fsio.join_url(out, name), codec=codec, shard_size=shard_size,
                                          sample_rate=SAMPLE_RATE, mono=True, workers=workers, seed=cfg.seed,
                                          progress=progress, command=command)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"out": out, "root": None if tmp else root, "config": asdict(cfg), "counts": counts,
            "render_seconds": round(t_render, 2), "wall_seconds": round(time.time() - t0, 2),
            "reports": reports}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder for the shards (local path or fsspec URL); "
                                                     "gets nsynth/ and mtat/ subfolders")
    parser.add_argument("--root", default=None, metavar="WORKDIR",
                        help="keep the rendered NSynth/MTAT layouts here (reused by a re-run with the same flags); "
                             "default: a temporary folder, removed at the end")
    parser.add_argument("--notes-per-instrument", type=int, default=12,
                        help="notes rendered per GM program, spread over the family's pitch range (default: 12)")
    parser.add_argument("--programs-per-family", type=int, default=0,
                        help="programs per family, >= 3 (one valid, one test, the rest train); 0: all 5-9 (default: 0)")
    parser.add_argument("--clips", type=int, default=160, help="MTAT-layout multi-instrument clips (default: 160)")
    parser.add_argument("--clip-seconds", type=float, default=6.0, help="length of each clip (default: 6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice and of the shard shuffle (default: 0)")
    parser.add_argument("--soundfont", default="", metavar="SF2",
                        help="render with this General MIDI .sf2 instead of the one pretty_midi ships (TimGM6mb), e.g. "
                             "/usr/share/sounds/sf2/FluidR3_GM.sf2 (Debian's fluid-soundfont-gm): the same programs "
                             "and labels played by other recorded instruments, to check an encoder on sounds "
                             "the default demo never had")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                        help="processes for rendering and sharding (default: CPU cores, at most 8)")
    parser.add_argument("--codec", choices=("flac", "wav"), default="flac", help="audio codec in the shards (default: flac)")
    parser.add_argument("--shard-size", type=int, default=256_000_000, help="shard size in bytes (default: 256000000)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")


def _check(args: argparse.Namespace) -> DemoConfig:
    if args.notes_per_instrument < 1:
        raise ValueError(f"--notes-per-instrument must be >= 1, got {args.notes_per_instrument}")
    if args.programs_per_family != 0 and args.programs_per_family < 3:
        raise ValueError(f"--programs-per-family must be 0 (all) or >= 3 (train, valid, test), got {args.programs_per_family}")
    if args.clips < 16:
        raise ValueError(f"--clips must be >= 16 so that every folder 0-f (and so every split) gets a clip, got {args.clips}")
    if not 1.0 <= args.clip_seconds <= 60.0:
        raise ValueError(f"--clip-seconds must be within [1, 60], got {args.clip_seconds}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    return DemoConfig(notes_per_instrument=args.notes_per_instrument, programs_per_family=args.programs_per_family,
                      clips=args.clips, clip_seconds=args.clip_seconds, seed=args.seed,
                      soundfont=soundfont_path(args.soundfont) if args.soundfont else "")


def run(args: argparse.Namespace) -> int:
    """The ``shard-tools demo`` command: render, shard, print a one-screen summary."""
    try:
        cfg = _check(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"shard-tools demo: error: {exc}", file=sys.stderr)
        return 2
    argv = sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "demo" else []
    command = shlex.join(["shard-tools", "demo", *argv])
    try:
        summary = build_demo(args.out, root=args.root, cfg=cfg, workers=args.workers, codec=args.codec,
                             shard_size=args.shard_size, progress=not args.quiet, command=command)
    except (FileNotFoundError, ValueError) as exc:
        print(f"shard-tools demo: error: {exc}", file=sys.stderr)
        return 2
    bad = [n for n, r in summary["reports"].items() if r["files_skipped"] or r["samples_written"] == 0]
    if not args.quiet:
        c = summary["counts"]
        n_prog = {s: sum(len(split_programs(f, cfg.programs_per_family)[s]) for f in FAMILIES) for s in ("train", "valid", "test")}
        print("\nshard-tools demo: done")
        rendered = f"reused from {summary['root']}" if c.get("reused") else f"in {summary['render_seconds']:.1f} s"
        print(f"  rendered   {rendered}")
        for name in ("nsynth", "mtat"):
            r = summary["reports"][name]
            splits = "  ".join(f"{s} {v['samples']}" for s, v in sorted(r["splits"].items()))
            print(f"  {name:<7} {r['samples_written']:>5} samples  {r['hours'] * 60:6.1f} min   {splits}   -> {fsio.join_url(args.out, name)}")
        print("  nsynth instruments per split (held out as in NSynth): " + ", ".join(f"{s} {n}" for s, n in n_prog.items()))
        print(f"  wall time  {summary['wall_seconds']:.1f} s")
        print(f"  next: shard-tools verify {fsio.join_url(args.out, 'nsynth')} && shard-tools verify {fsio.join_url(args.out, 'mtat')}")
    if bad:
        print(f"shard-tools demo: error: {', '.join(bad)} had skipped files or no samples; see the build reports under {args.out}",
              file=sys.stderr)
        return 1
    return 0

"""Recipe ``folder``: every audio file below a folder, optionally labelled by a CSV.

Layout: any tree of ``.wav``, ``.flac``, ``.ogg``/``.oga``/``.opus``, ``.mp3`` or ``.aif(f)`` files
below ``--root``, a local folder or a bucket URL (other files are ignored; symlinked folders are
not followed; a file whose name is not UTF-8 is reported as skipped). One file = one
sample; its key is its relative path made tar-safe plus a short hash of the path (so ``a/b.wav``
and ``a_b.wav`` stay distinct), its id and ``source`` are the relative path.

Labels (optional): ``--labels labels.csv`` with a header row, a path column (``--path-column``,
default ``path``; relative to ``--root`` or absolute below it) and label columns, stored in each
sample's JSON as strings (``labels: {"genre": "jazz", ...}``). Columns named with ``--multi-hot``
hold several values separated by ``--label-sep`` (default ``;``) and are stored as lists. The
manifest gets a ``class`` spec (or ``multi_hot``) per column with the sorted distinct values. A
row whose file is missing is reported as skipped; audio files with no row are reported as skipped
unless ``--keep-unlisted`` (then they are written with empty labels).

Splits: from the CSV's split column (``--split-column``, default ``split``; values such as
``train``/``valid``/``test``) when present and non-empty, else by a stable hash of the relative
path: ``--test-fraction`` (default 0.1) of the files go to ``test``, ``--valid-fraction``
(default 0.1) to ``valid``, the rest to ``train``. The hash split never changes when files are
added or removed, so a file never moves between splits.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import posixpath
import re

from shard_tools.layout import NOT_UTF8_NAME, Root, printable, read_text, require_file, utf8_name
from shard_tools.recipe import Item, Recipe, Skip, make_key

DATASET = "folder"
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")
_SPLIT_OK = re.compile(r"^[A-Za-z0-9_]+$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("folder recipe")
    g.add_argument("--labels", metavar="CSV", help="CSV with a path column and label columns (optional)")
    g.add_argument("--path-column", default="path", help="column of --labels holding the file path (default: path)")
    g.add_argument("--split-column", default="split",
                   help="column of --labels holding the split, used when present (default: split)")
    g.add_argument("--multi-hot", action="append", default=[], metavar="COLUMN",
                   help="a --labels column holding several values (repeatable); stored as a list")
    g.add_argument("--label-sep", default=";", help="separator inside --multi-hot columns (default: ;)")
    g.add_argument("--keep-unlisted", action="store_true",
                   help="write audio files missing from --labels with empty labels (default: report them skipped)")
    g.add_argument("--valid-fraction", type=float, default=0.1,
                   help="share of files put in 'valid' by path hash when no split column (default: 0.1)")
    g.add_argument("--test-fraction", type=float, default=0.1,
                   help="share of files put in 'test' by path hash when no split column (default: 0.1)")


def hash_split(rel_path: str, valid_fraction: float, test_fraction: float) -> str:
    """The split of a file by a stable hash of its relative path (same on every machine)."""
    u = int.from_bytes(hashlib.sha1(rel_path.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + valid_fraction:
        return "valid"
    return "train"


def list_audio(root: Root) -> tuple[list[str], list[Skip]]:
    """Relative paths (with ``/``) of the audio files below ``root``, sorted, and a skip for each
    audio file whose name is not UTF-8."""
    files, skips = [], []
    for rel in root.walk():
        if rel.lower().endswith(AUDIO_EXTENSIONS):
            if utf8_name(rel):
                files.append(rel)
            else:
                skips.append(Skip(printable(root.path(rel)), NOT_UTF8_NAME))
    return files, skips


def file_key(rel_path: str) -> str:
    stem = rel_path.rsplit(".", 1)[0]
    digest = hashlib.sha1(rel_path.encode("utf-8")).hexdigest()[:8]
    return make_key(stem[-80:], digest)


def _read_labels(csv_path: str, root: Root, args: argparse.Namespace) -> tuple[dict[str, dict], list[Skip], list[str]]:
    """Rows of the label CSV keyed by relative path; rows without a file become skips."""
    require_file(csv_path, f"--labels: a CSV with a header row and a {args.path_column!r} column")
    f = io.StringIO(read_text(csv_path), newline="")
    sample = f.read(4096)
    f.seek(0)
    try:
        dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(f, dialect=dialect)
    columns = list(reader.fieldnames or [])
    if args.path_column not in columns:
        raise ValueError(f"--labels {csv_path}: no {args.path_column!r} column (columns: {columns}); "
                         f"name the path column with --path-column")
    for col in args.multi_hot:
        if col not in columns:
            raise ValueError(f"--multi-hot {col}: not a column of {csv_path} (columns: {columns})")
    label_cols = [c for c in columns if c not in (args.path_column, args.split_column) and c]
    rows: dict[str, dict] = {}
    skips: list[Skip] = []
    for line_no, row in enumerate(reader, start=2):
        raw = (row.get(args.path_column) or "").strip()
        if not raw:
            skips.append(Skip(f"{csv_path}:{line_no}", "label row without a path"))
            continue
        rel = _rel_below(raw, root)
        if rel is None:
            skips.append(Skip(f"{csv_path}:{line_no}", f"label row outside --root: {raw}"))
            continue
        if not root.is_file(rel):
            skips.append(Skip(raw, f"label row without a file: {csv_path} line {line_no}"))
            continue
        if rel in rows:
            skips.append(Skip(f"{csv_path}:{line_no}", f"duplicate label row for {rel} (first one kept)"))
            continue
        rows[rel] = row
    return rows, skips, label_cols


def _rel_below(raw: str, root: Root) -> str | None:
    """A label row's path relative to ``root`` (given relative to it, or absolute below it); None outside."""
    if root.local:
        full = raw if os.path.isabs(raw) else os.path.join(root.url, raw)
        rel = os.path.relpath(os.path.abspath(full), root.url).replace(os.sep, "/")
    elif "://" in raw:
        rel = root.rel(raw)
    else:
        rel = posixpath.normpath(raw.lstrip("/"))
    return None if rel == ".." or rel.startswith("../") else rel


def prepare(root: str, args: argparse.Namespace) -> Recipe:
    tree = Root(root)
    if not tree.is_dir():
        raise FileNotFoundError(f"--root {root}: folder not found; give the folder that holds your audio files")
    for flag, v in (("--valid-fraction", args.valid_fraction), ("--test-fraction", args.test_fraction)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{flag} must be within [0, 1], got {v}")
    if args.valid_fraction + args.test_fraction > 1.0:
        raise ValueError("--valid-fraction + --test-fraction must not exceed 1")
    files, skips = list_audio(tree)
    unnamable = len(skips)
    rows: dict[str, dict] | None = None
    label_cols: list[str] = []
    if args.labels:
        rows, label_skips, label_cols = _read_labels(args.labels, tree, args)
        skips.extend(label_skips)
    if not files and not rows and not unnamable:
        raise FileNotFoundError(f"--root {root}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) below this folder")
    multi = set(args.multi_hot)
    values: dict[str, set[str]] = {c: set() for c in label_cols}
    items: list[Item] = []
    listed = set(files)
    # files named only by the CSV (e.g. an extension we do not scan) are still taken
    for rel in sorted(set(rows or {}) - listed):
        files.append(rel)
    for rel in sorted(files):
        labels: dict = {}
        split = ""
        if rows is not None:
            row = rows.get(rel)
            if row is None and not args.keep_unlisted:
                skips.append(Skip(tree.path(rel), "not listed in --labels CSV (use --keep-unlisted to keep)"))
                continue
            if row is not None:
                split = (row.get(args.split_column) or "").strip()
                for col in label_cols:
                    v = (row.get(col) or "").strip()
                    if col in multi:
                        vs = [x.strip() for x in v.split(args.label_sep) if x.strip()]
                        labels[col] = vs
                        values[col].update(vs)
                    else:
                        labels[col] = v
                        if v:
                            values[col].add(v)
        if split and not _SPLIT_OK.match(split):
            skips.append(Skip(tree.path(rel), f"bad split name {split!r} in --labels (use letters, digits, _)"))
            continue
        split = split or hash_split(rel, args.valid_fraction, args.test_fraction)
        items.append(Item(path=tree.path(rel), source=rel, split=split, id=rel,
                          key=file_key(rel), labels=labels))
    spec = {c: {"kind": "multi_hot" if c in multi else "class", "names": sorted(values[c])} for c in label_cols}
    n_rows_without_file = sum(1 for s in skips if s.reason.startswith(("label row", "duplicate label row")))
    return Recipe(dataset=DATASET, items=items, skipped=skips, labels=spec, root=tree.url,
                  files_in=len(files) + unnamable + n_rows_without_file)

"""Recipe ``mtat``: MagnaTagATune, 25,863 clips of ~29 s (16 kHz mono mp3) with 188 binary tags.

Layout under ``--root`` (``mp3.zip.001``-``003`` concatenated and unzipped there, plus the
annotation file from mirg.city.ac.uk/datasets/magnatagatune)::

    annotations_final.csv     TAB-separated, every value in double quotes: a header
                              "clip_id" <188 tag names> "mp3_path", then one row per clip:
                              "2" "0" "1" ... "f/american_bach_soloists-...-30-59.mp3"
    0/ 1/ ... f/              the mp3 files, at the paths given in the mp3_path column

(``--audio-dir`` points elsewhere if the folders 0-f are not beside the csv.)

Tags: the 50 most frequent tags, counted over every row of ``annotations_final.csv`` (ties broken
by tag name, so the vocabulary is stable); tags never set are never in it. ``--top-k`` changes 50.
A sample's ``labels`` are ``{"tags": [...]}`` with its tags from that vocabulary (possibly empty);
its ``clip_id`` is a top-level JSON field. The manifest's ``tags`` spec (multi_hot) lists the
vocabulary in descending count order.

Splits:

- default: by the clip's folder, as in most MTAT papers since Dieleman & Schrauwen (2014):
  ``0``-``b`` -> train, ``c`` -> valid, ``d``-``f`` -> test.
- ``--split-files DIR``: Pons et al.'s split (github.com/jordipons/musicnn-training,
  ``data/index/mtt/``), used by CLMR and musicnn: ``train_gt_mtt.tsv``, ``val_gt_mtt.tsv`` and
  ``test_gt_mtt.tsv`` hold one clip per line, ``<clip_id>\\t[<50 floats>]`` (only the first column
  is read: the split membership), and ``index_mtt.tsv`` maps ``<clip_id>\\t<mp3_path>`` (used for
  the path when present, else the csv's mp3_path). Tags still come from ``annotations_final.csv``
  (Pons' 50-tag vector is the same top-50). Clips in the csv but in none of the three files are
  not part of that split scheme and are left out (counted in the printed summary, not skipped).

The real dataset contains a few empty (0-byte) mp3s; they, missing files and rows naming a clip
that the csv does not have are reported as skipped with their reason, never fatal.

    shard-tools build mtat --root /data/mtat --out shards/mtat --mono --sample-rate 16000
"""

from __future__ import annotations

import argparse
from collections import Counter

from shard_tools.layout import Root, read_header_table, read_table, require_dir, require_file
from shard_tools.recipe import Item, Recipe, Skip, make_key

DATASET = "mtat"
ANNOTATIONS = "annotations_final.csv"
SPLIT_FILES = {"train": "train_gt_mtt.tsv", "valid": "val_gt_mtt.tsv", "test": "test_gt_mtt.tsv"}
INDEX_FILE = "index_mtt.tsv"
FOLDER_SPLIT = {**{c: "train" for c in "0123456789ab"}, "c": "valid", **{c: "test" for c in "def"}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mtat recipe")
    g.add_argument("--top-k", type=int, default=50, help="size of the tag vocabulary, most frequent first (default: 50)")
    g.add_argument("--split-files", metavar="DIR", default=None,
                   help="folder with Pons' train_gt_mtt.tsv, val_gt_mtt.tsv, test_gt_mtt.tsv "
                        "(+ optional index_mtt.tsv); default: split by folder 0-b/c/d-f")
    g.add_argument("--audio-dir", metavar="DIR", default=None,
                   help="folder holding 0/ ... f/ (default: --root)")


def read_annotations(path: str) -> tuple[list[str], list[tuple[int, str, list[str]]]]:
    """``annotations_final.csv`` -> (tag names, rows of (clip_id, mp3_path, tags set)).

    Raises ValueError naming the file and line when the header or a row does not fit the layout.
    """
    header, rows = read_header_table(path, delimiter="\t", expected="clip_id<TAB>tags...<TAB>mp3_path (TAB-separated)")
    if len(header) < 3 or header[0] != "clip_id" or header[-1] != "mp3_path":
        raise ValueError(f"{path}: header must start with clip_id and end with mp3_path (TAB-separated), "
                         f"got {header[:2]}...{header[-1:]}; is this MagnaTagATune's annotations_final.csv?")
    tags = header[1:-1]
    out: list[tuple[int, str, list[str]]] = []
    for line, fields in rows:
        if len(fields) != len(header):
            raise ValueError(f"{path} line {line}: {len(fields)} fields, the header has {len(header)}")
        try:
            clip_id = int(fields[0])
            flags = [int(v) for v in fields[1:-1]]
        except ValueError:
            raise ValueError(f"{path} line {line}: clip_id and tag values must be integers") from None
        out.append((clip_id, fields[-1], [t for t, on in zip(tags, flags) if on]))
    return tags, out


def top_tags(tags: list[str], rows: list[tuple[int, str, list[str]]], k: int) -> list[str]:
    """The ``k`` most frequent tags over ``rows``, ties by name; tags with no clip are dropped."""
    counts = Counter(t for _, _, ts in rows for t in ts)
    ranked = sorted((t for t in tags if counts[t] > 0), key=lambda t: (-counts[t], t))
    return ranked[:k]


def _read_ids(path: str) -> list[int]:
    ids = []
    for line, fields in read_table(path, delimiter="\t"):
        try:
            ids.append(int(fields[0]))
        except ValueError:
            raise ValueError(f"{path} line {line}: first column must be a clip id, got {fields[0]!r}") from None
    return ids


def read_split_files(folder: str) -> tuple[dict[int, str], dict[int, str]]:
    """Pons' split folder (local or URL) -> ({clip_id: split}, {clip_id: mp3_path from index_mtt.tsv})."""
    splits = Root(require_dir(folder, "Pons' MTAT split files (train_gt_mtt.tsv, val_gt_mtt.tsv, test_gt_mtt.tsv)"))
    split_of: dict[int, str] = {}
    for split, name in SPLIT_FILES.items():
        path = require_file(splits.path(name),
                            f"Pons' {name} (github.com/jordipons/musicnn-training data/index/mtt/)")
        for cid in _read_ids(path):
            if split_of.setdefault(cid, split) != split:
                raise ValueError(f"--split-files {folder}: clip {cid} is in both {split_of[cid]} and {split}")
    paths: dict[int, str] = {}
    index = splits.path(INDEX_FILE)
    if splits.is_file(INDEX_FILE):
        for line, fields in read_table(index, delimiter="\t"):
            if len(fields) < 2:
                raise ValueError(f"{index} line {line}: expected clip_id<TAB>mp3_path")
            try:
                paths[int(fields[0])] = fields[1]
            except ValueError:
                raise ValueError(f"{index} line {line}: first column must be a clip id, got {fields[0]!r}") from None
    return split_of, paths


def prepare(root: str, args: argparse.Namespace) -> Recipe:
    tree = Root(root)
    top_k = getattr(args, "top_k", 50)
    if top_k <= 0:
        raise ValueError(f"--top-k must be positive, got {top_k}")
    audio_dir = getattr(args, "audio_dir", None)
    audio = Root(audio_dir) if audio_dir else tree  # one Root, one listing of a bucket
    csv_path = require_file(tree.path(ANNOTATIONS),
                            "MagnaTagATune's annotations_final.csv (TAB-separated clip_id, 188 tags, mp3_path) in --root")
    tags, rows = read_annotations(csv_path)
    vocab = top_tags(tags, rows, top_k)

    split_files = getattr(args, "split_files", None)
    split_of: dict[int, str] | None = None
    index_paths: dict[int, str] = {}
    if split_files:
        split_of, index_paths = read_split_files(split_files)

    items: list[Item] = []
    skipped: list[Skip] = []
    left_out = 0
    seen: set[int] = set()
    for clip_id, mp3_path, clip_tags in rows:
        if clip_id in seen:
            skipped.append(Skip(f"{csv_path}:clip_id={clip_id}", f"duplicate clip_id: {clip_id} listed twice in {ANNOTATIONS}"))
            continue
        seen.add(clip_id)
        rel = index_paths.get(clip_id, mp3_path)
        path = audio.path(rel)
        if split_of is not None:
            split = split_of.get(clip_id)
            if split is None:
                left_out += 1
                continue
        else:
            split = FOLDER_SPLIT.get(rel.split("/", 1)[0].lower()) if "/" in rel else None
            if split is None:
                skipped.append(Skip(path, f"no split: mp3_path {rel!r} is not below a folder 0-f"))
                continue
        if not audio.usable(rel, skipped):
            continue
        has = set(clip_tags)
        labels = {"tags": [t for t in vocab if t in has]}  # vocabulary order, as in the manifest
        items.append(Item(path=path, source=tree.rel(path), split=split, id=str(clip_id),
                          key=make_key(DATASET, clip_id), labels=labels, extra={"clip_id": clip_id}))
    if split_of is not None:
        for cid in sorted(set(split_of) - seen):
            rel = index_paths.get(cid, f"<clip {cid}>")
            skipped.append(Skip(audio.path(rel),
                                f"no annotations: clip {cid} is in --split-files but not in {ANNOTATIONS}"))
    if rows and not audio.found_any:
        raise FileNotFoundError(
            f"{audio.path(rows[0][1])}: file not found, and none of the {len(rows)} mp3s listed in {csv_path} exist; "
            f"expected the folders 0/ ... f/ of mp3.zip in {audio.url} (unzip it there or pass --audio-dir)")
    if left_out:
        print(f"[mtat] --split-files: left out {left_out} clips of {ANNOTATIONS} that are in none of the split files")
    return Recipe(dataset=DATASET, items=items, skipped=skipped, root=tree.url,
                  labels={"tags": {"kind": "multi_hot", "names": vocab}},
                  files_in=len(items) + len(skipped))

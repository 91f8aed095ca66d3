"""Recipe ``msd``: Million Song Dataset audio, i.e. the 30 s 7digital previews, with optional tags.

Layout under ``--root`` (as the previews are usually stored, e.g. by CLMR and
sota-music-tagging-models)::

    <7d_id[0]>/<7d_id[1]>/<7d_id>.clip.mp3     e.g. 8/9/8947470.clip.mp3
                                               (also accepted: <7d_id>.mp3, <7d_id>.clip.wav, <7d_id>.wav)

plus, given by flags:

- ``--id-map FILE``: MSD track id -> 7digital id. Text with two columns ``msd_id`` and
  ``7digital_id`` separated by a TAB, a comma or spaces (a header line is allowed), or a JSON
  object ``{"TRAAAAK128F9318786": 8947470, ...}``. CLMR's ``msd_id_to_7d.pickle`` /
  ``MSD_id_to_7D_id.pkl`` (a pickled dict) is read only with ``--allow-pickle``, because loading a
  pickle runs whatever code the file contains; without the flag such a file is refused with that
  explanation (convert it once to TSV if you prefer).
- tags (optional): ``--train-tags``, ``--valid-tags``, ``--test-tags`` TSV files with one track per
  line, ``<msd_id>\\t[<n floats>]`` (Pons' ``train_gt_msd.tsv`` format; a value >= 0.5 means the
  tag is set), and ``--tag-names FILE`` with the n names (one per line, e.g. ``50tagList.txt``, or a
  Python/JSON list, e.g. Pons' ``output_labels_msd.txt``). ``--tags-dir DIR`` is a shortcut for
  ``DIR/{train,val,test}_gt_msd.tsv`` and ``DIR/output_labels_msd.txt`` (or ``50tagList.txt``).

With tag files: one sample per tag row, in that file's split (``train``, ``valid``, ``test``),
``labels = {"tags": [...]}``; the manifest's ``tags`` spec (multi_hot) is the tag-name list. A row
whose MSD id is not in the id map, whose preview is missing or empty, or that cannot be parsed is
reported as skipped.

Without tag files: every preview found under ``--root`` is one unlabelled sample (``labels = {}``)
in the split ``--unlabelled-split`` (default ``train``), for self-supervised pretraining; the id
map is optional then and only fills in ``msd_id``.

Each sample JSON carries ``msd_id`` (null when unknown) and ``7digital_id`` as top-level fields.
For MSD-scale builds across machines, run ``--slice i/K`` jobs and ``shard-tools merge``.

    shard-tools build msd --root /data/msd/audio --out s3://bucket/msd --mono --sample-rate 22050 \\
        --id-map msd_id_to_7d.tsv --tags-dir splits/msd
"""

from __future__ import annotations

import argparse
import ast
import json
import pickle

from pipeline import fsio

from shard_tools.layout import Root, read_table, read_text, require_dir, require_file
from shard_tools.recipe import Item, Recipe, Skip, make_key

DATASET = "msd"
AUDIO_SUFFIXES = (".clip.mp3", ".mp3", ".clip.wav", ".wav")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".cp", ".cpickle", ".p")
TAG_FILES = {"train": "train_gt_msd.tsv", "valid": "val_gt_msd.tsv", "test": "test_gt_msd.tsv"}
TAG_NAME_FILES = ("output_labels_msd.txt", "50tagList.txt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("msd recipe")
    g.add_argument("--id-map", metavar="FILE", default=None,
                   help="MSD id -> 7digital id map: TSV/CSV or JSON (a pickle only with --allow-pickle); "
                        "required with tag files")
    g.add_argument("--allow-pickle", action="store_true",
                   help="allow --id-map to be a pickle (loading a pickle can run arbitrary code: only for files you trust)")
    g.add_argument("--tags-dir", metavar="DIR", default=None,
                   help="folder with train_gt_msd.tsv, val_gt_msd.tsv, test_gt_msd.tsv and output_labels_msd.txt")
    for split in ("train", "valid", "test"):
        g.add_argument(f"--{split}-tags", metavar="TSV", default=None,
                       help=f"tag file of the {split} split: msd_id<TAB>[multi-hot] per line")
    g.add_argument("--tag-names", metavar="FILE", default=None,
                   help="tag names, one per line or as a list, in the order of the multi-hot vectors")
    g.add_argument("--unlabelled-split", default="train",
                   help="split name for all previews when no tag files are given (default: train)")


def load_id_map(path: str, *, allow_pickle: bool) -> dict[str, str]:
    """MSD id -> 7digital id (both as strings) from a TSV/CSV/whitespace text file, JSON or pickle."""
    require_file(path, "an MSD id -> 7digital id map (TSV/CSV/JSON) given by --id-map")
    lower = path.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise ValueError(
                f"--id-map {path}: this is a pickle, and loading a pickle runs whatever code the file holds. "
                f"If you trust the file, add --allow-pickle; or convert it once to TSV: python -c \"import pickle; "
                f"d = pickle.load(open('{path}', 'rb'), encoding='latin1'); "
                f"print('\\n'.join(f'{{k}}\\t{{v}}' for k, v in d.items()))\" > msd_id_to_7d.tsv")
        # encoding='latin1': the common MSD pickles were written by Python 2 (cPickle)
        raw = pickle.loads(fsio.read_bytes(path), encoding="latin1")  # noqa: S301 - allowed explicitly by --allow-pickle
        if not isinstance(raw, dict):
            raise ValueError(f"--id-map {path}: the pickle holds a {type(raw).__name__}, expected a dict msd_id -> 7digital id")
        return {str(k).strip(): str(v).strip() for k, v in raw.items()}
    if lower.endswith(".json"):
        try:
            raw = json.loads(read_text(path))
        except ValueError as exc:
            raise ValueError(f"--id-map {path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"--id-map {path}: expected a JSON object {{msd_id: 7digital_id}}")
        return {str(k).strip(): str(v).strip() for k, v in raw.items()}
    text = read_text(path)
    first = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in first else "," if "," in first else None
    out: dict[str, str] = {}
    if delimiter is None:
        rows = [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        rows = list(read_table(path, delimiter=delimiter))
    for n, (line, fields) in enumerate(rows):
        if len(fields) < 2:
            raise ValueError(f"--id-map {path} line {line}: expected msd_id and 7digital_id, got {fields}")
        if n == 0 and not fields[1].isdigit():
            continue  # header line
        out[fields[0]] = fields[1]
    return out


def read_tag_names(path: str) -> list[str]:
    """Tag names from one-per-line text, a JSON list, or a file holding a Python list literal."""
    require_file(path, "the tag-name list given by --tag-names")
    text = read_text(path)
    if "[" in text and "]" in text:
        try:
            names = ast.literal_eval(text[text.index("["): text.rindex("]") + 1])
        except (ValueError, SyntaxError):
            raise ValueError(f"--tag-names {path}: holds a '[' but not a valid list literal") from None
        return [str(n) for n in names]
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def find_audio(root: Root, id7: str) -> str:
    """The preview of a 7digital id, relative to the root: the first existing of the accepted
    names (else the first)."""
    folder = f"{id7[0]}/{id7[1]}/" if len(id7) > 1 else f"{id7[0]}/"
    candidates = [folder + id7 + s for s in AUDIO_SUFFIXES]
    return next((c for c in candidates if root.exists(c)), candidates[0])


def _tag_files(args: argparse.Namespace) -> tuple[dict[str, str], str | None]:
    files: dict[str, str] = {}
    names = getattr(args, "tag_names", None)
    tags_dir = getattr(args, "tags_dir", None)
    if tags_dir:
        tags = Root(require_dir(tags_dir, f"the MSD tag files ({', '.join(TAG_FILES.values())}) given by --tags-dir"))
        for split, name in TAG_FILES.items():
            if tags.is_file(name):
                files[split] = tags.path(name)
        if not files:
            raise FileNotFoundError(f"{tags.path(TAG_FILES['train'])}: file not found; --tags-dir needs "
                                    f"at least one of {', '.join(TAG_FILES.values())}")
        if names is None:
            found = [tags.path(n) for n in TAG_NAME_FILES if tags.is_file(n)]
            if not found:
                raise FileNotFoundError(f"{tags.path(TAG_NAME_FILES[0])}: file not found; put the tag names "
                                        f"there (or {TAG_NAME_FILES[1]}) or pass --tag-names")
            names = found[0]
    for split in ("train", "valid", "test"):
        given = getattr(args, f"{split}_tags", None)
        if given:
            files[split] = given
    if files and names is None:
        raise ValueError("tag files given without --tag-names: pass the list of tag names in multi-hot order")
    return files, names


def _parse_multi_hot(text: str, n: int) -> list[int]:
    values = ast.literal_eval(text)
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise ValueError(f"expected a list of {n} numbers")
    return [1 if float(v) >= 0.5 else 0 for v in values]


def prepare(root: str, args: argparse.Namespace) -> Recipe:
    tree = Root(root)
    tag_files, names_path = _tag_files(args)
    id_map_path = getattr(args, "id_map", None)
    if tag_files and not id_map_path:
        raise ValueError("tag files name tracks by MSD id: pass --id-map FILE (MSD id -> 7digital id, TSV/CSV/JSON)")
    id_map = load_id_map(id_map_path, allow_pickle=getattr(args, "allow_pickle", False)) if id_map_path else {}
    if tag_files:
        return _prepare_tagged(tree, tag_files, read_tag_names(names_path), id_map)
    return _prepare_unlabelled(tree, id_map, getattr(args, "unlabelled_split", "train") or "train")


def _prepare_tagged(root: Root, tag_files: dict[str, str], names: list[str], id_map: dict[str, str]) -> Recipe:
    items: list[Item] = []
    skipped: list[Skip] = []
    for split in ("train", "valid", "test"):
        if split not in tag_files:
            continue
        path = require_file(tag_files[split], f"the {split} tag file (msd_id<TAB>[multi-hot] per line)")
        seen: set[str] = set()
        for line, fields in read_table(path, delimiter="\t"):
            where = f"{path}:{line}"
            msd_id = fields[0]
            try:
                if len(fields) < 2:
                    raise ValueError("no multi-hot column")
                flags = _parse_multi_hot(fields[1], len(names))
            except (ValueError, SyntaxError) as exc:
                skipped.append(Skip(where, f"bad tag row: {msd_id} ({exc})"))
                continue
            if msd_id in seen:
                skipped.append(Skip(where, f"duplicate tag row: {msd_id} listed twice in {path.rsplit('/', 1)[-1]}"))
                continue
            seen.add(msd_id)
            id7 = id_map.get(msd_id)
            if not id7:
                skipped.append(Skip(where, f"no 7digital id: {msd_id} is not in --id-map"))
                continue
            rel = find_audio(root, id7)
            if not root.usable(rel, skipped):
                continue
            items.append(Item(path=root.path(rel), source=rel, split=split, id=msd_id,
                              key=make_key(DATASET, msd_id),
                              labels={"tags": [n for n, on in zip(names, flags) if on]},
                              extra={"msd_id": msd_id, "7digital_id": id7}))
    if skipped and not root.found_any:
        raise FileNotFoundError(
            f"none of the previews named by the tag files exist under --root {root.url}; expected "
            f"<7d_id[0]>/<7d_id[1]>/<7d_id>.clip.mp3 there (e.g. {skipped[0].path})")
    return Recipe(dataset=DATASET, items=items, skipped=skipped, root=root.url,
                  labels={"tags": {"kind": "multi_hot", "names": names}},
                  files_in=len({it.path for it in items}) + len(skipped))


def _prepare_unlabelled(root: Root, id_map: dict[str, str], split: str) -> Recipe:
    msd_of: dict[str, str] = {}
    for msd_id, id7 in sorted(id_map.items()):
        msd_of.setdefault(id7, msd_id)  # a preview shared by duplicate MSD tracks: the first id
    by_id: dict[str, list[str]] = {}
    for rel in root.walk():
        name = rel.rsplit("/", 1)[-1]
        low = name.lower()
        suffix = next((s for s in AUDIO_SUFFIXES if low.endswith(s)), None)
        if suffix is not None:
            by_id.setdefault(name[: -len(suffix)], []).append(rel)
    if not by_id:
        raise FileNotFoundError(f"--root {root.url}: no previews found; expected <7d_id[0]>/<7d_id[1]>/<7d_id>.clip.mp3 "
                                f"(or .mp3, .clip.wav) below it")
    items: list[Item] = []
    skipped: list[Skip] = []
    for id7 in sorted(by_id):
        # prefer the names in AUDIO_SUFFIXES order; other copies of the same id are reported
        rels = sorted(by_id[id7], key=lambda p: next(i for i, s in enumerate(AUDIO_SUFFIXES) if p.lower().endswith(s)))
        for extra_copy in rels[1:]:
            skipped.append(Skip(root.path(extra_copy), f"duplicate preview: {rels[0]} has the same 7digital id"))
        rel = rels[0]
        if not root.usable(rel, skipped):
            continue
        items.append(Item(path=root.path(rel), source=rel, split=split, id=msd_of.get(id7, id7),
                          key=make_key(DATASET, id7), labels={},
                          extra={"msd_id": msd_of.get(id7), "7digital_id": id7}))
    return Recipe(dataset=DATASET, items=items, skipped=skipped, root=root.url, labels={},
                  files_in=len(items) + len(skipped))

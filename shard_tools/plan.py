"""``shard-tools plan``: list a corpus once, so that every ``--slice`` reads only its share.

Without a plan each of K slice jobs runs the recipe itself: it lists and stats the whole corpus
(306k NSynth notes, a million MSD previews: K times over, from a bucket), only to keep 1/K of it.
``plan`` runs the recipe once and writes what it found to a plan file (JSON, gzipped when the name
ends in ``.gz``; local or in a bucket); ``build --plan PLAN --slice i/K`` reads the plan instead of
the corpus, so a slice opens only the audio files of its own items.

The plan file (``musicssl-plan/1``) holds the recipe exactly: dataset, label vocabularies,
``files_in``, every item (``recipe.item_record``) and every file the recipe skipped, plus the
recipe's own options (recorded in the manifests, compared by ``merge``) and the command. A build
from a plan writes the same shards as a build that runs the recipe (tests/test_shard_scale.py).
"""

from __future__ import annotations

import gzip
import json

from pipeline import fsio
from shard_tools.recipe import Recipe, Skip, item_from_record, item_record
from shard_tools.report import now_utc
from shard_tools.writer import dumps_json, write_bytes_atomic

PLAN_FORMAT = "musicssl-plan/1"


def write_plan(recipe: Recipe, url: str, *, recipe_options: dict, command: str = "") -> dict:
    """Write ``recipe`` to the plan file ``url``; returns a summary (items per split, skips)."""
    splits: dict[str, int] = {}
    for it in recipe.items:
        splits[it.split] = splits.get(it.split, 0) + 1
    plan = {
        "format": PLAN_FORMAT,
        "dataset": recipe.dataset,
        "root": recipe.root,
        "command": command,
        "created": now_utc(),
        "recipe_options": json.loads(json.dumps(recipe_options, sort_keys=True, default=str)),
        "labels": recipe.labels,
        "files_in": recipe.files_in,
        "splits": dict(sorted(splits.items())),
        "skipped": [[s.path, s.reason] for s in recipe.skipped],
        "items": [item_record(it) for it in recipe.items],
    }
    data = dumps_json(plan)
    if url.endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)  # mtime 0: the same plan, the same bytes
    write_bytes_atomic(url, data)
    return {"url": url, "dataset": recipe.dataset, "items": len(recipe.items), "splits": plan["splits"],
            "skipped": len(recipe.skipped), "bytes": len(data)}


def read_plan(url: str) -> tuple[Recipe, dict]:
    """The recipe in a plan file and the plan's other fields (``recipe_options``, ``root``, ...).

    Raises FileNotFoundError / ValueError naming the file when it is missing or not a plan."""
    try:
        data = fsio.read_bytes(url)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--plan {url}: file not found; write it first with "
                                f"`shard-tools plan <dataset> --root SRC --out {url}`") from exc
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        plan = json.loads(data)
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(f"--plan {url}: not a readable plan file ({exc}); write it again with shard-tools plan") from exc
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"--plan {url}: not a {PLAN_FORMAT} file; write it with `shard-tools plan`")
    recipe = Recipe(dataset=plan["dataset"], items=[item_from_record(r) for r in plan["items"]],
                    skipped=[Skip(p, r) for p, r in plan["skipped"]], labels=plan["labels"],
                    files_in=plan["files_in"], root=plan["root"])
    return recipe, {k: v for k, v in plan.items() if k not in ("items", "skipped")}

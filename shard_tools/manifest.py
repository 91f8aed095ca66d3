"""Reading, finding, merging and summarising split manifests (format in docs/architecture.md §1)."""

from __future__ import annotations

import json
import os
import re

from pipeline import fsio
from pipeline.manifest import MANIFEST_FORMAT as FORMAT
from pipeline.manifest import load_manifest, resolve_shard_url, write_manifest
from shard_tools.build import manifest_name
from shard_tools.report import merge_reports, report_name, split_totals
from shard_tools.lock import BuildLock, lock_name
from shard_tools.writer import write_bytes_atomic

_PARTIAL = re.compile(r"^(?P<split>[A-Za-z0-9_]+)\.manifest\.slice-(?P<i>\d+)-of-(?P<k>\d+)\.json$")
_WHOLE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)\.manifest\.json$")


def read_manifest(url: str) -> dict:
    """A manifest's JSON object, checked by its one reader (``pipeline.manifest``); a slice's empty
    partial manifest is accepted."""
    return load_manifest(url, allow_empty=True).record


def _manifests_in(url: str, names: list[str]) -> list[str]:
    whole = [n for n in names if _WHOLE.match(n)]
    return [fsio.join_url(url, n) for n in (whole or [n for n in names if _PARTIAL.match(n)])]


def find_manifests(url: str) -> list[str]:
    """Manifest URLs for a manifest URL itself, or for a folder: its whole-split manifests (the
    partial ones of ``--slice`` builds only if there are none), else those of its sub-folders one
    level down (e.g. ``demo_shards/nsynth``, ``demo_shards/mtat``)."""
    if url.endswith(".json"):
        return [url]
    url = url.rstrip("/") or "/"
    names = fsio.list_dir(url)
    if not names and not fsio.exists(url):
        raise FileNotFoundError(f"{url}: no such folder; give a shard folder or a <split>.manifest.json URL")
    found = _manifests_in(url, names)
    if not found:
        # dataset folders side by side; names with a dot are files (shards, reports), not folders
        for n in names:
            if "." not in n:
                sub = fsio.join_url(url, n)
                found.extend(_manifests_in(sub, fsio.list_dir(sub)))
    if not found:
        raise FileNotFoundError(f"{url}: no <split>.manifest.json here or one folder down; build it with "
                                f"`shard-tools build` (a split exists only once its manifest is written)")
    return found


def shard_url(manifest_url: str, shard: dict) -> str:
    return resolve_shard_url(manifest_url, shard["url"])


def _abs_folder(url: str) -> str:
    return os.path.abspath(fsio.local_path(url)) if fsio.is_local(url) else url.rstrip("/")


def merge(inputs: list[str], out: str | None = None, *, force_unlock: bool = False) -> dict:
    """Join the partial manifests of ``--slice`` builds into one manifest per split.

    ``inputs`` is a folder URL (all partial manifests in it) or a list of partial manifest URLs;
    every split must have all K slices, built by the same command but for ``--slice``
    (:func:`check_same_build`). Writes ``<split>.manifest.json`` into ``out`` (default: the folder
    of the first partial manifest) and, when every slice's build report is there, a merged
    ``build-report.json``. Returns the merged report (or a summary of the manifests).
    """
    urls = _partial_urls(inputs)
    out = (out or fsio.parent_url(urls[0])).rstrip("/")
    by_split, k = _slices_by_split(urls)
    check_same_build([p for parts in by_split.values() for _, p in sorted(parts.items())])
    # the merged manifests are the whole build's names: hold its lock (a whole build into the
    # same folder would write them too)
    fsio.makedirs(out)
    with BuildLock(out, lock_name(), command="shard-tools merge", force=force_unlock):
        totals = {}
        for split, parts in sorted(by_split.items()):
            merged = _merged_manifest(split, [parts[i] for i in range(k)], out)
            write_manifest(fsio.join_url(out, manifest_name(split)), merged, write=write_bytes_atomic)
            totals[split] = split_totals(merged)
        report = merge_reports(sorted({fsio.parent_url(u) for u in urls}), out, k, totals)
    return report if report is not None else {"splits": totals, "report": None}


def _partial_urls(inputs: list[str]) -> list[str]:
    urls: list[str] = []
    for u in inputs:
        if u.endswith(".json"):
            urls.append(u)
            continue
        names = [n for n in fsio.list_dir(u) if _PARTIAL.match(n)]
        if not names:
            raise FileNotFoundError(f"{u}: no partial manifests (<split>.manifest.slice-<i>-of-<K>.json); "
                                    f"build the slices with `shard-tools build ... --slice i/K --out {u}` first")
        urls.extend(fsio.join_url(u, n) for n in names)
    if not urls:
        raise ValueError("merge: give a shard folder or partial manifest URLs")
    return urls


def _slices_by_split(urls: list[str]) -> tuple[dict[str, dict[int, tuple[str, dict]]], int]:
    """``{split: {slice index: (url, manifest)}}`` and K; refuses duplicates, mixed K, missing slices."""
    by_split: dict[str, dict[int, tuple[str, dict]]] = {}
    counts: set[int] = set()
    for u in urls:
        m = read_manifest(u)
        sl = m.get("slice")
        if not sl:
            raise ValueError(f"{u}: not a partial manifest (no 'slice' field); only --slice builds are merged")
        counts.add(int(sl["count"]))
        prev = by_split.setdefault(m["split"], {}).get(int(sl["index"]))
        if prev is not None:
            raise ValueError(f"slice {sl['index']} of split {m['split']!r} given twice: {prev[0]} and {u}")
        by_split[m["split"]][int(sl["index"])] = (u, m)
    if len(counts) != 1:
        raise ValueError(f"the partial manifests come from builds with different slice counts K: {sorted(counts)}; "
                         f"remove the partial manifests of the older build, or name the ones to merge")
    k = counts.pop()
    for split, parts in sorted(by_split.items()):
        missing = [i for i in range(k) if i not in parts]
        if missing:
            names = ", ".join(manifest_name(split, i, k) for i in missing)
            raise FileNotFoundError(f"split {split!r}: missing slice(s) {missing} of {k} ({names} not found); "
                                    f"run those slices (`shard-tools build ... --slice i/{k}`) before merging")
    return by_split, k


def _merged_manifest(split: str, parts: list[tuple[str, dict]], out: str) -> dict:
    """One split's manifest from its K partial ones (in slice order); shard URLs made absolute when
    a slice lives in another folder than ``out``."""
    first = parts[0][1]
    out_abs = _abs_folder(out)
    shards, rates, chans = [], set(), set()
    for u, m in parts:
        folder = _abs_folder(fsio.parent_url(u))
        shards += [s if folder == out_abs else {**s, "url": fsio.join_url(folder, s["url"])} for s in m["shards"]]
        if m["num_samples"]:
            rates.add(m["sample_rate"])
            chans.add(m["channels"])
    return {
        "format": FORMAT,
        "dataset": first["dataset"],
        "split": split,
        "codec": first["codec"],
        "sample_rate": rates.pop() if len(rates) == 1 else None,
        "channels": chans.pop() if len(chans) == 1 else None,
        "num_samples": sum(s["num_samples"] for s in shards),
        "seconds": round(sum(s["seconds"] for s in shards), 6),
        "shards": shards,
        "labels": first["labels"],
        "build": {**first["build"], "merged_slices": len(parts)},
    }


# build options as command-line flags, for messages; "recipe" holds the recipe's own options
_FLAGS = {"codec": "--codec", "shard_size": "--shard-size", "sample_rate": "--sample-rate", "mono": "--mono",
          "seed": "--seed", "dataset": "the dataset", "format": "the shard format (shard-tools version)"}


def check_same_build(parts: list[tuple[str, dict]]) -> None:
    """Refuse partial manifests that were not built by the same command but for ``--slice``.

    Compares the options recorded in each manifest's ``build.options`` (codec, sample rate, mono,
    seed, shard size, the recipe's own options), the dataset and the label vocabulary against the
    first one; the error names the differing option and the two files. (Manifests written before
    the options were recorded are compared by dataset, codec and labels only.)
    """
    u0, m0 = parts[0]
    for u, m in parts[1:]:
        what = _first_difference(m0, m)
        if what is not None:
            name, a, b = what
            raise ValueError(f"{name} differs between slices: {a!r} in {u0} but {b!r} in {u}; all slices must be "
                             f"built by the same command (only --slice differs): rebuild the odd slice(s) with the "
                             f"options of the others")


def _first_difference(a: dict, b: dict) -> tuple[str, object, object] | None:
    for key in ("dataset", "codec"):
        if a.get(key) != b.get(key):
            return _FLAGS[key], a.get(key), b.get(key)
    oa, ob = (a.get("build") or {}).get("options"), (b.get("build") or {}).get("options")
    if oa is not None and ob is not None:
        for key in sorted(set(oa) | set(ob)):
            if key == "recipe":
                ra, rb = oa.get(key) or {}, ob.get(key) or {}
                for opt in sorted(set(ra) | set(rb)):
                    if ra.get(opt) != rb.get(opt):
                        return f"--{opt.replace('_', '-')}", ra.get(opt), rb.get(opt)
            elif oa.get(key) != ob.get(key):
                return _FLAGS.get(key, key), oa.get(key), ob.get(key)
    if a.get("labels") != b.get("labels"):
        return "the label vocabulary", "(see the manifest)", "(another one)"
    return None


def info_text(url: str) -> str:
    """A one-screen description of a shard folder or manifest: splits, counts, hours, labels
    (one block per dataset folder when given a folder of dataset folders)."""
    by_folder: dict[str, list[tuple[str, dict]]] = {}
    for u in find_manifests(url):
        by_folder.setdefault(fsio.parent_url(u), []).append((u, read_manifest(u)))
    blocks = [_info_block(folder, manifests, show_report=not url.endswith(".json"))
              for folder, manifests in sorted(by_folder.items())]
    return "\n".join(blocks)


def _info_block(folder: str, manifests: list[tuple[str, dict]], show_report: bool) -> str:
    first = manifests[0][1]
    datasets = sorted({m["dataset"] for _, m in manifests})
    lines = [f"{folder}   dataset {', '.join(datasets)}   codec {first['codec']}"]
    lines.append(f"  {'split':<24} {'samples':>9} {'hours':>9} {'shards':>7} {'GB':>9}  sr      ch")
    tot = [0, 0.0, 0, 0]
    for _, m in sorted(manifests, key=lambda x: (x[1]["split"], (x[1].get("slice") or {}).get("index", 0))):
        nbytes = sum(s["bytes"] for s in m["shards"])
        name = m["split"] + (f" (slice {m['slice']['index']}/{m['slice']['count']})" if m.get("slice") else "")
        lines.append(f"  {name:<24} {m['num_samples']:>9} {m['seconds'] / 3600:>9.3f} {len(m['shards']):>7} "
                     f"{nbytes / 1e9:>9.3f}  {str(m['sample_rate']):<7} {m['channels']}")
        tot[0] += m["num_samples"]
        tot[1] += m["seconds"]
        tot[2] += len(m["shards"])
        tot[3] += nbytes
    lines.append(f"  {'total':<24} {tot[0]:>9} {tot[1] / 3600:>9.3f} {tot[2]:>7} {tot[3] / 1e9:>9.3f}")
    labels = first.get("labels") or {}
    if labels:
        lines.append("  labels:")
        for field, spec in labels.items():
            names = spec.get("names", [])
            shown = ", ".join(str(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
            lines.append(f"    {field:<24} {spec.get('kind', '?'):<9} {len(names):>4} names: {shown}")
    else:
        lines.append("  labels: none (unlabelled)")
    rep_url = fsio.join_url(folder, report_name())
    if show_report and fsio.exists(rep_url):
        rep = json.loads(fsio.read_bytes(rep_url))
        reasons = list(rep.get("skipped_by_reason", {}).items())[:4]
        lines.append(f"  build: {rep['files_in']} files in, {rep['samples_written']} samples, "
                     f"{len(rep['files_skipped'])} files skipped"
                     + (" (" + ", ".join(f"{n} {r}" for r, n in reasons) + ")" if reasons else ""))
    b = first.get("build") or {}
    if b.get("command"):
        lines.append(f"  built by: {b['command']}  ({b.get('created', '')})")
    return "\n".join(lines)


__all__ = ["read_manifest", "find_manifests", "shard_url", "merge", "check_same_build", "info_text"]

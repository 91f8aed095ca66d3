"""Reading, finding, merging and summarising split manifests (format in docs/architecture.md §1)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter

from pipeline import fsio
from pipeline.manifest import MANIFEST_FORMAT as FORMAT
from pipeline.manifest import load_manifest, resolve_shard_url, write_manifest
from shard_tools.build import dumps_json, format_summary, manifest_name, reason_kind, report_name
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


def merge(inputs: list[str], out: str | None = None) -> dict:
    """Join the partial manifests of ``--slice`` builds into one manifest per split.

    ``inputs`` is a folder URL (all partial manifests in it) or a list of partial manifest URLs;
    every split must have all K slices. Writes ``<split>.manifest.json`` into ``out`` (default: the
    folder of the first partial manifest) and, when every slice's build report is there, a merged
    ``build-report.json``. Returns the merged report (or a summary of the manifests).
    """
    urls: list[str] = []
    for u in inputs:
        if u.endswith(".json"):
            urls.append(u)
        else:
            names = [n for n in fsio.list_dir(u) if _PARTIAL.match(n)]
            if not names:
                raise FileNotFoundError(f"{u}: no partial manifests (<split>.manifest.slice-<i>-of-<K>.json); "
                                        f"build the slices with `shard-tools build ... --slice i/K --out {u}` first")
            urls.extend(fsio.join_url(u, n) for n in names)
    if not urls:
        raise ValueError("merge: give a shard folder or partial manifest URLs")
    out = (out or fsio.parent_url(urls[0])).rstrip("/")
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
    out_abs = _abs_folder(out)
    totals = {}
    for split, parts in sorted(by_split.items()):
        first = parts[0][1]
        shards = []
        rates, chans = set(), set()
        for i in range(k):
            u, m = parts[i]
            if m["labels"] != first["labels"] or m["dataset"] != first["dataset"] or m["codec"] != first["codec"]:
                raise ValueError(f"{u}: dataset, codec or label vocabulary differs from {parts[0][0]}; "
                                 f"all slices must be built by the same command (only --slice differs)")
            folder = _abs_folder(fsio.parent_url(u))
            for s in m["shards"]:
                s = dict(s)
                if folder != out_abs:
                    s["url"] = fsio.join_url(folder, s["url"])
                shards.append(s)
            if m["num_samples"]:
                rates.add(m["sample_rate"])
                chans.add(m["channels"])
        merged = {
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
            "build": {**first["build"], "merged_slices": k},
        }
        write_manifest(fsio.join_url(out, manifest_name(split)), merged, write=write_bytes_atomic)
        totals[split] = {"samples": merged["num_samples"], "seconds": merged["seconds"],
                         "hours": round(merged["seconds"] / 3600, 4), "shards": len(shards),
                         "bytes": sum(s["bytes"] for s in shards)}
    return _merge_reports(urls, out, k, totals)


def _merge_reports(urls: list[str], out: str, k: int, totals: dict) -> dict:
    folders = sorted({fsio.parent_url(u) for u in urls})
    reports = []
    for i in range(k):
        found = None
        for folder in folders:
            u = fsio.join_url(folder, report_name(i, k))
            if fsio.exists(u):
                found = json.loads(fsio.read_bytes(u))
                break
        reports.append(found)
    if any(r is None for r in reports):
        missing = [report_name(i, k) for i, r in enumerate(reports) if r is None]
        print(f"[shard-tools merge] build reports not found ({', '.join(missing)}); manifests merged, no merged report")
        return {"splits": totals, "report": None}
    skipped = [s for r in reports for s in r["files_skipped"]]
    seconds = sum(v["seconds"] for v in totals.values())
    wall = sum(r["wall_seconds"] for r in reports)
    merged = {
        "dataset": reports[0]["dataset"],
        "out": out,
        "command": reports[0]["command"],
        "slice": {"index": 0, "count": 1},
        "merged_slices": k,
        "files_in": sum(r["files_in"] for r in reports),
        "files_written": sum(r["files_written"] for r in reports),
        "samples_written": sum(r["samples_written"] for r in reports),
        "files_skipped": skipped,
        "skipped_by_reason": dict(Counter(reason_kind(s["reason"]) for s in skipped).most_common()),
        "segments_skipped": [s for r in reports for s in r.get("segments_skipped", [])],
        "splits": totals,
        "seconds": round(seconds, 3),
        "hours": round(seconds / 3600, 4),
        "bytes": sum(v["bytes"] for v in totals.values()),
        "shards": sum(v["shards"] for v in totals.values()),
        # slices may have run one after another or side by side; this is their summed time
        "wall_seconds": round(wall, 3),
        "audio_hours_per_hour": round(seconds / wall, 2) if wall > 0 else None,
    }
    write_bytes_atomic(fsio.join_url(out, report_name()),
                            dumps_json(merged, indent=1))
    return merged


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


__all__ = ["read_manifest", "find_manifests", "shard_url", "merge", "info_text", "format_summary"]

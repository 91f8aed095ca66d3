"""The build report ``build-report.json``: assembled here, for a build and for ``merge`` alike.

A report says what happened to every input file: ``files_in == files_written +
len(files_skipped)``, each skip with its reason (a file that wrote some of its segments counts as
written; its failed segments are in ``segments_skipped``), per-split totals, hours, bytes, wall
time and throughput, and the options of the build. ``merge`` joins the K slice reports into one of
the same schema, so a merged build reads like a whole one. Schema: docs/architecture.md §1.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone

from pipeline import fsio
from shard_tools.writer import dumps_json, write_bytes_atomic

# the build options a report repeats (from the build's options; a merged report from its slices')
OPTION_FIELDS = ("codec", "sample_rate", "mono", "seed", "shard_size", "recipe_options")


def report_name(slice_index: int = 0, num_slices: int = 1) -> str:
    return f"build-report.slice-{slice_index}-of-{num_slices}.json" if num_slices > 1 else "build-report.json"


def reason_kind(reason: str) -> str:
    """The category of a skip reason (the text before the first colon), for the summary."""
    return reason.split(":", 1)[0].strip()


def split_totals(manifest: dict) -> dict:
    """A split's line in the report, from its manifest."""
    return {"samples": manifest["num_samples"], "seconds": manifest["seconds"],
            "hours": round(manifest["seconds"] / 3600, 4), "shards": len(manifest["shards"]),
            "bytes": sum(s["bytes"] for s in manifest["shards"])}


def now_utc() -> str:
    """The time stamp reports and manifests carry (UTC, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def assemble(*, dataset: str, out: str, command: str, slice_: tuple[int, int], files_written: int,
             files_skipped: list[dict], segments_skipped: list[dict], splits: dict[str, dict], wall: float,
             processed_seconds: float, **fields) -> dict:
    """A report from its counts. ``processed_seconds``: audio this run decoded (not shards a resume
    kept), for ``audio_hours_per_hour``; ``fields``: the rest (options, fingerprint, ...)."""
    seconds = sum(v["seconds"] for v in splits.values())
    return {
        "dataset": dataset,
        "out": out,
        "command": command,
        "slice": {"index": slice_[0], "count": slice_[1]},
        "files_in": files_written + len(files_skipped),
        "files_written": files_written,
        "samples_written": sum(v["samples"] for v in splits.values()),
        "files_skipped": files_skipped,
        "skipped_by_reason": dict(Counter(reason_kind(s["reason"]) for s in files_skipped).most_common()),
        "segments_skipped": segments_skipped,
        "splits": splits,
        "seconds": round(seconds, 3),
        "hours": round(seconds / 3600, 4),
        "bytes": sum(v["bytes"] for v in splits.values()),
        "shards": sum(v["shards"] for v in splits.values()),
        "wall_seconds": round(wall, 3),
        "audio_hours_per_hour": round(processed_seconds / wall, 2) if wall > 0 else None,
        **fields,
        "created": now_utc(),
    }


def skips_by_file(plan: dict[str, list], item_skips: list[dict], recipe_skips: list) -> tuple[int, list[dict], list[dict]]:
    """``(files_written, files_skipped, segments_skipped)`` of a build: a source may give several
    samples (segments) and counts as written if any of them was."""
    failed = {(s["split"], s["index"]) for s in item_skips}
    written: set[str] = set()
    for split, items in plan.items():
        written.update(item.path for idx, item in enumerate(items) if (split, idx) not in failed)
    segments, failed_files = [], {}
    for s in sorted(item_skips, key=lambda s: (s["split"], s["index"])):
        if s["path"] in written:
            segments.append({"path": s["path"], "key": s["key"], "reason": s["reason"]})
        else:
            failed_files.setdefault(s["path"], {"path": s["path"], "reason": s["reason"]})
    files_skipped = [{"path": s.path, "reason": s.reason} for s in recipe_skips] + list(failed_files.values())
    return len(written), files_skipped, segments


def merge_reports(folders: list[str], out: str, k: int, splits: dict[str, dict]) -> dict | None:
    """Join the K slice reports found in ``folders`` into ``out/build-report.json``; None (and a
    note) when one is missing. ``splits``: the merged manifests' totals."""
    reports = []
    for i in range(k):
        urls = [fsio.join_url(f, report_name(i, k)) for f in folders]
        found = next((u for u in urls if fsio.exists(u)), None)
        reports.append(json.loads(fsio.read_bytes(found)) if found else None)
    if any(r is None for r in reports):
        missing = [report_name(i, k) for i, r in enumerate(reports) if r is None]
        print(f"[shard-tools merge] build reports not found ({', '.join(missing)}); manifests merged, no merged report")
        return None
    first = reports[0]
    wall = sum(r["wall_seconds"] for r in reports)  # slices may have run side by side: their summed time
    merged = assemble(
        dataset=first["dataset"], out=out, command=first["command"], slice_=(0, 1),
        files_written=sum(r["files_written"] for r in reports),
        files_skipped=[s for r in reports for s in r["files_skipped"]],
        segments_skipped=[s for r in reports for s in r.get("segments_skipped", [])],
        splits=splits, wall=wall,
        processed_seconds=sum((r["audio_hours_per_hour"] or 0) * r["wall_seconds"] for r in reports),
        merged_slices=k,
        shards_kept_from_earlier_run=sum(r.get("shards_kept_from_earlier_run", 0) for r in reports),
        **{f: first.get(f) for f in OPTION_FIELDS}, workers=first.get("workers"))
    write_bytes_atomic(fsio.join_url(out, report_name()), dumps_json(merged, indent=1))
    return merged


def format_summary(report: dict) -> str:
    """The one-screen summary printed after a build or a merge."""
    sl = report.get("slice") or {"index": 0, "count": 1}
    lines = [
        "",
        f"shard-tools build: {report['dataset']} -> {report['out']}"
        + (f"  (slice {sl['index']}/{sl['count']})" if sl["count"] > 1 else "")
        + (f"  (merged from {report['merged_slices']} slices)" if report.get("merged_slices") else ""),
        f"  files in         {report['files_in']:>10}",
        f"  files written    {report['files_written']:>10}",
        f"  samples written  {report['samples_written']:>10}",
        f"  files skipped    {len(report['files_skipped']):>10}",
    ]
    for reason, n in list(report.get("skipped_by_reason", {}).items())[:8]:
        lines.append(f"      {n:>6}  {reason}")
    if report.get("segments_skipped"):
        lines.append(f"  segments skipped {len(report['segments_skipped']):>10}  (in files that wrote other segments)")
    lines.append(f"  audio            {report['hours']:>10.3f} h")
    lines.append(f"  shards           {report['shards']:>10}" + (
        f"  ({report['shards_kept_from_earlier_run']} kept from an interrupted run)"
        if report.get("shards_kept_from_earlier_run") else ""))
    lines.append(f"  bytes            {report['bytes']:>10}  ({report['bytes'] / 1e9:.3f} GB)")
    for split, s in report["splits"].items():
        lines.append(f"    {split:<12} {s['samples']:>8} samples {s['hours']:>9.3f} h {s['shards']:>5} shards")
    if report.get("audio_hours_per_hour") is not None:
        lines.append(f"  wall time        {report['wall_seconds']:>10.1f} s   "
                     f"({report['audio_hours_per_hour']:.0f} audio-hours per hour)")
    if report.get("removed_unlisted"):
        lines.append(f"  removed {len(report['removed_unlisted'])} file(s) of an earlier build into this --out that "
                     f"no manifest lists any more")
    if report.get("unlisted_left"):
        lines.append(f"  left alone: {', '.join(report['unlisted_left'])} (another build's; "
                     f"`shard-tools verify` lists the shards no manifest lists)")
    if report.get("warning"):
        lines.append(f"  warning: {report['warning']}")
    if report["files_skipped"]:
        lines.append(f"  every skipped file and its reason: {fsio.join_url(report['out'], report_name(sl['index'], sl['count']))}")
    return "\n".join(lines)

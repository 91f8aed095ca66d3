"""The generic shard builder: a :class:`~shard_tools.recipe.Recipe` in, tar shards + manifests out.

Pipeline, per split (splits in sorted order)::

    recipe items -> slice (--slice i/K) -> sort by key -> shuffle(--seed, split)
      -> process pool: decode (soundfile; segments read only their span) -> mono -> resample -> encode
      -> main process, in plan order: append to the current shard; close it once >= --shard-size
      -> publish shard (temp file, then rename / single upload) -> record it in the progress file
    -> <split>.manifest.json (atomic, last) ... -> build-report.json

Determinism: the plan (item order) is a pure function of the recipe, the slice and the seed; the
main process consumes worker results in plan order, and a shard is closed right after the first
sample that brings it to ``shard_size`` bytes. Shard contents therefore depend only on the inputs
and the encoded bytes, never on worker count or timing, and a rebuild is byte-identical.

Resume: after each published shard the builder atomically rewrites a small progress file
(``.build-progress.json`` in the output folder) holding every finished shard's item range, size,
sha256 and the items skipped inside that range. A re-run of the same command (same inputs and
options, checked by a fingerprint) keeps the finished shards that are still present with the
recorded size and restarts right after the last one. Since the cut points are a function of the
sequence, the redone tail comes out exactly as an uninterrupted build would have written it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import re
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import soundfile as sf

from pipeline import fsio
from pipeline.audio import encode_audio, resample, to_mono
from pipeline.manifest import MANIFEST_FORMAT, write_manifest
from shard_tools.recipe import Item, Recipe, Skip
from shard_tools.writer import ShardWriter, write_bytes_atomic

FORMAT = MANIFEST_FORMAT  # the manifest's owner is pipeline.manifest
_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_SPLIT_RE = re.compile(r"[A-Za-z0-9_]+")
CODECS = ("flac", "wav")


# ----------------------------------------------------------------------------------------------
# names


def slice_suffix(slice_index: int, num_slices: int) -> str:
    return f".slice-{slice_index}-of-{num_slices}" if num_slices > 1 else ""


def shard_name(split: str, index: int, slice_index: int = 0, num_slices: int = 1) -> str:
    if num_slices > 1:
        return f"{split}-s{slice_index:03d}of{num_slices:03d}-{index:06d}.tar"
    return f"{split}-{index:06d}.tar"


def manifest_name(split: str, slice_index: int = 0, num_slices: int = 1) -> str:
    return f"{split}.manifest{slice_suffix(slice_index, num_slices)}.json"


def report_name(slice_index: int = 0, num_slices: int = 1) -> str:
    return f"build-report{slice_suffix(slice_index, num_slices)}.json"


def progress_name(slice_index: int = 0, num_slices: int = 1) -> str:
    return f".build-progress{slice_suffix(slice_index, num_slices)}.json"


def stable_hash(text: str) -> int:
    """A hash of a string that is the same in every process and on every machine (not ``hash()``)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def reason_kind(reason: str) -> str:
    """The category of a skip reason (the text before the first colon), for the summary."""
    return reason.split(":", 1)[0].strip()


# ----------------------------------------------------------------------------------------------
# worker side: decode -> mono -> resample -> encode, one item at a time


class SkipItem(Exception):
    """An item that cannot be written; the message is the reason reported."""


@dataclass(frozen=True)
class _Convert:
    dataset: str
    codec: str
    sample_rate: int | None
    mono: bool


def _declared_wav_shortfall(info: str) -> bool:
    """True when libsndfile notes that a WAV's data chunk is shorter than its header declares.

    libsndfile reports e.g. ``data : 32000 (should be 15978)``; streaming writers leave the size 0
    or 0xFFFFFFFF, which is not truncation.
    """
    for line in info.splitlines():
        line = line.strip()
        if line.startswith("data :") and "(should be" in line:
            try:
                declared = int(line.split(":", 1)[1].split("(")[0].strip())
                actual = int(line.split("(should be", 1)[1].rstrip(") "))
            except ValueError:
                continue
            if 0 < declared < 0xFFFFFFF0 and actual < declared:
                return True
    return False


def _read_item(item: Item) -> tuple[np.ndarray, int]:
    """Decode an item's audio (only its span for segments) to float32 ``(channels, frames)``."""
    try:
        size = os.path.getsize(item.path)
    except OSError as exc:
        raise SkipItem(f"missing file: {exc.strerror or exc}") from exc
    if size == 0:
        raise SkipItem("empty file: 0 bytes")
    try:
        with sf.SoundFile(item.path) as f:
            sr, total, fmt = int(f.samplerate), int(f.frames), f.format
            if f.format == "WAV" and _declared_wav_shortfall(f.extra_info):
                raise SkipItem("truncated: WAV data chunk shorter than its header declares")
            if item.segment is not None:
                start = max(0, int(round(item.segment[0] * sr)))
                stop = int(round(item.segment[1] * sr))
                if total > 0 and start >= total:
                    raise SkipItem(f"segment beyond end of file: starts at {item.segment[0]:.2f} s, file has {total / sr:.2f} s")
                if start:
                    f.seek(start)
                want = stop - start
                audio = f.read(want, dtype="float32", always_2d=True)
                expected = min(stop, total) - start if total > 0 else want
            else:
                audio = f.read(dtype="float32", always_2d=True)
                expected = total
    except SkipItem:
        raise
    except Exception as exc:  # LibsndfileError, RuntimeError, TypeError from odd headers
        raise SkipItem(f"not decodable audio: unknown format or corrupt data (libsndfile: {exc})") from exc
    got = audio.shape[0]
    if got == 0:
        raise SkipItem("no audio frames: the file decodes to zero samples")
    # A header promising more frames than the stream holds means a cut-off download. An MP3's
    # frame count is an estimate (exact with a Xing/LAME header, file size / bitrate without one,
    # which is off for VBR), so only a large shortfall counts there.
    slack = 0.10 if fmt == "MP3" else 0.02
    if expected > 0 and got < expected - max(4096, int(slack * expected)):
        raise SkipItem(f"truncated: header says {expected} frames, only {got} decode")
    if not np.isfinite(audio).all():
        raise SkipItem("non-finite samples: NaN or Inf in the decoded audio")
    return np.ascontiguousarray(audio.T), sr


def process_item(item: Item, conv: _Convert) -> tuple:
    """Worker entry point. Returns ``("ok", audio_bytes, json_bytes, seconds, sr, channels)`` or
    ``("skip", reason)``; never raises for a bad file."""
    try:
        audio, sr = _read_item(item)
        if conv.mono:
            audio = to_mono(audio)
        if conv.sample_rate and sr != conv.sample_rate:
            audio = resample(audio, sr, conv.sample_rate)
            sr = conv.sample_rate
        try:
            data = encode_audio(audio, sr, conv.codec)
        except Exception as exc:  # e.g. FLAC cannot hold > 8 channels
            raise SkipItem(f"encode failed: {exc}") from exc
        channels, frames = audio.shape
        meta: dict = {
            "key": item.key,
            "dataset": conv.dataset,
            "split": item.split,
            "id": item.id,
            "source": item.source,
            "sample_rate": sr,
            "num_samples": int(frames),
            "channels": int(channels),
        }
        if item.segment is not None:
            meta["segment"] = [float(item.segment[0]), float(item.segment[1])]
        meta["labels"] = item.labels
        for k, v in item.extra.items():
            meta.setdefault(k, v)
        return ("ok", data, dumps_json(meta), frames / sr, sr, int(channels))
    except SkipItem as exc:
        return ("skip", str(exc))
    except MemoryError:
        return ("skip", "out of memory: file too large to decode in one piece")
    except Exception as exc:  # noqa: BLE001 - one odd file must not stop a day-long build
        return ("skip", f"unexpected error: {type(exc).__name__}: {exc}")


def dumps_json(obj, indent: int | None = None) -> bytes:
    """UTF-8 JSON; falls back to ASCII escapes when a value holds undecodable file-name bytes
    (surrogate escapes from ``os.walk``), which UTF-8 cannot carry."""
    try:
        return json.dumps(obj, ensure_ascii=False, indent=indent).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, indent=indent).encode("ascii")


def _ping() -> bool:
    return True


def pool_context() -> mp.context.BaseContext:
    """Start method for worker pools: forkserver where available, else spawn; never plain fork.

    The parent may hold threads (s3fs's event loop, tqdm's monitor) whose locks a forked child
    would inherit in a taken state. A forkserver is a fresh single-threaded process that imports
    the decoding stack once (numpy, soundfile, scipy.signal: seconds per process) and forks each
    worker from there, so N workers start about as fast as one.
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["shard_tools.build", "scipy.signal"])  # a hint; failures are ignored
        return ctx
    return mp.get_context("spawn")


class _Processor:
    """Runs ``process_item`` over items, yielding results in input order.

    With ``workers > 1`` a process pool works ahead within a bounded window (bounded memory);
    results are still consumed strictly in order, which is what makes the output independent of
    timing. A worker killed by a crashing decoder is replaced and the item that killed it is
    retried alone once, then reported as skipped.
    """

    def __init__(self, conv: _Convert, workers: int, fn=process_item):
        self.conv = conv
        self.workers = workers
        self.fn = fn  # a module-level function (spawned workers import it by name)
        self._pool: ProcessPoolExecutor | None = None

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=pool_context())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _retry_alone(self, item: Item) -> tuple:
        self.close()
        with ProcessPoolExecutor(1, mp_context=pool_context()) as solo:
            try:
                solo.submit(_ping).result()
            except BrokenProcessPool:
                # not the file's fault: workers die before any work (e.g. a script that calls
                # build_dataset without an `if __name__ == "__main__":` guard)
                raise RuntimeError("shard builder: worker processes die on start-up; run with --workers 1 to see "
                                   "why, and guard scripts that call build_dataset with "
                                   "`if __name__ == \"__main__\":`") from None
            try:
                return solo.submit(self.fn, item, self.conv).result()
            except BrokenProcessPool:
                return ("skip", "decoder crashed: the worker process died while decoding this file")

    def run(self, items: list[Item]) -> Iterator[tuple]:
        if self.workers <= 1:
            for item in items:
                yield self.fn(item, self.conv)
            return
        ahead = self.workers * 4
        nxt = 0
        window: deque = deque()
        while nxt < len(items) or window:
            if self._pool is None:
                self._pool = self._new_pool()
            while nxt < len(items) and len(window) < ahead:
                window.append((nxt, self._pool.submit(self.fn, items[nxt], self.conv)))
                nxt += 1
            i, fut = window.popleft()
            try:
                res = fut.result()
            except BrokenProcessPool:
                # every future in flight failed with the pool; the head item is retried alone, the
                # rest are resubmitted to a fresh pool (the culprit ends up alone at the head)
                res = self._retry_alone(items[i])
                window.clear()
                nxt = i + 1
            yield res


# ----------------------------------------------------------------------------------------------
# plan


def _item_record(item: Item) -> list:
    return [item.split, item.key, item.path, item.source, item.id, item.labels,
            list(item.segment) if item.segment is not None else None, item.extra]


def plan_items(recipe: Recipe, *, seed: int, slice_index: int, num_slices: int) -> dict[str, list[Item]]:
    """The build plan: per split, this slice's items in the order they are written.

    A pure function of the recipe, the seed and the slice (never of the recipe's listing order):
    items are sorted by key, then shuffled with a generator seeded by ``seed`` and the split name,
    so shards mix sources. Slices are assigned by a stable hash of the source path, so all
    segments of one file land in the same slice.
    """
    by_split: dict[str, list[Item]] = {}
    for item in recipe.items:
        by_split.setdefault(item.split, []).append(item)
    plan: dict[str, list[Item]] = {}
    for split in sorted(by_split):
        if not _SPLIT_RE.fullmatch(split):
            raise ValueError(f"recipe {recipe.dataset!r} produced the split name {split!r}; split names become "
                             f"file names and must match [A-Za-z0-9_]+")
        items = sorted(by_split[split], key=lambda it: it.key)
        bad = next((it for it in items if not _KEY_RE.fullmatch(it.key)), None)
        if bad is not None:
            raise ValueError(f"recipe {recipe.dataset!r} produced the key {bad.key!r} ({bad.source}); keys must match "
                             f"[A-Za-z0-9_-]+ (no dots: webdataset splits at the first dot), see recipe.make_key")
        for a, b in zip(items, items[1:]):
            if a.key == b.key:
                raise ValueError(
                    f"recipe {recipe.dataset!r} produced the key {a.key!r} twice in split {split!r} "
                    f"({a.source} and {b.source}); keys must be unique within a split")
        if num_slices > 1:
            items = [it for it in items if stable_hash(it.source) % num_slices == slice_index]
        random.Random(f"{seed}:{split}").shuffle(items)
        plan[split] = items
    return plan


def _fingerprint(recipe: Recipe, plan: dict[str, list[Item]], options: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(options, sort_keys=True).encode())
    h.update(json.dumps(recipe.labels, sort_keys=True, default=str).encode())
    for split, items in plan.items():
        h.update(split.encode())
        for item in items:
            h.update(json.dumps(_item_record(item), sort_keys=True, default=str).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# build


def _read_json(url: str) -> dict | None:
    if not fsio.exists(url):
        return None
    try:
        return json.loads(fsio.read_bytes(url))
    except (ValueError, OSError):
        return None


def _shard_present(url: str, nbytes: int) -> bool:
    if fsio.is_local(url):
        p = fsio.local_path(url)
        return os.path.isfile(p) and os.path.getsize(p) == nbytes
    fs, path = fsio.fs_and_path(url)
    try:
        fs.invalidate_cache(path)
        return int(fsio.with_retries(lambda: fs.info(path), what=url)["size"]) == nbytes
    except FileNotFoundError:
        return False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_dataset(recipe: Recipe, out_url: str, *, codec: str = "flac", shard_size: int = 256_000_000,
                  sample_rate: int | None = None, mono: bool = False, workers: int = 1, seed: int = 0,
                  slice_index: int = 0, num_slices: int = 1, progress: bool = True,
                  command: str = "") -> dict:
    """Write ``recipe`` as shards + manifests under ``out_url``; returns the build report.

    The report (also written to ``build-report.json``, or ``build-report.slice-<i>-of-<K>.json``
    for a slice) holds ``files_in``, ``files_written``, ``samples_written``, ``files_skipped``
    (every skipped file with its reason), per-split counts, hours, bytes, wall time and
    audio-hours per hour. Re-running an interrupted build with the same arguments resumes it; a
    re-run of a finished build returns its report without rewriting anything.
    """
    if codec not in CODECS:
        raise ValueError(f"--codec must be one of {', '.join(CODECS)}, got {codec!r}")
    if shard_size <= 0:
        raise ValueError(f"--shard-size must be positive, got {shard_size}")
    if num_slices < 1 or not 0 <= slice_index < num_slices:
        raise ValueError(f"--slice must be i/K with 0 <= i < K, got {slice_index}/{num_slices}")
    if sample_rate is not None and sample_rate <= 0:
        raise ValueError(f"--sample-rate must be positive, got {sample_rate}")
    t0 = time.time()
    out_url = out_url.rstrip("/") or "/"
    fsio.makedirs(out_url)

    plan = plan_items(recipe, seed=seed, slice_index=slice_index, num_slices=num_slices)
    recipe_skips = [s for s in recipe.skipped
                    if num_slices == 1 or stable_hash(s.path) % num_slices == slice_index]
    options = {"format": FORMAT, "dataset": recipe.dataset, "codec": codec, "shard_size": shard_size,
               "sample_rate": sample_rate, "mono": mono, "seed": seed,
               "slice": [slice_index, num_slices]}
    fingerprint = _fingerprint(recipe, plan, options)
    # A sliced build writes a (possibly empty) partial manifest for every split of the whole
    # dataset, so that merge can tell a slice with no items of a split from a missing slice.
    splits = sorted({it.split for it in recipe.items}) if num_slices > 1 else sorted(plan)

    report_url = fsio.join_url(out_url, report_name(slice_index, num_slices))
    progress_url = fsio.join_url(out_url, progress_name(slice_index, num_slices))
    done_report = _read_json(report_url)
    if (done_report is not None and done_report.get("fingerprint") == fingerprint
            and all(fsio.exists(fsio.join_url(out_url, manifest_name(s, slice_index, num_slices))) for s in splits)):
        if progress:
            print(f"[shard-tools] {out_url}: already built with the same inputs and options; nothing to do")
        fsio.remove(progress_url)  # a kill right after the report leaves it behind
        done_report["up_to_date"] = True
        return done_report

    state = _read_json(progress_url)
    if state is not None and state.get("fingerprint") != fingerprint:
        if progress:
            print(f"[shard-tools] {progress_url} belongs to a build with other inputs or options; starting over")
        state = None
    if state is None:
        state = {"fingerprint": fingerprint, "splits": {}}

    conv = _Convert(recipe.dataset, codec, sample_rate, mono)
    processor = _Processor(conv, workers)
    total_items = sum(len(v) for v in plan.values())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_items, unit="file", desc=f"{recipe.dataset} -> shards", dynamic_ncols=True)
    kept_shards = 0
    new_seconds = 0.0
    split_stats: dict[str, dict] = {}
    item_skips: list[dict] = []  # {"split", "index", "reason"} per item that wrote nothing
    try:
        for split in splits:
            items = plan.get(split, [])
            st = state["splits"].setdefault(split, {"shards": [], "done": False, "tail_skips": []})
            # keep the finished shards that are still there, up to the first one that is not
            kept = []
            for rec in st["shards"]:
                if not _shard_present(fsio.join_url(out_url, rec["url"]), rec["bytes"]):
                    break
                kept.append(rec)
            if len(kept) < len(st["shards"]) or not st["done"]:
                st["done"] = False
                st["tail_skips"] = []
            st["shards"] = kept
            kept_shards += len(kept)
            start = kept[-1]["end"] if kept else 0
            if bar is not None:
                bar.update(start if not st["done"] else len(items))
            if not st["done"]:
                # a manifest left by an earlier build with other options would describe shards
                # about to be overwritten: the split does not exist until its new manifest does
                fsio.remove(fsio.join_url(out_url, manifest_name(split, slice_index, num_slices)))
                new_seconds += _write_split(split, items, start, st, state, processor, out_url, progress_url,
                                            shard_size, codec, slice_index, num_slices, bar)
            for rec in st["shards"]:
                for s in rec["skips"]:
                    item_skips.append({"split": split, **s})
            for s in st["tail_skips"]:
                item_skips.append({"split": split, **s})
            split_stats[split] = _write_manifest(split, st, recipe, out_url, codec, seed, command,
                                                 slice_index, num_slices)
    finally:
        processor.close()
        if bar is not None:
            bar.close()

    report = _make_report(recipe, plan, recipe_skips, item_skips, split_stats, out_url=out_url,
                          fingerprint=fingerprint, options=options, command=command, workers=workers,
                          wall=time.time() - t0, kept_shards=kept_shards, new_seconds=new_seconds)
    write_bytes_atomic(report_url, dumps_json(report, indent=1))
    fsio.remove(progress_url)
    if progress:
        print(format_summary(report))
    return report


def _write_split(split: str, items: list[Item], start: int, st: dict, state: dict, processor: _Processor,
                 out_url: str, progress_url: str, shard_size: int, codec: str, slice_index: int,
                 num_slices: int, bar) -> float:
    """Write the shards of one split from item ``start`` on; returns seconds of audio written."""
    writer: ShardWriter | None = None
    first = start
    skips: list[dict] = []
    seconds = 0.0
    rates: set = set()
    chans: set = set()

    def close(end: int) -> None:
        nonlocal writer, skips, first, rates, chans
        assert writer is not None
        nbytes, sha = writer.publish()
        st["shards"].append({"url": shard_name(split, len(st["shards"]), slice_index, num_slices),
                             "num_samples": writer.num_samples, "seconds": round(writer.seconds, 6),
                             "bytes": nbytes, "sha256": sha, "first": first, "end": end, "skips": skips,
                             "sample_rates": sorted(rates), "channels": sorted(chans)})
        # progress is saved after the shard is visible: a crash in between only redoes this shard
        write_bytes_atomic(progress_url, json.dumps(state).encode("utf-8"))
        writer, skips, first, rates, chans = None, [], end, set(), set()

    try:
        for idx, res in enumerate(processor.run(items[start:]), start):
            item = items[idx]
            if res[0] == "skip":
                skips.append({"index": idx, "path": item.path, "source": item.source, "key": item.key,
                              "reason": res[1]})
            else:
                _, audio, meta_json, secs, sr, ch = res
                if writer is None:
                    writer = ShardWriter(fsio.join_url(out_url, shard_name(split, len(st["shards"]), slice_index, num_slices)))
                writer.add(item.key, codec, audio, meta_json, secs)
                rates.add(sr)
                chans.add(ch)
                seconds += secs
                if writer.size >= shard_size:
                    close(idx + 1)
            if bar is not None:
                bar.update(1)
        if writer is not None:
            close(len(items))
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    st["tail_skips"] = skips  # items after the last shard that all failed
    st["done"] = True
    write_bytes_atomic(progress_url, json.dumps(state).encode("utf-8"))
    return seconds


def _write_manifest(split: str, st: dict, recipe: Recipe, out_url: str, codec: str, seed: int, command: str,
                    slice_index: int, num_slices: int) -> dict:
    shards = st["shards"]
    rates = sorted({r for s in shards for r in s["sample_rates"]})
    chans = sorted({c for s in shards for c in s["channels"]})
    manifest = {
        "format": FORMAT,
        "dataset": recipe.dataset,
        "split": split,
        "codec": codec,
        "sample_rate": rates[0] if len(rates) == 1 else None,
        "channels": chans[0] if len(chans) == 1 else None,
        "num_samples": sum(s["num_samples"] for s in shards),
        "seconds": round(sum(s["seconds"] for s in shards), 6),
        "shards": [{k: s[k] for k in ("url", "num_samples", "seconds", "bytes", "sha256")} for s in shards],
        "labels": recipe.labels,
        "build": {"command": command, "seed": seed, "created": _now()},
    }
    if num_slices > 1:
        manifest["slice"] = {"index": slice_index, "count": num_slices}
    write_manifest(fsio.join_url(out_url, manifest_name(split, slice_index, num_slices)), manifest, write=write_bytes_atomic)
    return {"samples": manifest["num_samples"], "seconds": manifest["seconds"],
            "hours": round(manifest["seconds"] / 3600, 4), "shards": len(shards),
            "bytes": sum(s["bytes"] for s in shards)}


def _make_report(recipe: Recipe, plan: dict[str, list[Item]], recipe_skips: list[Skip], item_skips: list[dict],
                 split_stats: dict[str, dict], *, out_url: str, fingerprint: str, options: dict, command: str,
                 workers: int, wall: float, kept_shards: int, new_seconds: float) -> dict:
    # A source may give several samples (segments): it counts as written if any of them was.
    failed = {(s["split"], s["index"]) for s in item_skips}
    written_sources: set[str] = set()
    failed_sources: dict[str, dict] = {}
    for split, items in plan.items():
        for idx, item in enumerate(items):
            if (split, idx) not in failed:
                written_sources.add(item.path)
    segments_skipped = []
    for s in sorted(item_skips, key=lambda s: (s["split"], s["index"])):
        if s["path"] in written_sources:
            segments_skipped.append({"path": s["path"], "key": s["key"], "reason": s["reason"]})
        else:
            failed_sources.setdefault(s["path"], {"path": s["path"], "reason": s["reason"]})
    files_skipped = [{"path": s.path, "reason": s.reason} for s in recipe_skips] + list(failed_sources.values())
    files_in = len(written_sources) + len(files_skipped)
    seconds = sum(v["seconds"] for v in split_stats.values())
    report = {
        "dataset": recipe.dataset,
        "out": out_url,
        "command": command,
        "slice": {"index": options["slice"][0], "count": options["slice"][1]},
        "files_in": files_in,
        "files_written": len(written_sources),
        "samples_written": sum(v["samples"] for v in split_stats.values()),
        "files_skipped": files_skipped,
        "skipped_by_reason": dict(Counter(reason_kind(s["reason"]) for s in files_skipped).most_common()),
        "segments_skipped": segments_skipped,
        "splits": split_stats,
        "seconds": round(seconds, 3),
        "hours": round(seconds / 3600, 4),
        "bytes": sum(v["bytes"] for v in split_stats.values()),
        "shards": sum(v["shards"] for v in split_stats.values()),
        "shards_kept_from_earlier_run": kept_shards,
        "wall_seconds": round(wall, 3),
        # throughput of this run only: audio actually processed, not shards kept by a resume
        "audio_hours_per_hour": round(new_seconds / wall, 2) if wall > 0 else None,
        "codec": options["codec"],
        "sample_rate": options["sample_rate"],
        "mono": options["mono"],
        "seed": options["seed"],
        "shard_size": options["shard_size"],
        "workers": workers,
        "fingerprint": fingerprint,
        "created": _now(),
    }
    # Slices cannot split the recipe's own count, so it is only compared for a whole build.
    if options["slice"][1] == 1 and recipe.files_in and recipe.files_in != files_in:
        report["recipe_files_in"] = recipe.files_in
        report["warning"] = (f"recipe {recipe.dataset!r} counted {recipe.files_in} input files but listed "
                             f"{files_in} as items or skips")
    return report


def format_summary(report: dict) -> str:
    """The one-screen summary printed after a build (also used by ``merge``)."""
    sl = report.get("slice") or {"index": 0, "count": 1}
    lines = [
        "",
        f"shard-tools build: {report['dataset']} -> {report['out']}"
        + (f"  (slice {sl['index']}/{sl['count']})" if sl["count"] > 1 else ""),
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
    if report.get("warning"):
        lines.append(f"  warning: {report['warning']}")
    if report["files_skipped"]:
        lines.append(f"  every skipped file and its reason: {fsio.join_url(report['out'], report_name(sl['index'], sl['count']))}")
    return "\n".join(lines)

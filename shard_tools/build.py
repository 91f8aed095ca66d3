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

import errno
import hashlib
import json
import os
import random
import re
import time

from pipeline import fsio
from pipeline.errors import UserError
from pipeline.manifest import MANIFEST_FORMAT, load_manifest, write_manifest
from shard_tools.convert import Convert, Spooled, discard_result, process_item
from shard_tools.layout import NOT_UTF8_NAME, printable, utf8_name
from shard_tools.lock import BuildLock, lock_name
from shard_tools.owner import me, sweep_temp
from shard_tools.recipe import Item, Recipe, Skip, item_record
from shard_tools.report import (OPTION_FIELDS, assemble, format_summary, now_utc, report_name, skips_by_file,
                                split_totals)
from shard_tools.workers import Processor, stop_point
from shard_tools.writer import ShardWriter, dumps_json, write_bytes_atomic

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


def progress_name(slice_index: int = 0, num_slices: int = 1) -> str:
    return f".build-progress{slice_suffix(slice_index, num_slices)}.json"


def stable_hash(text: str) -> int:
    """A hash of a string that is the same in every process and on every machine (not ``hash()``)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


# ----------------------------------------------------------------------------------------------
# plan


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
    """What the shards' bytes depend on: the options and the planned items (the recipe's own
    options only through the items they produce, so an API build resumes a CLI build)."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in options.items() if k != "recipe"}, sort_keys=True).encode())
    h.update(json.dumps(recipe.labels, sort_keys=True, default=str).encode())
    for split, items in plan.items():
        h.update(split.encode())
        for item in items:
            h.update(json.dumps(item_record(item), sort_keys=True, default=str).encode())
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


def build_dataset(recipe: Recipe, out_url: str, *, codec: str = "flac", shard_size: int = 256_000_000,
                  sample_rate: int | None = None, mono: bool = False, workers: int = 1, seed: int = 0,
                  slice_index: int = 0, num_slices: int = 1, progress: bool = True, command: str = "",
                  recipe_options: dict | None = None, force_unlock: bool = False) -> dict:
    """Write ``recipe`` as shards + manifests under ``out_url``; returns the build report.

    The report (also written to ``build-report.json``, or ``build-report.slice-<i>-of-<K>.json``
    for a slice) holds ``files_in``, ``files_written``, ``samples_written``, ``files_skipped``
    (every skipped file with its reason), per-split counts, hours, bytes, wall time and
    audio-hours per hour. Re-running an interrupted build with the same arguments resumes it; a
    re-run of a finished build returns its report without rewriting anything.

    ``recipe_options`` (the recipe's own command-line options) are recorded in the manifests so
    that ``merge`` can refuse slices built differently. The build holds the output folder's lock
    (``shard_tools.lock``) throughout; ``force_unlock`` takes over a lock whose holder cannot be
    proven dead. Failures writing ``out_url`` (no space, no permission) raise ``UserError``.
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
    try:
        _make_out_folder(out_url)
        sweep_temp()  # shards and spooled samples that builds killed on this host left in the temp folder
        if fsio.is_local(out_url):
            sweep_temp(fsio.local_path(out_url))
    except OSError as exc:
        raise _output_error(exc, out_url) from exc
    recipe = _without_unnamable_files(recipe)
    options = {"format": FORMAT, "dataset": recipe.dataset, "codec": codec, "shard_size": shard_size,
               "sample_rate": sample_rate, "mono": mono, "seed": seed, "slice": [slice_index, num_slices],
               "recipe": _jsonable(recipe_options or {})}
    with BuildLock(out_url, lock_name(slice_index, num_slices), command=command, force=force_unlock) as lock:
        try:
            return _build_locked(recipe, out_url, options, workers=workers, progress=progress, command=command,
                                 lock=lock, t0=t0)
        except OSError as exc:
            if not _is_local_io_error(exc):
                raise  # a network failure: the CLI names the object store (cli.remote_errors)
            raise _output_error(exc, out_url) from exc
        finally:
            sweep_temp(only=me())  # spooled samples of results never consumed (an error, Ctrl-C)
            if fsio.is_local(out_url):
                sweep_temp(fsio.local_path(out_url), only=me())


def _build_locked(recipe: Recipe, out_url: str, options: dict, *, workers: int, progress: bool, command: str,
                  lock: BuildLock, t0: float) -> dict:
    slice_index, num_slices = options["slice"]
    plan = plan_items(recipe, seed=options["seed"], slice_index=slice_index, num_slices=num_slices)
    fingerprint = _fingerprint(recipe, plan, options)
    # A sliced build writes a (possibly empty) partial manifest for every split of the whole
    # dataset, so that merge can tell a slice with no items of a split from a missing slice.
    splits = sorted({it.split for it in recipe.items}) if num_slices > 1 else sorted(plan)
    report_url = fsio.join_url(out_url, report_name(slice_index, num_slices))
    progress_url = fsio.join_url(out_url, progress_name(slice_index, num_slices))
    done = _finished_report(report_url, fingerprint, out_url, splits, options, command, progress)
    if done is not None:
        fsio.remove(progress_url)  # a kill right after the report leaves it behind
        return done
    state = _progress_state(progress_url, fingerprint, progress)

    conv = Convert(recipe.dataset, options["codec"], options["sample_rate"], options["mono"], owner=me(),
                   spool_dir=fsio.local_path(out_url) if fsio.is_local(out_url) else None)
    processor = Processor(process_item, conv, workers)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(v) for v in plan.values()), unit="file", desc=f"{recipe.dataset} -> shards",
                   dynamic_ncols=True)
    kept_shards, new_seconds = 0, 0.0
    split_stats: dict[str, dict] = {}
    item_skips: list[dict] = []  # {"split", "index", "reason", ...} per item that wrote nothing
    try:
        for split in splits:
            items = plan.get(split, [])
            st = state["splits"].setdefault(split, {"shards": [], "done": False, "tail_skips": []})
            kept_shards += _keep_finished_shards(st, out_url)
            start = st["shards"][-1]["end"] if st["shards"] else 0
            if bar is not None:
                bar.update(start if not st["done"] else len(items))
            if not st["done"]:
                # a manifest left by an earlier build with other options would describe shards
                # about to be overwritten: the split does not exist until its new manifest does
                fsio.remove(fsio.join_url(out_url, manifest_name(split, slice_index, num_slices)))
                new_seconds += _write_split(split, items, start, st, state, processor, out_url, progress_url,
                                            options, lock, bar)
            item_skips += [{"split": split, **s} for rec in st["shards"] for s in rec["skips"]]
            item_skips += [{"split": split, **s} for s in st["tail_skips"]]
            split_stats[split] = _write_manifest(split, st, recipe, out_url, options, command)
    finally:
        processor.close()
        if bar is not None:
            bar.close()
    removed, foreign = remove_unlisted(out_url, {s: [r["url"] for r in state["splits"][s]["shards"]] for s in splits},
                                       slice_index, num_slices)
    report = _build_report(recipe, plan, item_skips, split_stats, options, out_url=out_url, command=command,
                           wall=time.time() - t0, processed_seconds=new_seconds, shards_kept=kept_shards,
                           workers=workers, fingerprint=fingerprint)
    if removed:
        report["removed_unlisted"] = removed
    if foreign:
        report["unlisted_left"] = foreign
    write_bytes_atomic(report_url, dumps_json(report, indent=1))
    fsio.remove(progress_url)
    if progress:
        print(format_summary(report))
    return report


def _finished_report(report_url: str, fingerprint: str, out_url: str, splits: list[str], options: dict,
                     command: str, progress: bool) -> dict | None:
    """The report of a finished build of the same inputs and options into ``out_url``, else None."""
    done = _read_json(report_url)
    slice_index, num_slices = options["slice"]
    names = [manifest_name(s, slice_index, num_slices) for s in splits]
    if done is None or done.get("fingerprint") != fingerprint or not all(
            fsio.exists(fsio.join_url(out_url, n)) for n in names):
        return None
    if progress:
        print(f"[shard-tools] {out_url}: already built with the same inputs and options; nothing to do")
    if done.get("recipe_options") != options["recipe"]:
        # recipe options that changed nothing in the items: the shards stand, the records follow
        _restamp(out_url, names, options, command)
        done["recipe_options"] = options["recipe"]
        write_bytes_atomic(report_url, dumps_json(done, indent=1))
    done["up_to_date"] = True
    return done


def _progress_state(progress_url: str, fingerprint: str, progress: bool) -> dict:
    """The progress file of an interrupted build of the same inputs and options, or a fresh state."""
    state = _read_json(progress_url)
    if state is not None and state.get("fingerprint") != fingerprint:
        if progress:
            print(f"[shard-tools] {progress_url} belongs to a build with other inputs or options; starting over")
        state = None
    return state if state is not None else {"fingerprint": fingerprint, "splits": {}}


def _keep_finished_shards(st: dict, out_url: str) -> int:
    """Keep the split's recorded shards that are still there, up to the first one that is not;
    returns how many. A split missing one is not done any more."""
    kept = []
    for rec in st["shards"]:
        if not _shard_present(fsio.join_url(out_url, rec["url"]), rec["bytes"]):
            break
        kept.append(rec)
    if len(kept) < len(st["shards"]) or not st["done"]:
        st["done"] = False
        st["tail_skips"] = []
    st["shards"] = kept
    return len(kept)


def _build_report(recipe: Recipe, plan: dict[str, list[Item]], item_skips: list[dict], split_stats: dict,
                  options: dict, *, out_url: str, command: str, wall: float, processed_seconds: float,
                  shards_kept: int, workers: int, fingerprint: str) -> dict:
    slice_index, num_slices = options["slice"]
    recipe_skips = [s for s in recipe.skipped
                    if num_slices == 1 or stable_hash(recipe.slice_key(s.path)) % num_slices == slice_index]
    files_written, files_skipped, segments_skipped = skips_by_file(plan, item_skips, recipe_skips)
    report = assemble(dataset=recipe.dataset, out=out_url, command=command, slice_=(slice_index, num_slices),
                      files_written=files_written, files_skipped=files_skipped, segments_skipped=segments_skipped,
                      splits=split_stats, wall=wall, processed_seconds=processed_seconds,
                      shards_kept_from_earlier_run=shards_kept, workers=workers, fingerprint=fingerprint,
                      **{f: options["recipe" if f == "recipe_options" else f] for f in OPTION_FIELDS})
    # Slices cannot split the recipe's own count, so it is only compared for a whole build.
    if num_slices == 1 and recipe.files_in and recipe.files_in != report["files_in"]:
        report["recipe_files_in"] = recipe.files_in
        report["warning"] = (f"recipe {recipe.dataset!r} counted {recipe.files_in} input files but listed "
                             f"{report['files_in']} as items or skips")
    return report


def _restamp(out_url: str, names: list[str], options: dict, command: str) -> None:
    """Record ``options`` and ``command`` in finished manifests whose shards they did not change."""
    for name in names:
        url = fsio.join_url(out_url, name)
        m = load_manifest(url, allow_empty=True).record
        m["build"].update(command=command, options={k: v for k, v in options.items() if k != "slice"})
        write_manifest(url, m, write=write_bytes_atomic)


def _make_out_folder(out_url: str) -> None:
    if fsio.is_local(out_url):
        path = fsio.local_path(out_url)
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"--out {out_url}: this is a file, not a folder; give a folder for the shards "
                            f"(it is created if missing)")
    fsio.makedirs(out_url)


def _is_local_io_error(exc: OSError) -> bool:
    return exc.errno is not None and not isinstance(exc, ConnectionError)


def _output_error(exc: OSError, out_url: str) -> UserError:
    """The one-line message for an ordinary I/O failure while writing the output."""
    where = exc.filename or out_url
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"--out {out_url}: no space left on the device writing {where}; free some space (or give "
                         f"another --out) and run the same command again: finished shards are kept and the "
                         f"build resumes after them")
    return UserError(f"--out {out_url}: cannot write {where} ({exc.strerror or exc}); fix that (permissions, "
                     f"space, a path component that is a file) and run the same command again to resume")


def _jsonable(obj):
    """``obj`` as plain JSON values (tuples -> lists, other objects -> str), for manifests."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _without_unnamable_files(recipe: Recipe) -> Recipe:
    """Items whose path is not valid UTF-8 (undecodable bytes that ``os.walk`` carries as surrogate
    escapes) become skips: their name can be neither hashed, nor stored in a sample's JSON."""
    bad = [it for it in recipe.items if not utf8_name(it.path) or not utf8_name(it.source)]
    if not bad:
        return recipe
    skipped = list(recipe.skipped)
    seen = set()
    for it in bad:
        if it.path not in seen:
            seen.add(it.path)
            skipped.append(Skip(printable(it.path), NOT_UTF8_NAME))
    ids = {id(it) for it in bad}
    return Recipe(dataset=recipe.dataset, items=[it for it in recipe.items if id(it) not in ids], skipped=skipped,
                  labels=recipe.labels, files_in=recipe.files_in, root=recipe.root)


def _write_split(split: str, items: list[Item], start: int, st: dict, state: dict, processor: Processor,
                 out_url: str, progress_url: str, options: dict, lock: BuildLock, bar) -> float:
    """Write the shards of one split from item ``start`` on; returns seconds of audio written."""
    slice_index, num_slices = options["slice"]
    codec, shard_size = options["codec"], options["shard_size"]
    writer: ShardWriter | None = None
    first = start
    skips: list[dict] = []
    seconds = 0.0
    rates: set = set()
    chans: set = set()

    def close(end: int) -> None:
        nonlocal writer, skips, first, rates, chans
        assert writer is not None
        lock.check()  # never publish over a build that took this folder over
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
                try:
                    writer.add(item.key, codec, audio.path if isinstance(audio, Spooled) else audio, meta_json, secs)
                finally:
                    discard_result(res)
                rates.add(sr)
                chans.add(ch)
                seconds += secs
                if writer.size >= shard_size:
                    close(idx + 1)
            if bar is not None:
                bar.update(1)
            stop_point()  # SIGTERM / Ctrl-C: stop here, between files
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


def _write_manifest(split: str, st: dict, recipe: Recipe, out_url: str, options: dict, command: str) -> dict:
    slice_index, num_slices = options["slice"]
    shards = st["shards"]
    rates = sorted({r for s in shards for r in s["sample_rates"]})
    chans = sorted({c for s in shards for c in s["channels"]})
    manifest = {
        "format": FORMAT,
        "dataset": recipe.dataset,
        "split": split,
        "codec": options["codec"],
        "sample_rate": rates[0] if len(rates) == 1 else None,
        "channels": chans[0] if len(chans) == 1 else None,
        "num_samples": sum(s["num_samples"] for s in shards),
        "seconds": round(sum(s["seconds"] for s in shards), 6),
        "shards": [{k: s[k] for k in ("url", "num_samples", "seconds", "bytes", "sha256")} for s in shards],
        "labels": recipe.labels,
        # options: what merge compares between slices (everything that shapes the output but --slice)
        "build": {"command": command, "seed": options["seed"], "created": now_utc(),
                  "options": {k: v for k, v in options.items() if k != "slice"}},
    }
    if num_slices > 1:
        manifest["slice"] = {"index": slice_index, "count": num_slices}
    write_manifest(fsio.join_url(out_url, manifest_name(split, slice_index, num_slices)), manifest, write=write_bytes_atomic)
    return split_totals(manifest)


def remove_unlisted(out_url: str, listed: dict[str, list[str]], slice_index: int = 0,
                    num_slices: int = 1) -> tuple[list[str], list[str]]:
    """After a build: remove what an earlier build of the same names left that no manifest lists.

    A whole build owns ``<split>-NNNNNN.tar`` and ``<split>.manifest.json``; slice i of K owns
    ``<split>-s<iii>of<KKK>-NNNNNN.tar`` and ``<split>.manifest.slice-<i>-of-<K>.json``. Shards
    of these names that ``listed`` (split -> shard names just written) does not hold, and manifests
    of splits this build did not write, are removed (the build lock guarantees no one else writes
    them). A stale manifest that lists shards of other names is left alone and named in the second
    list (``shard-tools verify`` reports the shards nobody lists). Returns ``(removed, left)``.
    """
    if num_slices > 1:
        shard_re = re.compile(rf"^[A-Za-z0-9_]+-s{slice_index:03d}of{num_slices:03d}-\d{{6}}\.tar$")
        manifest_re = re.compile(rf"^([A-Za-z0-9_]+)\.manifest\.slice-{slice_index}-of-{num_slices}\.json$")
    else:
        shard_re = re.compile(r"^[A-Za-z0-9_]+-\d{6}\.tar$")
        manifest_re = re.compile(r"^([A-Za-z0-9_]+)\.manifest\.json$")
    keep = {u for urls in listed.values() for u in urls}
    removed, left = [], []
    for name in fsio.list_dir(out_url):
        m = manifest_re.match(name)
        if m and m.group(1) not in listed:
            old = _read_json(fsio.join_url(out_url, name)) or {}
            if all(shard_re.match(str(s.get("url", ""))) for s in old.get("shards", [])):
                fsio.remove(fsio.join_url(out_url, name))
                removed.append(name)
            else:
                left.append(name)
        elif shard_re.match(name) and name not in keep:
            fsio.remove(fsio.join_url(out_url, name))
            removed.append(name)
    return removed, left

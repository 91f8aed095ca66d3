"""``shard-tools verify``: re-read every shard and check it against its manifest.

Per shard: bytes and sha256 as recorded; tar members in pairs ``<key>.<codec>`` + ``<key>.json``;
every sample decodes, and its frames, sample rate and channels match its JSON; the sample count and
seconds match the manifest. Per split: keys unique and totals equal the sum over shards.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile

from pipeline import fsio
from pipeline.audio import AudioDecodeError, decode_bytes
from pipeline.shards import SampleJSONError, parse_sample_json
from shard_tools.manifest import find_manifests, read_manifest, shard_url
from shard_tools.workers import Pool


def verify_shard(url: str, expected: dict, codec: str, split: str) -> dict:
    """Check one shard; returns ``{"problems": [...], "keys": [...], "samples": n, "seconds": s}``."""
    problems: list[str] = []
    keys: list[str] = []
    seconds = 0.0
    try:
        data = fsio.read_bytes(url)
    except (FileNotFoundError, OSError) as exc:
        return {"problems": [f"{url}: cannot read ({exc})"], "keys": [], "samples": 0, "seconds": 0.0}
    if len(data) != expected["bytes"]:
        problems.append(f"{url}: {len(data)} bytes, manifest says {expected['bytes']}")
    sha = hashlib.sha256(data).hexdigest()
    if sha != expected["sha256"]:
        problems.append(f"{url}: sha256 {sha[:16]}..., manifest says {expected['sha256'][:16]}...")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            if len(members) % 2:
                problems.append(f"{url}: odd number of members ({len(members)}); samples come as audio + json pairs")
            for a, j in zip(members[0::2], members[1::2]):
                key, _, ext = a.name.partition(".")
                if ext != codec or j.name != f"{key}.json":
                    problems.append(f"{url}: members {a.name}, {j.name} are not a <key>.{codec} + <key>.json pair")
                    continue
                keys.append(key)
                try:
                    meta = parse_sample_json(tar.extractfile(j).read())
                    audio, sr = decode_bytes(tar.extractfile(a).read(), name=f"{url}:{a.name}")
                except (AudioDecodeError, SampleJSONError) as exc:
                    problems.append(f"{url}: sample {key}: {exc}")
                    continue
                want = (meta.get("num_samples"), meta.get("sample_rate"), meta.get("channels"), meta.get("key"), meta.get("split"))
                got = (audio.shape[1], sr, audio.shape[0], key, split)
                if want != got:
                    problems.append(f"{url}: sample {key}: json says (frames, sr, channels, key, split) = {want}, "
                                    f"audio/tar give {got}")
                seconds += audio.shape[1] / sr
    except tarfile.TarError as exc:
        problems.append(f"{url}: not a readable tar ({exc})")
    if len(keys) != expected["num_samples"]:
        problems.append(f"{url}: {len(keys)} samples, manifest says {expected['num_samples']}")
    if abs(seconds - expected["seconds"]) > 1e-3 * max(1.0, expected["seconds"]):
        problems.append(f"{url}: {seconds:.3f} s of audio, manifest says {expected['seconds']:.3f}")
    return {"problems": problems, "keys": keys, "samples": len(keys), "seconds": seconds}


def verify(url: str, *, workers: int = 1, progress: bool = True) -> tuple[list[str], dict]:
    """Verify a shard folder or a manifest URL. Returns ``(problems, stats)``; no problems = OK."""
    problems: list[str] = []
    jobs = []
    manifests = []
    for murl in find_manifests(url):
        m = read_manifest(murl)
        manifests.append((murl, m))
        for s in m["shards"]:
            jobs.append((murl, shard_url(murl, s), s, m["codec"], m["split"]))
        if m["num_samples"] != sum(s["num_samples"] for s in m["shards"]):
            problems.append(f"{murl}: num_samples {m['num_samples']} is not the sum over its shards")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(j[2]["bytes"] for j in jobs), unit="B", unit_scale=True, desc="verify", dynamic_ncols=True)
    results: dict[str, list[dict]] = {}

    def collect(job, res):
        results.setdefault(job[0], []).append(res)
        problems.extend(res["problems"])
        if bar is not None:
            bar.update(job[2]["bytes"])

    try:
        if workers > 1 and len(jobs) > 1:
            with Pool(workers) as ex:
                futs = [ex.submit(verify_shard, j[1], j[2], j[3], j[4]) for j in jobs]
                for job, fut in zip(jobs, futs):
                    collect(job, fut.result())
        else:
            for job in jobs:
                collect(job, verify_shard(job[1], job[2], job[3], job[4]))
    finally:
        if bar is not None:
            bar.close()
    stats = {"manifests": len(manifests), "shards": len(jobs), "samples": 0, "seconds": 0.0}
    for murl, m in manifests:
        res = results.get(murl, [])
        keys = [k for r in res for k in r["keys"]]
        dup = len(keys) - len(set(keys))
        if dup:
            problems.append(f"{murl}: {dup} duplicate keys within split {m['split']!r}")
        stats["samples"] += sum(r["samples"] for r in res)
        stats["seconds"] += sum(r["seconds"] for r in res)
    if not url.endswith(".json"):
        problems.extend(f"{u}: a shard no manifest lists (left by an earlier build?); delete it, or rebuild into "
                        f"this folder, which removes its own stale shards" for u in unlisted_shards(url))
    return problems, stats


_ANY_MANIFEST = re.compile(r"^[A-Za-z0-9_]+\.manifest(\.slice-\d+-of-\d+)?\.json$")


def unlisted_shards(url: str) -> list[str]:
    """URLs of the ``*.tar`` files in the folders of ``url``'s manifests that no manifest there lists
    (whole or partial, so the shards of unmerged slices count as listed). Hidden files (a build in
    progress) are not shards."""
    out = []
    for folder in sorted({fsio.parent_url(m) for m in find_manifests(url)}):
        names = fsio.list_dir(folder)
        listed: set[str] = set()
        for name in names:
            if _ANY_MANIFEST.match(name):
                murl = fsio.join_url(folder, name)
                try:
                    listed.update(_norm(shard_url(murl, s)) for s in read_manifest(murl)["shards"])
                except (FileNotFoundError, ValueError, KeyError, TypeError):
                    continue  # an unreadable manifest is reported by verify itself
        out.extend(fsio.join_url(folder, n) for n in names
                   if n.endswith(".tar") and not n.startswith(".") and _norm(fsio.join_url(folder, n)) not in listed)
    return out


def _norm(url: str) -> str:
    return os.path.abspath(fsio.local_path(url)) if fsio.is_local(url) else url

"""One writer per output folder: the build lock ``.build-lock[.slice-<i>-of-<K>].json`` in ``--out``.

Two builds writing the same shard names corrupt each other (a shard replaced under a manifest
entry that describes the other one). A build therefore takes the lock of what it writes: the
whole build ``.build-lock.json``, slice i of K ``.build-lock.slice-<i>-of-<K>.json`` (slices of
one build write disjoint names and run side by side, one lock each); ``merge`` takes the whole
build's lock. The lock holds the holder's host, pid, pid start time, start time and command, and
a heartbeat that a daemon thread refreshes every ``HEARTBEAT_S`` seconds.

A lock is stale, and the next build says so and takes it over, when its holder is provably dead
(same host, the pid is gone or is another process now) or its heartbeat is older than
``STALE_AFTER_S`` (a build on another machine that was killed or preempted: a requeued slice job
on another node takes its slice over after that wait). Any other lock is refused with the
holder's description; ``--force-unlock`` takes it over at once. A holder that was only frozen
(a suspended VM) notices the takeover before it publishes its next shard and stops. Local folders create the lock with ``O_EXCL``; object stores have no exclusive
create, so there the lock is written, then read back after a moment to see who won (two builds
starting within that moment can still both proceed; start slices of one folder one per slice).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from datetime import datetime, timezone

from pipeline import fsio
from pipeline.errors import UserError
from shard_tools.owner import Owner, me
from shard_tools.writer import write_bytes_atomic

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # a heartbeat older than this (ten missed beats): the holder is taken for dead
_SETTLE_S = 0.5  # object stores: time to let a concurrent writer's lock land before reading back


def lock_name(slice_index: int = 0, num_slices: int = 1) -> str:
    return f".build-lock.slice-{slice_index}-of-{num_slices}.json" if num_slices > 1 else ".build-lock.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _age_s(stamp: str) -> float | None:
    try:
        return time.time() - datetime.fromisoformat(stamp).timestamp()
    except (TypeError, ValueError):
        return None


class BuildLock:
    """``with BuildLock(out, name, command=...):`` holds the lock; raises UserError when taken."""

    def __init__(self, folder: str, name: str, *, command: str = "", force: bool = False, what: str = "--out"):
        self.url = fsio.join_url(folder, name)
        self.folder, self.what, self.force = folder, what, force
        owner = me()
        self.record = {"host": owner.host, "pid": owner.pid, "pid_start": owner.start, "started": _now(),
                       "heartbeat": _now(), "command": command, "token": secrets.token_hex(8)}
        self.lost: dict | None = None  # the record that replaced ours, if someone forced us out
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquire / release ------------------------------------------------------------------

    def __enter__(self) -> BuildLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(3):
            if self._try_create():
                break
            held = self._read()
            if held is None:
                continue  # released between our attempt and the read: try again
            if not self._may_take_over(held):
                raise UserError(self._held_message(held))
            self._take_over(held)
            if self._read_token() == self.record["token"]:
                break
        else:
            raise UserError(f"{self.what} {self.folder}: could not take the build lock {self.url}; "
                            f"another build keeps replacing it. Run one build per output folder (or per --slice)")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="build-lock-heartbeat")
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._read_token() == self.record["token"]:
            try:
                fsio.remove(self.url)
            except OSError:
                pass  # the folder went away, or a bucket outage: the lock is stale now, and says whose

    def check(self) -> None:
        """Raise UserError if another build took the lock over (``--force-unlock``) while we ran.

        Reads the lock (one small read; the builder calls this once per shard, before publishing)."""
        if self.lost is None:
            held = self._read()
            if held is not None and held.get("token") != self.record["token"]:
                self.lost = held
        if self.lost is not None:
            raise UserError(f"{self.what} {self.folder}: the build lock was taken over by another build "
                            f"({_describe(self.lost)}); this build stops so the two do not mix their shards")

    # -- internals --------------------------------------------------------------------------

    def _payload(self) -> bytes:
        return json.dumps(self.record, indent=1).encode("utf-8")

    def _try_create(self) -> bool:
        if fsio.is_local(self.url):
            path = fsio.local_path(self.url)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._payload())
            return True
        if fsio.exists(self.url):
            return False
        write_bytes_atomic(self.url, self._payload())
        time.sleep(_SETTLE_S)
        return self._read_token() == self.record["token"]

    def _read(self) -> dict | None:
        try:
            data = fsio.read_bytes(self.url)
        except FileNotFoundError:
            return None
        try:
            rec = json.loads(data)
        except ValueError:
            rec = None
        # an unreadable lock (a build killed while writing it) is kept as evidence, not trusted
        return rec if isinstance(rec, dict) else {"unreadable": True}

    def _read_token(self) -> str | None:
        rec = self._read()
        return rec.get("token") if rec else None

    def _holder_dead(self, held: dict) -> bool:
        if held.get("unreadable"):
            return False
        try:
            return not Owner(str(held["host"]), int(held["pid"]), int(held.get("pid_start") or 0)).alive()
        except (KeyError, TypeError, ValueError):
            return False

    def _may_take_over(self, held: dict) -> bool:
        return self.force or self._holder_dead(held) or self._silent_s(held) > STALE_AFTER_S

    @staticmethod
    def _silent_s(held: dict) -> float:
        age = _age_s(held.get("heartbeat", ""))
        return age if age is not None else 0.0

    def _take_over(self, held: dict) -> None:
        if self._holder_dead(held):
            why = "its process is gone"
        elif self._silent_s(held) > STALE_AFTER_S:
            why = f"no heartbeat for {self._silent_s(held) / 60:.0f} min"
        else:
            why = "--force-unlock"
        print(f"[shard-tools] {self.url}: taking over the lock of an earlier build ({_describe(held)}): {why}")
        write_bytes_atomic(self.url, self._payload())
        if not fsio.is_local(self.url):
            time.sleep(_SETTLE_S)

    def _held_message(self, held: dict) -> str:
        if held.get("unreadable"):
            return (f"{self.what} {self.folder}: the build lock {self.url} is unreadable (a build killed while "
                    f"writing it?); if no other build writes this folder, run again with --force-unlock")
        wait = max(0.0, STALE_AFTER_S - self._silent_s(held))
        advice = ("wait for it to finish (then this command resumes or finds the build done), or stop it; if it "
                  f"is dead on another machine, run again in {wait / 60:.0f} min (its lock is stale once its "
                  f"heartbeat is {STALE_AFTER_S / 60:.0f} min old) or now with --force-unlock")
        return (f"{self.what} {self.folder} is being written by another build ({_describe(held)}); {advice}. "
                f"Run one build per output folder (or per --slice)")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                held = self._read()
                if held is not None and held.get("token") != self.record["token"]:
                    self.lost = held
                    return
                self.record["heartbeat"] = _now()
                write_bytes_atomic(self.url, self._payload())
            except Exception:  # noqa: BLE001 - a missed heartbeat only makes the lock look older
                continue


def _describe(rec: dict) -> str:
    parts = [f"host {rec.get('host', '?')}", f"pid {rec.get('pid', '?')}", f"started {rec.get('started', '?')}"]
    if rec.get("command"):
        parts.append(f"command: {rec['command']}")
    return ", ".join(parts)

"""Who owns a file the builder leaves behind: this process's identity, and temp files named by it.

A build killed with ``kill -9`` runs no clean-up, so every file it may leave (a shard being written
for a bucket, a long sample spooled to disk, the output folder's lock) carries the writer's
identity: host, pid and the pid's start time (which tells a dead build from a new process that
reuses its pid). A later build on the same host can then prove the owner dead and remove or take
over what it left; see :func:`sweep_temp` and ``shard_tools.lock``.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
import uuid
from dataclasses import dataclass

TEMP_PREFIX = "musicssl-"
# musicssl-<kind>-<host hash>-<pid>-<start ticks>-<random>.<suffix>,
# e.g. musicssl-shard-9c1e04-4711-98213-1f3a2b4c5d6e.tar.partial (the host hash: a temp folder on a
# shared disk never sees one host sweep another's files)
_TEMP_RE = re.compile(rf"^\.?{TEMP_PREFIX}(?P<kind>[a-z]+)-(?P<host>[0-9a-f]{{6}})-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]+\.")


def pid_start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (Linux ``/proc``); None if it does not exist.

    0 where ``/proc`` is not available (then only the pid itself is compared)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return 0
    # the command name (field 2) may hold spaces or parentheses: split after the last ')'
    fields = stat.rsplit(b")", 1)[1].split()
    if fields[0] == b"Z":  # a zombie has finished; it only waits to be reaped
        return None
    return int(fields[19])


def pid_alive(pid: int, start: int) -> bool:
    """True while the process ``pid`` that started at ``start`` ticks runs (``start`` 0: pid only)."""
    if not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    now = pid_start_ticks(pid)
    return now is not None and (start == 0 or now == 0 or now == start)


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    start: int  # pid_start_ticks(pid) when recorded

    def alive(self) -> bool:
        """Whether the owner still runs; only decidable on its own host (else assumed alive)."""
        return self.host != socket.gethostname() or pid_alive(self.pid, self.start)


def me() -> Owner:
    pid = os.getpid()
    return Owner(socket.gethostname(), pid, pid_start_ticks(pid) or 0)


def _host_tag(host: str) -> str:
    return hashlib.sha1(host.encode("utf-8", "replace")).hexdigest()[:6]


def temp_path(kind: str, suffix: str, owner: Owner | None = None, folder: str | None = None) -> str:
    """A fresh temp file name in ``folder`` owned by ``owner`` (default: this process); hidden
    (a leading dot) inside a given folder, plain in the system temp folder (the default)."""
    o = owner or me()
    name = f"{'.' if folder else ''}{TEMP_PREFIX}{kind}-{_host_tag(o.host)}-{o.pid}-{o.start}-{uuid.uuid4().hex[:12]}{suffix}"
    return os.path.join(folder or tempfile.gettempdir(), name)


def sweep_temp(folder: str | None = None, *, only: Owner | None = None) -> list[str]:
    """Remove the builder's temp files in ``folder`` whose owner is dead (or, with ``only``, every
    one of that owner, at its exit). Returns the paths removed."""
    folder = folder or tempfile.gettempdir()
    host = _host_tag(socket.gethostname())
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TEMP_RE.match(name)
        if m is None or m.group("host") != host:
            continue
        pid, start = int(m.group("pid")), int(m.group("start"))
        if only is not None:
            if (pid, start) != (only.pid, only.start):
                continue
        elif pid_alive(pid, start):
            continue
        path = os.path.join(folder, name)
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass  # another sweeper got there first, or not ours to remove
    return removed

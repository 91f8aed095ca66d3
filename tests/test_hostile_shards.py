"""The shard builder attacked as a hostile or unlucky user would (issue 13's shard items).

Two builds into one folder, a rebuild after the input changed, slices built with other options,
kill -9 with worker pools, a killed bucket build, a recipe name that is a module, a full disk, an
unreachable object store, non-UTF-8 label files and file names. Each case checks the outcome a
user sees: one line naming the file, URL or flag and what to do (no traceback), nothing left
running or lying about, and a resume that still comes out byte-identical.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone

import pytest

from pipeline import fsio
from shard_tools.build import build_dataset
from shard_tools.cli import main as cli_main
from shard_tools.lock import BuildLock, lock_name
from shard_tools.owner import Owner, me, pid_start_ticks, temp_path
from shard_tools.verify import verify
from shard_tools.writer import ShardWriter
from tests.conftest import make_bucket, write_tone
from tests.fixtures_layouts import folder_recipe, tars

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tones(root: str, n: int, *, seconds: float = 0.3, sr: int = 16000) -> list[str]:
    paths = []
    for i in range(n):
        p = os.path.join(root, f"d{i % 3}", f"t{i:03d}.wav")
        write_tone(p, freq=200.0 + 31.0 * i, seconds=seconds, sample_rate=sr)
        paths.append(p)
    return paths


def recipe(root: str):
    return folder_recipe(root, valid_fraction=0.25, test_fraction=0.0)


def listed(out: str) -> set[str]:
    return {s["url"] for n in os.listdir(out) if n.endswith(".manifest.json")
            for s in json.load(open(os.path.join(out, n)))["shards"]}


def one_error_line(err: str) -> str:
    """The user-facing error: exactly one line, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def build_cmd(root: str, out: str, *extra: str, workers: int = 1) -> list[str]:
    return ["build", "folder", "--root", root, "--out", out, "--valid-fraction", "0.25", "--test-fraction", "0",
            "--workers", str(workers), "--quiet", *extra]


def dead_process() -> tuple[int, int]:
    """``(pid, start ticks)`` of a process that has exited (a build killed earlier)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    start = pid_start_ticks(proc.pid) or 1
    proc.wait()
    return proc.pid, start


def alive_descendants(pids: list[int]) -> list[int]:
    return [p for p in pids if pid_start_ticks(p) is not None]


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = open(f"/proc/{name}/stat", "rb").read()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(b")", 1)[1].split()[1]), []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# 5: one writer per output folder


def test_a_second_build_into_a_locked_folder_is_refused_naming_the_first(tmp_path, capsys):
    root, out = str(tmp_path / "src"), str(tmp_path / "out")
    tones(root, 6)
    os.makedirs(out)
    with BuildLock(out, lock_name(), command="shard-tools build folder --root elsewhere"):
        assert cli_main(build_cmd(root, out)) == 2
        line = one_error_line(capsys.readouterr().err)
        for part in (out, f"host {socket.gethostname()}", f"pid {os.getpid()}", "started",
                     "--root elsewhere", "wait for it to finish"):
            assert part in line, part
        assert tars(out) == {}  # the refused build wrote nothing
        # slices have a lock each: slice 0/2 runs beside a whole build
        assert cli_main(build_cmd(root, out, "--slice", "0/2")) == 0
    assert cli_main(build_cmd(root, out)) == 0  # released: the build goes ahead
    assert not [n for n in os.listdir(out) if n.startswith(".build-lock")]


def test_stale_locks_are_taken_over_and_live_foreign_ones_need_force(tmp_path, capsys):
    root, out = str(tmp_path / "src"), str(tmp_path / "out")
    tones(root, 6)
    os.makedirs(out)
    dead_pid, dead_start = dead_process()
    stale = {"host": socket.gethostname(), "pid": dead_pid, "pid_start": dead_start, "started": "2020-01-01T00:00:00+00:00",
             "heartbeat": "2020-01-01T00:00:00+00:00", "command": "shard-tools build folder (killed)", "token": "x"}
    lock_path = os.path.join(out, ".build-lock.json")
    json.dump(stale, open(lock_path, "w"))
    assert cli_main(build_cmd(root, out)) == 0
    said = capsys.readouterr().out
    assert "taking over the lock" in said and f"pid {dead_pid}" in said and "its process is gone" in said
    assert not os.path.exists(lock_path)
    # a lock of another machine (a preempted slice job) is stale once its heartbeat is old ...
    json.dump({**stale, "host": "node-17.cluster"}, open(lock_path, "w"))
    assert cli_main(build_cmd(root, out)) == 0
    assert "no heartbeat for" in capsys.readouterr().out and not os.path.exists(lock_path)
    # ... and refused while it beats; --force-unlock takes it at once
    fresh = datetime.now(timezone.utc).isoformat(timespec="seconds")
    json.dump({**stale, "host": "node-17.cluster", "heartbeat": fresh}, open(lock_path, "w"))
    assert cli_main(build_cmd(root, out)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "host node-17.cluster" in line and "run again in 5 min" in line and "--force-unlock" in line
    assert cli_main(build_cmd(root, out, "--force-unlock")) == 0
    assert not os.path.exists(lock_path)


def test_a_build_forced_out_of_its_folder_stops_before_publishing(tmp_path, monkeypatch):
    root, out = str(tmp_path / "src"), str(tmp_path / "out")
    tones(root, 12)
    real_add = ShardWriter.add
    calls = {"n": 0}

    def take_over_then_add(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # another user runs with --force-unlock while we build
            rec = json.load(open(os.path.join(out, ".build-lock.json")))
            json.dump({**rec, "host": "other", "pid": 1, "token": "theirs"}, open(os.path.join(out, ".build-lock.json"), "w"))
        return real_add(self, *a, **kw)

    monkeypatch.setattr(ShardWriter, "add", take_over_then_add)
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="taken over by another build .*host other"):
        build_dataset(recipe(root), out, shard_size=1, workers=1, progress=False)
    assert len(tars(out)) == 2 and not [n for n in os.listdir(out) if "manifest" in n]  # the third is not published
    assert json.load(open(os.path.join(out, ".build-lock.json")))["token"] == "theirs"  # theirs is left alone


def test_bucket_lock(moto_s3, tmp_path, capsys):
    root = str(tmp_path / "src")
    tones(root, 6)
    make_bucket("musicssl-locks")
    url = "s3://musicssl-locks/tones"
    with BuildLock(url, lock_name(), command="holder"):
        assert cli_main(build_cmd(root, url)) == 2
        line = one_error_line(capsys.readouterr().err)
        assert url in line and f"pid {os.getpid()}" in line
        assert not [n for n in fsio.list_dir(url) if n.endswith(".tar")]
    assert cli_main(build_cmd(root, url)) == 0
    assert ".build-lock.json" not in fsio.list_dir(url)


# ---------------------------------------------------------------------------------------------
# 6: outputs no manifest lists


def test_rebuild_after_the_input_shrank_leaves_no_unlisted_shards(tmp_path, capsys):
    root, out = str(tmp_path / "src"), str(tmp_path / "out")
    paths = tones(root, 16)
    first = build_dataset(recipe(root), out, shard_size=4000, workers=1, progress=False)
    before = set(tars(out))
    assert first["shards"] >= 8 and before == listed(out)
    for p in paths[4:]:
        os.remove(p)  # the corpus shrank: the valid split may vanish, train needs fewer shards
    second = build_dataset(recipe(root), out, shard_size=4000, workers=1, progress=False)
    assert set(tars(out)) == listed(out), "shards of the first build that no manifest lists are still there"
    assert {n for n in second["removed_unlisted"] if n.endswith(".tar")} == before - set(tars(out)) != set()
    assert second["samples_written"] == 4 and verify(out, progress=False)[0] == []
    # a shard some other build left (a name this build does not own) is reported by verify
    stray = os.path.join(out, "old-s000of002-000000.tar")
    with tarfile.open(stray, "w"):
        pass
    problems, _ = verify(out, progress=False)
    assert any(stray in p and "no manifest lists" in p for p in problems), problems
    capsys.readouterr()
    assert cli_main(["verify", out, "--quiet"]) == 1
    assert "old-s000of002-000000.tar" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 8: merge refuses slices built differently


def test_merge_refuses_slices_built_with_other_options(tmp_path, capsys):
    root, out = str(tmp_path / "src"), str(tmp_path / "out")
    tones(root, 10, sr=22050)
    assert cli_main(build_cmd(root, out, "--slice", "0/2", "--sample-rate", "16000", "--mono")) == 0
    assert cli_main(build_cmd(root, out, "--slice", "1/2", "--sample-rate", "22050", "--mono")) == 0
    capsys.readouterr()
    assert cli_main(["merge", out]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--sample-rate" in line and "16000" in line and "22050" in line
    assert "slice-0-of-2" in line and "slice-1-of-2" in line
    assert not [n for n in os.listdir(out) if n.endswith(".manifest.json")], "merge wrote despite the refusal"
    # --mono differs / a recipe option differs: named too
    assert cli_main(build_cmd(root, out, "--slice", "1/2", "--sample-rate", "16000")) == 0
    capsys.readouterr()
    assert cli_main(["merge", out]) == 2
    assert "--mono" in one_error_line(capsys.readouterr().err)
    args = build_cmd(root, out, "--slice", "1/2", "--sample-rate", "16000", "--mono")
    args[args.index("--valid-fraction") + 1] = "0.3"
    assert cli_main(args) == 0
    capsys.readouterr()
    assert cli_main(["merge", out]) == 2
    assert "--valid-fraction" in one_error_line(capsys.readouterr().err)
    # the same options (only --slice and --workers differ): merged
    assert cli_main(build_cmd(root, out, "--slice", "1/2", "--sample-rate", "16000", "--mono", workers=2)) == 0
    assert cli_main(["merge", out]) == 0
    assert verify(out, progress=False)[0] == []


# ---------------------------------------------------------------------------------------------
# 11 + 12: kill -9 leaves nothing running and nothing in the temp folder


def test_kill_9_leaves_no_worker_forkserver_or_tracker(tmp_path):
    root, out = str(tmp_path / "src"), str(tmp_path / "out")
    tones(root, 90, seconds=1.0, sr=44100)
    proc = subprocess.Popen([sys.executable, "-m", "shard_tools", *build_cmd(root, out, "--sample-rate", "16000",
                                                                             workers=2)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    seen: set[int] = set()
    try:
        deadline = time.time() + 60
        # the builder, its forkserver, the resource tracker and 2 workers, with work under way
        while time.time() < deadline and proc.poll() is None:
            seen.update(descendants(proc.pid))
            if len(seen) >= 4 and os.path.isdir(out) and any(n.endswith(".tar") for n in os.listdir(out)):
                break
            time.sleep(0.02)
        assert proc.poll() is None and len(seen) >= 4, f"the build ended or never started its pool: {seen}"
        seen.update(descendants(proc.pid))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 15
        while alive_descendants(sorted(seen)) and time.time() < deadline:
            time.sleep(0.1)
        survivors = alive_descendants(sorted(seen))
        assert survivors == [], [open(f"/proc/{p}/cmdline").read().replace("\0", " ") for p in survivors]
    finally:
        for p in alive_descendants(sorted(seen)):
            os.kill(p, signal.SIGKILL)


def test_killed_bucket_build_leaves_no_partial_shards(moto_s3, tmp_path):
    root = str(tmp_path / "src")
    tones(root, 40, seconds=0.5)
    make_bucket("musicssl-partials")
    url = "s3://musicssl-partials/tones"
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    cmd = [sys.executable, "-m", "shard_tools", *build_cmd(root, url, "--shard-size", "20kB")]

    def partials() -> list[str]:
        return [n for n in os.listdir(tmp) if n.startswith("musicssl-")]

    # SIGTERM (a scheduler's stop): the build unwinds, removes its partial shard, exits 130
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not partials():
        time.sleep(0.005)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 130
    assert "interrupted" in proc.stderr.read().decode() and partials() == []
    # kill -9 while a shard is being written: the partial stays, the next build removes it
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not partials():
        time.sleep(0.005)
    left = partials()
    proc.kill()
    proc.wait()
    assert left, "no partial shard was seen before the kill"
    # a partial of a live process (another build of this host) is not touched
    live = str(tmp / os.path.basename(temp_path("shard", ".tar.partial", me())))
    open(live, "wb").close()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert partials() == [os.path.basename(live)]
    rep = json.loads(fsio.read_bytes(fsio.join_url(url, "build-report.json")))
    assert rep["samples_written"] == 40 and not set(left) & set(os.listdir(tmp))


def test_sigterm_and_ctrl_c_stop_between_files_and_the_resume_is_exact(tmp_path):
    """A stop signal used to raise inside libsndfile's I/O callbacks, where cffi swallowed it: the
    build ran on with a wrong file position. Now it stops between files, every time."""
    root, ref, out = str(tmp_path / "src"), str(tmp_path / "ref"), str(tmp_path / "out")
    tones(root, 48, seconds=0.5)
    assert cli_main(build_cmd(root, ref, "--shard-size", "20kB")) == 0
    for sig, workers in ((signal.SIGTERM, 1), (signal.SIGINT, 2)):
        before = set(tars(out)) if os.path.isdir(out) else set()
        proc = subprocess.Popen([sys.executable, "-m", "shard_tools",
                                 *build_cmd(root, out, "--shard-size", "20kB", workers=workers)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None and len(set(tars(out) if os.path.isdir(out) else ()) - before) < 2:
            time.sleep(0.005)
        proc.send_signal(sig)
        assert proc.wait(60) == 130, proc.stderr.read().decode()
        assert "stopping after the file in hand" in proc.stderr.read().decode()
        assert not [n for n in os.listdir(out) if n.endswith(".partial") or n.startswith(".build-lock")]
        assert all(tars(out)[n] == tars(ref)[n] for n in tars(out))
    assert cli_main(build_cmd(root, out, "--shard-size", "20kB")) == 0
    assert tars(out) == tars(ref)


def test_sweep_only_removes_files_of_dead_owners(tmp_path):
    from shard_tools.owner import sweep_temp

    gone = temp_path("spool", ".flac", Owner(socket.gethostname(), *dead_process()), str(tmp_path))
    reused = temp_path("spool", ".flac", Owner(socket.gethostname(), os.getpid(), (pid_start_ticks(os.getpid()) or 0) + 7),
                       str(tmp_path))  # our pid, but another start time: a dead build whose pid came back
    mine = temp_path("shard", ".tar.partial", me(), str(tmp_path))
    other = str(tmp_path / "musicssl-notes.txt")  # not a name the builder makes
    for p in (gone, reused, mine, other):
        open(p, "wb").close()
    assert sorted(sweep_temp(str(tmp_path))) == sorted([gone, reused])
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in (mine, other))
    assert sweep_temp(str(tmp_path), only=me()) == [mine]


# ---------------------------------------------------------------------------------------------
# 15: recipe names are a fixed table


@pytest.mark.parametrize("name", ["demo", "build", "cli", "writer", "manifest", "__init__", "os"])
def test_build_of_a_module_that_is_no_recipe_is_a_clear_error(name, tmp_path, capsys):
    assert cli_main(["build", name, "--root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"build {name}: not a dataset recipe" in line and "mtat, msd, musicnet, nsynth, folder" in line
    if name == "demo":
        assert "shard-tools demo --out DIR" in line
    assert not os.path.exists(tmp_path / "o")


# ---------------------------------------------------------------------------------------------
# 16: ordinary I/O failures are one line; the resume after them is exact


def test_out_is_a_file(tmp_path, capsys):
    root = str(tmp_path / "src")
    tones(root, 3)
    out = tmp_path / "out.txt"
    out.write_text("not a folder")
    assert cli_main(build_cmd(root, str(out))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "is a file, not a folder" in line


def test_disk_full_is_one_line_and_the_resume_is_exact(tmp_path, capsys, monkeypatch):
    root = str(tmp_path / "src")
    tones(root, 20)
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    assert cli_main(build_cmd(root, ref, "--shard-size", "12kB")) == 0
    real_add = ShardWriter.add
    calls = {"n": 0}

    def full_disk(self, key, ext, audio, meta, secs):
        calls["n"] += 1
        if calls["n"] == 9:  # part-way through the third shard
            raise OSError(errno.ENOSPC, "No space left on device", self._tmp)
        return real_add(self, key, ext, audio, meta, secs)

    monkeypatch.setattr(ShardWriter, "add", full_disk)
    assert cli_main(build_cmd(root, out, "--shard-size", "12kB")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no space left" in line and out in line and "run the same command again" in line
    assert not [n for n in os.listdir(out) if n.endswith(".partial") or n.startswith(".build-lock")]
    done = set(tars(out))
    assert 1 <= len(done) < len(tars(ref))
    monkeypatch.setattr(ShardWriter, "add", real_add)  # space freed
    assert cli_main(build_cmd(root, out, "--shard-size", "12kB")) == 0
    assert tars(out) == tars(ref)
    rep = json.load(open(os.path.join(out, "build-report.json")))
    assert rep["shards_kept_from_earlier_run"] == len(done)


def test_unreachable_object_store_is_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("s3fs")
    import s3fs

    root = str(tmp_path / "src")
    tones(root, 3)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
                 "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(k, v)
    # fsio retries transient errors for ~8 s per call; once is enough to see the message
    monkeypatch.setattr(fsio, "with_retries", lambda fn, **kw: fn())
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        url = "s3://nowhere/tones"
        assert cli_main(build_cmd(root, url)) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "--out s3://nowhere/tones" in line and "did not answer" in line and "AWS_ENDPOINT_URL" in line
        assert cli_main(["info", url]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "info s3://nowhere/tones" in line and "did not answer" in line
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


# ---------------------------------------------------------------------------------------------
# 22: bytes that are not UTF-8


def test_non_utf8_label_files_name_file_and_line(tmp_path, capsys):
    from tests.fixtures_layouts import write_mtat

    mtat_root = str(tmp_path / "mtat")
    write_mtat(mtat_root, ["guitar", "piano"], [
        {"clip_id": 1, "path": "0/a-01-0-29.mp3", "tags": ["guitar"], "freq": 300.0},
        {"clip_id": 2, "path": "c/b-02-0-29.mp3", "tags": ["piano"], "freq": 400.0}], seconds=0.3)
    csv_path = os.path.join(mtat_root, "annotations_final.csv")
    lines = open(csv_path, "rb").read().split(b"\n")
    lines[2] = lines[2].replace(b".mp3", b"-caf\xe9.mp3")  # latin-1 e-acute on line 3
    open(csv_path, "wb").write(b"\n".join(lines))
    assert cli_main(["build", "mtat", "--root", mtat_root, "--out", str(tmp_path / "o1"), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert csv_path in line and "line 3" in line and "not UTF-8" in line and "0xe9" in line

    root = str(tmp_path / "src")
    tones(root, 3)
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"path,genre\nd0/t000.wav,rock\nd1/t001.wav,M\xfcnchner\n")
    assert cli_main(build_cmd(root, str(tmp_path / "o2"), "--labels", str(labels))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(labels) in line and "line 3" in line and "not UTF-8" in line


def test_a_non_utf8_file_name_is_a_counted_skip(tmp_path, capsys):
    root = str(tmp_path / "src")
    tones(root, 4)
    bad = os.path.join(os.fsencode(root), b"d0", b"caf\xe9.wav")
    with open(bad, "wb") as f:
        f.write(open(os.path.join(root, "d0", "t000.wav"), "rb").read())
    out = str(tmp_path / "out")
    assert cli_main(build_cmd(root, out)) == 0
    rep = json.load(open(os.path.join(out, "build-report.json")))
    assert rep["files_in"] == 5 and rep["samples_written"] == 4
    [skip] = rep["files_skipped"]
    assert skip["path"].endswith("d0/caf\\xe9.wav") and skip["reason"].startswith("file name not UTF-8")
    assert verify(out, progress=False)[0] == []

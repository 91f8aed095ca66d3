"""Shared test fixtures: a local S3 (moto) server and a tone-writing helper.

- ``moto_s3`` (session fixture): starts ``moto_server`` on 127.0.0.1 at a free port, sets
  ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (``testing``) and
  ``AWS_DEFAULT_REGION`` (``us-east-1``) for the session, and yields the endpoint URL. Nothing leaves
  the machine. Make a bucket with ``make_bucket(name)`` (s3fs), then use ``s3://name/...`` URLs.
- ``write_tone(path, ...)``: writes a sine tone (any format soundfile writes) and returns its
  samples; also available as the ``tone`` fixture.
- ``crash_on_marker``: a worker function that kills its process on one item (shard builder tests).
- ``one_thread``: torch on one thread for the test, restored after; model test files opt in with
  ``pytestmark = pytest.mark.usefixtures("one_thread")``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import soundfile as sf


def write_tone(path: str, *, freq: float = 440.0, seconds: float = 0.5, sample_rate: int = 16000,
               channels: int = 1, amplitude: float = 0.5) -> np.ndarray:
    """Write a sine tone to ``path`` (format from the extension: wav/flac/ogg/mp3) and return the
    float32 ``(channels, frames)`` signal written (channel c has amplitude ``amplitude / (c + 1)``)."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    base = np.sin(2 * np.pi * freq * t)
    audio = np.stack([amplitude / (c + 1) * base for c in range(channels)]).astype(np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sf.write(path, audio.T, sample_rate)
    return audio


def crash_on_marker(item, conv) -> tuple:
    """Stands in for a decoder that kills its worker process on one poisonous file (path ending
    in POISON); other items pass through as ``("ok", key)``. Lives here so spawned workers can
    import it cheaply."""
    if item.path.endswith("POISON"):
        os._exit(3)
    return ("ok", item.key)


@pytest.fixture
def tone():
    return write_tone


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test with torch on one thread: tiny models gain nothing from threads, and on a CPU
    shared with other test processes OpenMP spin-waits cost seconds."""
    import torch  # here, not at the top: spawned shard-builder workers import this file too

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_server_cmd() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    if os.path.exists(exe):
        return [exe]
    found = shutil.which("moto_server")
    if found:
        return [found]
    return [sys.executable, "-m", "moto.server"]


_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@contextlib.contextmanager
def moto_server() -> Iterator[subprocess.Popen]:
    """Start ``moto_server`` on 127.0.0.1 at a free port with the AWS_* env vars pointing at it;
    yields its process (``AWS_ENDPOINT_URL`` holds the endpoint). Stopped and the env restored after."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*_moto_server_cmd(), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}") from None
                time.sleep(0.2)
        os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1; yields its endpoint URL with the AWS_* env vars pointing at it."""
    pytest.importorskip("moto", reason="moto[server] is not installed (pip install -e '.[test]')")
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[s3]')")
    with moto_server():
        yield os.environ["AWS_ENDPOINT_URL"]


def make_bucket(name: str) -> None:
    """Create an S3 bucket on the server the AWS_* env vars point at (use inside ``moto_s3``)."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    if not fs.exists(name):
        fs.mkdir(name)

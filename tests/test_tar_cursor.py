"""pipeline.shards.TarCursor: its own header parser reads what tarfile writes, and fails loudly."""

from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.shards import ShardReadError, TarCursor


def _tar(path, members, fmt=tarfile.PAX_FORMAT) -> None:
    """``members``: (name, data) for files, (name, None) for a directory, (name, "->target") for a symlink."""
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif isinstance(data, str):
                ti.type, ti.linkname = tarfile.SYMTYPE, data[2:]
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def _samples(path) -> list[tuple[str, bytes | None, str, bytes | None]]:
    cur, out, i = TarCursor(str(path)), [], 0
    try:
        while True:
            try:
                s = cur.get(i)
            except ShardReadError as exc:
                assert "ends before sample" in str(exc)
                return out
            out.append((s.key, s.audio, s.audio_ext, s.meta))
            i += 1
    finally:
        cur.close()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_reads_every_form_tarfile_writes(tmp_path, fmt):
    deep = "d" * 60 + "/" + "e" * 60  # > 100 characters: pax path, GNU long name, or ustar prefix
    uni = "" if fmt == tarfile.USTAR_FORMAT else "ünï-"  # ustar cannot hold non-ASCII names
    members = [
        ("a/", None),
        ("a/k0.flac", b"\x01" * 1000), ("a/k0.json", b'{"x": 0}'),
        ("a/k0-link", "->a/k0.flac"),
        (f"{deep}/k1.flac", b"\x02" * 512), (f"{deep}/k1.json", b"{}"),
        (f"{uni}k2.wav", b""), (f"{uni}k2.json", b"[1]"),
        ("k3.json", b"{}"),  # no audio member
        ("k4.mp3", bytes(range(256)) * 3), ("k4.txt", b"ignored"), ("k4.json", b"{}"),
    ]
    path = tmp_path / "s.tar"
    _tar(path, members, fmt)
    got = _samples(path)
    assert [g[0] for g in got] == ["k0", "k1", f"{uni}k2", "k3", "k4"]  # the symlink is no file: passed over
    by_key = {g[0]: g[1:] for g in got}
    assert by_key["k0"] == (b"\x01" * 1000, "flac", b'{"x": 0}')
    assert by_key["k1"] == (b"\x02" * 512, "flac", b"{}")
    assert by_key[f"{uni}k2"] == (b"", "wav", b"[1]")
    assert by_key["k3"] == (None, "", b"{}")
    assert by_key["k4"] == (bytes(range(256)) * 3, "mp3", b"{}")
    # the same members tarfile itself lists as files, in order
    with tarfile.open(path) as tf:
        files = [m.name for m in tf if m.isfile()]
    assert len(files) == 10 and files[2] == f"{deep}/k1.flac"


def test_skipping_forward_and_order(tmp_path):
    path = tmp_path / "s.tar"
    _tar(path, [x for i in range(6) for x in ((f"k{i}.flac", bytes([i]) * (100 + 700 * i)), (f"k{i}.json", b"{}"))])
    cur = TarCursor(str(path))
    assert cur.get(1).audio == b"\x01" * 800
    assert cur.get(4).audio == b"\x04" * 2900  # 2 and 3 passed over on headers alone
    with pytest.raises(ValueError, match="indices must increase"):
        cur.get(2)
    with pytest.raises(ShardReadError, match="ends before sample 9"):
        cur.get(9)
    cur.close()


def test_corrupt_truncated_and_non_tar(tmp_path):
    path = tmp_path / "s.tar"
    _tar(path, [x for i in range(4) for x in ((f"k{i}.flac", b"\x07" * 3000), (f"k{i}.json", b"{}"))])
    raw = path.read_bytes()
    # a flipped byte in the third sample's first header: the checksum catches it
    hdr = raw.index(b"k2.flac")
    bad = tmp_path / "bad.tar"
    bad.write_bytes(raw[:hdr + 3] + b"X" + raw[hdr + 4:])
    cur = TarCursor(str(bad))
    assert cur.get(1).audio == b"\x07" * 3000
    with pytest.raises(ShardReadError, match=r"corrupt tar header at byte \d+ \(checksum"):
        cur.get(2)
    cur.close()
    # cut inside the second sample's audio
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: raw.index(b"k1.flac") + 512 + 1000])
    cur = TarCursor(str(cut))
    assert cur.get(0).audio == b"\x07" * 3000
    with pytest.raises(ShardReadError, match="truncated member k1.flac"):
        cur.get(1)
    cur.close()
    for content, msg in ((b"", "empty file"), (b"fLaC" + b"\x00\x01" * 600, "not a tar")):
        other = tmp_path / "other.tar"
        other.write_bytes(content)
        with pytest.raises(ShardReadError, match=msg):
            TarCursor(str(other)).get(0)


def test_old_signed_checksum_is_accepted(tmp_path):
    # a header whose name has bytes >= 128, checksummed the old signed way
    path = tmp_path / "s.tar"
    _tar(path, [("kü.flac", b"\x05" * 10), ("kü.json", b"{}")], tarfile.GNU_FORMAT)
    raw = bytearray(path.read_bytes())
    blk = raw[:512]
    signed = sum((b - 256 if b >= 128 else b) for b in blk[:148] + blk[156:]) + 256
    assert signed != sum(blk[:148]) + sum(blk[156:]) + 256  # the name really has high bytes
    raw[148:156] = b"%06o\0 " % signed
    path.write_bytes(bytes(raw))
    assert _samples(path)[0][:3] == ("kü", b"\x05" * 10, "flac")

"""Reading a corpus in its on-disk layout, for the dataset recipes (folder, mtat, msd, musicnet, nsynth).

``--root`` is a local folder or any fsspec URL (``s3://bucket/mtat``, ``gs://...``). A
:class:`Root` answers the questions a recipe asks of its layout: which files are there, how big,
read this label file. A remote tree is listed once (one recursive listing, paginated by the
store) and every later existence or size check is a lookup in that listing, so preparing a
recipe costs a handful of requests however many files the corpus has; audio is only ever read
by the builder's workers. Local folders are asked directly (``os``), as before.

The helpers also keep the recipes' wording the same: a missing root or label file is an error
that names the expected path, a missing or empty audio file a :class:`~shard_tools.recipe.Skip`
whose reason starts like the builder's own (``missing file:``, ``empty file:``), so the build
summary groups reasons well (it groups by the text before the first colon). Label files must be
UTF-8; one that is not is an error naming its file and line.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
from collections.abc import Iterator

from pipeline import fsio
from shard_tools.recipe import Skip


class Root:
    """``--root``: a local folder or an fsspec URL, with paths below it given relative (``a/b.wav``)."""

    def __init__(self, url: str):
        self.url = url if url == "/" else url.rstrip("/")
        self.local = fsio.is_local(url)
        if self.local:
            self.url = os.path.abspath(fsio.local_path(self.url))
        self._files: dict[str, int] | None = None  # remote: relative path -> size, from one listing
        self._dirs: set[str] | None = None
        # whether any audio file usable() was asked about exists (empty or not): a recipe whose
        # files are all missing points at the wrong --root, which is an error, not N skips
        self.found_any = False

    # -- names ------------------------------------------------------------------------------

    def path(self, rel: str) -> str:
        """The local path or URL of ``rel`` (what an Item's ``path`` holds)."""
        return os.path.join(self.url, rel) if self.local else f"{self.url}/{rel}"

    def rel(self, path: str) -> str:
        """``path`` (below this root, or next to it) relative to the root, ``/``-separated."""
        if self.local:
            return os.path.relpath(path, self.url).replace(os.sep, "/")
        return posixpath.relpath("/" + path.split("://", 1)[-1], "/" + self.url.split("://", 1)[-1])

    # -- the tree ---------------------------------------------------------------------------

    def _listing(self) -> dict[str, int]:
        if self._files is None:
            fs, base = fsio.fs_and_path(self.url)
            found = fsio.with_retries(lambda: fs.find(base, detail=True), what=self.url)
            base = base.rstrip("/")
            self._files = {}
            self._dirs = {""}
            for p, info in found.items():
                if info.get("type") == "directory" or not p.startswith(base + "/"):
                    continue
                rel = p[len(base) + 1:]
                self._files[rel] = int(info.get("size") or 0)
                parts = rel.split("/")
                self._dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        return self._files

    def is_dir(self, rel: str = "") -> bool:
        if self.local:
            return os.path.isdir(self.path(rel) if rel else self.url)
        self._listing()
        return rel.strip("/") in self._dirs

    def is_file(self, rel: str) -> bool:
        return os.path.isfile(self.path(rel)) if self.local else rel in self._listing()

    def exists(self, rel: str) -> bool:
        """True for a file, or (local) anything at that name, even a dangling link."""
        return os.path.lexists(self.path(rel)) if self.local else rel in self._listing()

    def problem(self, rel: str) -> str | None:
        """Why the audio file ``rel`` cannot be used before decoding it (missing, empty, not a file), or None."""
        if self.local:
            why = file_problem(self.path(rel))
        else:
            size = self._listing().get(rel)
            why = ("missing file: listed in the labels but not in the bucket" if size is None
                   else "empty file: 0 bytes" if size == 0 else None)
        self.found_any = self.found_any or why is None or not why.startswith("missing")
        return why

    def usable(self, rel: str, skipped: list[Skip]) -> bool:
        """True if the audio file ``rel`` may be decoded; else its Skip (with the reason) is appended."""
        why = self.problem(rel)
        if why is not None:
            skipped.append(Skip(self.path(rel), why))
        return why is None

    def listdir(self, rel: str = "") -> list[str]:
        """Names of the files directly in folder ``rel`` (sorted; [] if there is no such folder)."""
        if self.local:
            p = self.path(rel) if rel else self.url
            return sorted(n for n in os.listdir(p) if os.path.isfile(os.path.join(p, n))) if os.path.isdir(p) else []
        prefix = rel.strip("/") + "/" if rel.strip("/") else ""
        return sorted(r[len(prefix):] for r in self._listing() if r.startswith(prefix) and "/" not in r[len(prefix):])

    def walk(self) -> list[str]:
        """Every file below the root, relative and sorted (local: symlinked folders not followed)."""
        if not self.local:
            return sorted(self._listing())
        out = []
        for dirpath, dirnames, filenames in os.walk(self.url):
            dirnames.sort()
            out.extend(os.path.relpath(os.path.join(dirpath, n), self.url).replace(os.sep, "/") for n in filenames)
        return sorted(out)

    def open(self, rel: str):
        """A binary file object for ``rel`` (e.g. for ``soundfile.info``)."""
        return fsio.open_url(self.path(rel), "rb")


def require_dir(path: str, what: str) -> str:
    """``path`` if it is a folder (local or URL), else ``FileNotFoundError`` naming it and what it should hold."""
    return _require(path, "folder", what)


def require_file(path: str, what: str) -> str:
    """``path`` if it is a file (local or URL), else ``FileNotFoundError`` naming it and what it should be."""
    return _require(path, "file", what)


def _require(path: str, kind: str, what: str) -> str:
    if fsio.is_local(path):
        p = fsio.local_path(path)
        found = os.path.isdir(p) if kind == "folder" else os.path.isfile(p)
    else:
        fs, p = fsio.fs_and_path(path)
        found = bool(fsio.with_retries(lambda: fs.isdir(p) if kind == "folder" else fs.isfile(p), what=path))
    if not found:
        raise FileNotFoundError(f"{path}: {kind} not found; expected {what}")
    return path


def file_problem(path: str) -> str | None:
    """Why a local audio file cannot be used before decoding it (missing, empty, not a file), or None.

    The reasons start with the same words as the builder's own (``missing file:``, ``empty file:``)
    so the summary counts them together.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing file: listed in the labels but not on disk"
    except OSError as exc:
        return f"missing file: cannot stat ({exc.strerror or exc})"
    if not os.path.isfile(path):
        return "missing file: not a regular file"
    if st.st_size == 0:
        return "empty file: 0 bytes"
    return None


NOT_UTF8_NAME = "file name not UTF-8: rename the file (e.g. convmv -f latin1 -t utf8 --notest FILE)"


def utf8_name(rel: str) -> bool:
    """False for a file name holding bytes that are not UTF-8 (``os.walk`` carries them as
    surrogate escapes, which can be neither hashed nor stored in a sample's JSON)."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(path: str) -> str:
    """``path`` with undecodable bytes shown as ``\\xNN`` (valid UTF-8, for reports and messages)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace") if not utf8_name(path) else path


def read_text(path: str) -> str:
    """A label file (local or URL) as text: UTF-8, a byte-order mark dropped.

    Raises ValueError naming the file, line and column of the first byte that is not UTF-8.
    """
    data = fsio.read_bytes(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ValueError(f"{path} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column {col}); "
                         f"save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8") from None


def read_header_table(path: str, *, delimiter: str, expected: str) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """A table's header row and an iterator over the rows after it (see :func:`read_table`);
    ValueError naming the file when it is empty (``expected``: what the header should be)."""
    rows = read_table(path, delimiter=delimiter)
    try:
        _, header = next(rows)
    except StopIteration:
        raise ValueError(f"{path}: empty file; expected a header {expected}") from None
    return header, rows


def read_table(path: str, *, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """Rows of a delimited text file as ``(line_number, fields)``, with ``"..."`` quoting undone.

    Blank lines are dropped; a UTF-8 byte-order mark is ignored; fields are stripped.
    """
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter, quotechar='"')
    for row in reader:
        if not row or all(not c.strip() for c in row):
            continue
        yield reader.line_num, [c.strip() for c in row]

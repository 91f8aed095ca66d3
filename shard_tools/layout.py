"""Small helpers the dataset recipes (mtat, msd, musicnet, nsynth) share for reading a layout.

A recipe turns a missing root or label file into an error that names the expected path, and a
missing or empty audio file into a :class:`~shard_tools.recipe.Skip` with a reason; these helpers
keep the wording the same across recipes so the build summary groups reasons well (the summary
groups by the text before the first colon).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator


def require_dir(path: str, what: str) -> str:
    """``path`` if it is a folder, else ``FileNotFoundError`` naming it and what it should hold."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: folder not found; expected {what}")
    return path


def require_file(path: str, what: str) -> str:
    """``path`` if it is a file, else ``FileNotFoundError`` naming it and what it should be."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found; expected {what}")
    return path


def file_problem(path: str) -> str | None:
    """Why an audio file cannot be used before decoding it (missing, empty, not a file), or None.

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


def rel_source(path: str, root: str) -> str:
    """``path`` relative to ``root`` with ``/`` separators (the ``source`` field of a sample)."""
    return os.path.relpath(path, root).replace(os.sep, "/")


def read_table(path: str, *, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """Rows of a delimited text file as ``(line_number, fields)``, with ``"..."`` quoting undone.

    Blank lines are dropped; a UTF-8 byte-order mark is ignored; fields are stripped.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter, quotechar='"')
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            yield reader.line_num, [c.strip() for c in row]

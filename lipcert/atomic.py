"""Atomic output: write into a temporary file or directory beside the target, then rename.

A reader (or a later run) sees the old output or the new one, never a half-written one, and
an interrupted or failed write leaves the old output as it was and no temporary behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lipcert.errors import LipcertError


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:
        raise LipcertError(f"cannot write {path}: {err.strerror}") from err
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, document: Any) -> Path:
    """``document`` as indented JSON (no NaN: the JSON standard has none)."""
    return write_text_atomic(path, json.dumps(document, indent=2, allow_nan=False) + "\n")


def check_output_writable(path: str | Path) -> None:
    """Fail early, before hours of work, if ``path``'s directory cannot take a new file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=f".{path.name}.", dir=path.parent):
            pass
    except OSError as err:
        raise LipcertError(f"cannot write {path}: {err.strerror}") from err


@contextmanager
def atomic_directory(path: str | Path, what: str | None = None) -> Iterator[Path]:
    """Build the directory ``path`` atomically: yield an empty temporary directory beside it
    to write into; when the block succeeds, move it into place, replacing any existing
    ``path``; when it raises, delete it and leave ``path`` untouched.

    The replacement renames the old ``path`` aside, renames the new directory into place
    (putting the old one back if that fails) and only then deletes the old one, so ``path``
    is at every moment absent (between the two renames), the complete old directory or the
    complete new one. Files are flushed to disk before the rename. The new directory gets
    the mode that ``mkdir`` would give it (0o777 less the umask). Deciding whether ``path``
    may be replaced at all is the caller's job, before the block. ``OSError`` from the block
    or the renames becomes a one-line ``LipcertError``: "cannot write WHAT: …", ``what``
    defaulting to the path.
    """
    what = what or str(path)
    path = Path(os.path.abspath(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as err:
        raise LipcertError(f"cannot write {what}: {err.strerror}") from err
    try:
        yield tmp
        _sync_tree(tmp)
        tmp.chmod(0o777 & ~_umask())
        _replace_directory(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LipcertError(f"cannot write {what}: {err}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_directory(new: Path, path: Path) -> None:
    """Rename ``new`` to ``path``; an existing ``path`` is renamed aside first and deleted
    once ``new`` is in place (restored if that rename fails)."""
    if not path.exists() and not path.is_symlink():
        os.replace(new, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    old.rmdir()
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _sync_tree(root: Path) -> None:
    """fsync every regular file under ``root``, so that the rename never publishes a
    directory whose files are still only in the page cache."""
    for folder, _, names in os.walk(root):
        for name in names:
            file = Path(folder) / name
            if file.is_file() and not file.is_symlink():
                fd = os.open(file, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

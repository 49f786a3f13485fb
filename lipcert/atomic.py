"""Atomic file output: write to a temporary file beside the target, then rename."""

from __future__ import annotations

import json
import os
import tempfile
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

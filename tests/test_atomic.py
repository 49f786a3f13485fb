"""Atomic output (lipcert.atomic): a directory is replaced whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import lipcert.atomic
from lipcert.atomic import atomic_directory
from lipcert.errors import LipcertError


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _old(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("old a")
    (out / "sub" / "b.txt").write_text("old b")
    return out


def test_new_directory_appears_whole_with_the_mkdir_mode(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "out"
    with atomic_directory(target) as tmp:
        assert tmp.parent == target.parent and tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "x.txt").write_text("new")
        assert not target.exists()
    assert _tree(target) == {"x.txt": b"new"}
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["out"]


def test_existing_directory_is_replaced_and_nothing_is_left_behind(tmp_path: Path) -> None:
    out = _old(tmp_path)
    with atomic_directory(out) as tmp:
        (tmp / "c.txt").write_text("new c")
    assert _tree(out) == {"c.txt": b"new c"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failing_block_leaves_the_old_directory(tmp_path: Path, error: BaseException) -> None:
    out = _old(tmp_path)
    before = _tree(out)
    with pytest.raises(type(error)), atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("half")
        raise error
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_os_errors_become_one_line_lipcert_errors(tmp_path: Path) -> None:
    out = _old(tmp_path)
    before = _tree(out)
    with pytest.raises(LipcertError, match=r"^cannot write the thing: .*No such file"), \
            atomic_directory(out, "the thing") as tmp:
        (tmp / "missing" / "x.txt").write_text("x")
    assert _tree(out) == before
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(LipcertError, match=r"^cannot write .*file/out: "), \
            atomic_directory(blocker / "out"):
        pass


def test_failed_swap_restores_the_old_directory(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    out = _old(tmp_path)
    before = _tree(out)
    real_replace = os.replace

    def replace(src: Path, dst: Path) -> None:
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(lipcert.atomic.os, "replace", replace)
    with pytest.raises(LipcertError, match="No space left"), atomic_directory(out) as tmp:
        (tmp / "c.txt").write_text("new c")
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

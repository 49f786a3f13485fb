"""The ``lipcert`` command line: exit codes, one-line errors, no partial output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lipcert.cli import main


def test_train_writes_a_run_and_says_where(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code = main(["train", "--preset", "vit-mnist-lipschitz-tiny", "--out", str(out),
                 "--steps", "3", "--seed", "7", "--w-max", "2", "--quiet"])
    assert code == 0
    assert f"run written to {out}" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["steps"] == 3 and config["seed"] == 7
    assert config["constraint"]["w_max"] == 2.0


def test_unknown_preset_and_flag_exit_non_zero(tmp_path: Path) -> None:
    for argv in (["train", "--preset", "nope", "--out", str(tmp_path / "a")],
                 ["train", "--preset", "vit-mnist-standard-tiny", "--out", str(tmp_path / "b"),
                  "--no-such-flag", "1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_fails_before_training(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = main(["train", "--preset", "vit-mnist-standard-tiny", "--out",
                 str(blocker / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot write the run directory")
    assert len(err.strip().splitlines()) == 1


def test_existing_run_needs_overwrite(tmp_path: Path, capsys) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    code = main(["train", "--preset", "vit-mnist-standard-tiny", "--out",
                 str(tmp_path / "run"), "--quiet"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "run" / "keep.txt").exists()


def test_invalid_override_is_one_line_error(tmp_path: Path, capsys) -> None:
    code = main(["train", "--preset", "vit-mnist-lipschitz-tiny", "--out", str(tmp_path / "r"),
                 "--optimizer", "sgd", "--quiet"])
    assert code == 2 and "unknown optimizer" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_nan_loss_keeps_last_good_run_and_fails(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code = main(["train", "--preset", "vit-mnist-standard-tiny", "--out", str(out),
                 "--adam-lr", "1e30", "--eval-every", "1", "--quiet"])
    assert code == 2
    assert "loss became" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["status"].startswith("stopped: loss became")


def test_console_script_help_lists_train() -> None:
    exe = Path(sys.executable).with_name("lipcert")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "train" in result.stdout

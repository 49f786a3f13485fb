"""The ``lipcert`` command line: exit codes, one-line errors, no partial output."""

from __future__ import annotations

import importlib
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


def test_every_verb_has_one_command_module() -> None:
    from lipcert import commands
    from lipcert.cli import build_parser

    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices  # the registered subcommands
    assert sorted(verbs) == ["attack", "certify", "demo", "report", "train"]
    for verb, sub in verbs.items():
        module = importlib.import_module(f"lipcert.commands.{verb}")
        assert sub.get_default("handler") is module.run
    assert "7 minutes" in verbs["demo"].description
    assert commands.__doc__ and "add_parser" in commands.__doc__


def test_tables_are_full_width_when_stdout_is_not_a_terminal(capsys) -> None:
    import pandas as pd

    from lipcert.commands.display import make_console, print_table, stdout_is_terminal

    assert not stdout_is_terminal()  # pytest captures stdout
    df = pd.DataFrame({f"a_long_column_name_{i}": [0.123456, 1.5] for i in range(12)})
    print_table(make_console(), df, "wide")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7  # title, top rule, header, rule, two rows, bottom rule
    assert all(f"a_long_column_name_{i}" in lines[2] for i in range(12))
    assert len(lines[2]) > 12 * 20


def test_demo_flags_are_checked(tmp_path: Path) -> None:
    for argv in (["--train-budget-s", "0"], ["--train-budget-s", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", "-o", str(tmp_path / "d"), *argv])
        assert exit_info.value.code == 2
    assert main(["demo", "-o", str(tmp_path / "d"), "--n-local", "0"]) == 2
    assert main(["demo", "-o", str(tmp_path / "d"), "--n-margin", "0"]) == 2
    assert not (tmp_path / "d").exists()


def test_demo_help_states_the_settings_defaults() -> None:
    from lipcert.cli import build_parser
    from lipcert.demo import DemoSettings

    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    text = " ".join(demo.format_help().split())
    d = DemoSettings()
    assert f"(default {d.out})" in text and f"(default {d.n_certify})" in text
    assert f"(default {d.n_local})" in text and f"default {d.train_budget_s:g})" in text
    assert f"(default {d.n_margin})" in text

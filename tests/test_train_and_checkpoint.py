"""Training, run directories and ``lipcert.load``: files, repeatability, bad input."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_PRESETS
from safetensors.torch import load_file, save_file

import lipcert
from lipcert.checkpoint import RUN_FILES, TRAIN_LOG, load_run, save_run
from lipcert.errors import CheckpointError, LipcertError
from lipcert.models import constrained_matrices, example_input
from lipcert.presets import PRESET_NAMES, preset
from lipcert.train import train


def test_every_preset_has_a_tiny_variant() -> None:
    full = [n for n in PRESET_NAMES if not n.endswith(("-tiny", "-paper"))]
    assert {f"{n}-tiny" for n in full} <= set(PRESET_NAMES)
    assert {"vit-mnist-lipschitz", "vit-mnist-standard", "gpt-shakespeare-lipschitz",
            "gpt-shakespeare-standard"} <= set(full)


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_run_directory_contents(tiny_runs: dict[str, Path], name: str) -> None:
    run = tiny_runs[name]
    assert sorted(p.name for p in run.iterdir()) == sorted(RUN_FILES)
    assert set(RUN_FILES) == {"model.safetensors", "config.json", "model.pt2", "train_log.csv"}
    config = json.loads((run / "config.json").read_text())
    assert config["status"] == "finished"
    assert config["seed"] == 0 and config["training"]["preset"] == name
    assert config["model"]["family"] in name
    assert 0 <= config["metrics"]["val_acc"] <= 1
    assert config["versions"]["torch"].startswith("2.")
    lines = (run / TRAIN_LOG).read_text().splitlines()
    assert lines[0].startswith("step,loss") and len(lines) == 1 + preset(name).steps


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_load_is_bit_identical_and_pt2_matches(tiny_runs: dict[str, Path], name: str) -> None:
    run = tiny_runs[name]
    model, _ = load_run(run)
    again = lipcert.load(run)
    x = example_input(model.config, batch=4)
    torch.testing.assert_close(model(x), again(x), rtol=0, atol=0)
    program = torch.export.load(run / "model.pt2")
    torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=1e-6)


def test_tiny_models_learn_something(tiny_runs: dict[str, Path]) -> None:
    for name in ("vit-mnist-lipschitz-tiny", "vit-mnist-standard-tiny"):
        acc = json.loads((tiny_runs[name] / "config.json").read_text())["metrics"]["val_acc"]
        assert acc > 0.3, (name, acc)  # chance is 0.1


def test_constrained_run_records_and_satisfies_bound(tiny_runs: dict[str, Path]) -> None:
    run = tiny_runs["vit-mnist-lipschitz-tiny"]
    model, config = load_run(run)
    w_max = config["constraint"]["w_max"]
    for name, weight in constrained_matrices(model):
        fan_out, fan_in = weight.shape
        sigma = torch.linalg.svdvals(weight.detach().double())[0].item()
        assert sigma * math.sqrt(fan_in / fan_out) <= w_max * (1 + 1e-6), name
    assert len(config["constraint"]["matrices"]) == len(constrained_matrices(model))


def test_same_seed_same_weights() -> None:
    a = train(preset("vit-mnist-lipschitz-tiny", steps=5), progress=False).model
    b = train(preset("vit-mnist-lipschitz-tiny", steps=5), progress=False).model
    c = train(preset("vit-mnist-lipschitz-tiny", steps=5, seed=1), progress=False).model
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.head.weight, c.head.weight)


def test_loading_a_run_needs_no_training_code(tiny_runs: dict[str, Path]) -> None:
    """``lipcert.load`` rebuilds a model without importing the training loop, the optimizers
    or the weight constraints."""
    script = ("import sys, lipcert\n"
              f"lipcert.load({str(tiny_runs['vit-mnist-lipschitz-tiny'])!r})\n"
              "print(sorted(m for m in sys.modules if m.startswith('lipcert')))")
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True).stdout
    loaded = set(ast.literal_eval(output))
    assert "lipcert.checkpoint" in loaded
    for module in ("lipcert.train", "lipcert.constraints", "lipcert.muon"):
        assert not {m for m in loaded if m == module or m.startswith(f"{module}.")}, module


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_weights_are_refused(tiny_runs: dict[str, Path], tmp_path: Path) -> None:
    run = _copy_run(tiny_runs["vit-mnist-standard-tiny"], tmp_path / "run")
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="sha256"):
        load_run(run)
    config = json.loads((run / "config.json").read_text())
    del config["weights_sha256"]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_run(run)


def test_config_that_does_not_match_weights(tiny_runs: dict[str, Path], tmp_path: Path) -> None:
    run = _copy_run(tiny_runs["vit-mnist-standard-tiny"], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["model"]["d_model"] = 48
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape"):
        load_run(run)
    config["model"]["n_layers"] = 3
    config["model"]["d_model"] = 32
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing"):
        load_run(run)


def test_nan_weights_are_refused(tiny_runs: dict[str, Path], tmp_path: Path) -> None:
    run = _copy_run(tiny_runs["vit-mnist-standard-tiny"], tmp_path / "run")
    state = load_file(run / "model.safetensors")
    state["head.weight"][0, 0] = math.nan
    save_file(state, run / "model.safetensors")
    config = json.loads((run / "config.json").read_text())
    del config["weights_sha256"]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="NaN"):
        load_run(run)


def test_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_run(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        load_run(tmp_path)


def test_existing_run_directory_is_not_overwritten(tiny_runs, tmp_path: Path) -> None:
    run = _copy_run(tiny_runs["vit-mnist-standard-tiny"], tmp_path / "run")
    result = train(preset("vit-mnist-standard-tiny", steps=2), progress=False)
    with pytest.raises(LipcertError, match="--overwrite"):
        save_run(result, run)
    save_run(result, run, overwrite=True)
    assert json.loads((run / "config.json").read_text())["training"]["steps"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary left behind


def test_nan_loss_stops_with_last_good_weights() -> None:
    result = train(preset("vit-mnist-standard-tiny", adam_lr=1e30, eval_every=1),
                   progress=False)
    assert result.status.startswith("stopped: loss became")
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert len(result.log) < preset("vit-mnist-standard-tiny").steps

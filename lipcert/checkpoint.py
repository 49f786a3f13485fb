"""Run directories: what a training run produced (:class:`TrainResult`), writing it
atomically, and loading it safely.

A run directory holds ``model.safetensors`` (the weights), ``config.json`` (architecture,
training settings, metrics, versions), ``model.pt2`` (``torch.export.save`` of the model)
and ``train_log.csv``; :data:`RUN_FILES` names them. Nothing in it is unpickled when it is
loaded, and loading needs neither the optimizers nor the weight constraints.
"""

from __future__ import annotations

import csv
import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lipcert.atomic import atomic_directory
from lipcert.errors import CheckpointError, LipcertError
from lipcert.models import ModelConfig, build_model, export_model
from lipcert.train_config import TrainConfig
from lipcert.versions import package_versions

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PROGRAM = "model.pt2"
TRAIN_LOG = "train_log.csv"
#: Every file a run directory holds, as ``save_run`` writes it.
RUN_FILES = (WEIGHTS, CONFIG, PROGRAM, TRAIN_LOG)
FORMAT_VERSION = 1


@dataclass
class TrainResult:
    """A trained model with everything a run directory records about it."""

    config: TrainConfig
    model: nn.Module
    metrics: dict[str, float]
    log: list[dict[str, float]]
    constraint_report: list[dict[str, Any]] = field(default_factory=list)
    status: str = "finished"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_writable(run_dir: str | Path, overwrite: bool = False) -> None:
    """Fail before training, not after, when ``run_dir`` cannot be written."""
    run_dir = Path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())) and not overwrite:
        raise LipcertError(f"{run_dir} already exists and is not empty; pass --overwrite")
    parent = run_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{run_dir.name}.", dir=parent):
            pass
    except OSError as err:
        raise LipcertError(f"cannot write the run directory {run_dir}: {err.strerror}") from err


def save_run(result: TrainResult, run_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``result`` as a run directory, atomically.

    Everything is written into a temporary sibling directory which is then renamed into
    place, so an interrupted or failed save never leaves a half-written run directory.
    """
    run_dir = Path(run_dir)
    check_writable(run_dir, overwrite)
    with atomic_directory(run_dir, f"the run directory {run_dir}") as tmp:
        _write_run(result, tmp)
    return run_dir


def _write_run(result: TrainResult, out: Path) -> None:
    model = result.model.eval().cpu()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / WEIGHTS)
    model_config: ModelConfig = model.config
    torch.export.save(export_model(model), out / PROGRAM)
    with open(out / TRAIN_LOG, "w", newline="") as f:
        columns = ["step", "loss", "train_acc", "lr", "val_loss", "val_acc", "elapsed_s"]
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(result.log)
    config = {
        "format_version": FORMAT_VERSION,
        "status": result.status,
        "model": model_config.to_dict(),
        "training": result.config.to_dict(),
        "dataset": result.config.dataset,
        "seed": result.config.seed,
        "metrics": result.metrics,
        "constraint": {"method": result.config.constraint, "w_max": result.config.w_max,
                       "norm": "rms->rms", "matrices": result.constraint_report},
        "versions": package_versions(),
        "weights_sha256": sha256_file(out / WEIGHTS),
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a run directory, validated."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a lipcert run directory (no {CONFIG})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"{path} has no 'model' section")
    return config


def load_run(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a run's model from ``config.json`` and ``model.safetensors``.

    Checks that the weights file is intact (sha256 as recorded), that its tensors match the
    architecture key for key and shape for shape, and that every value is finite.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{run_dir} has no {WEIGHTS}")
    recorded = config.get("weights_sha256")
    if recorded and sha256_file(weights) != recorded:
        raise CheckpointError(f"{weights} does not match the sha256 recorded in {CONFIG} "
                              "(corrupt, truncated or replaced)")
    try:
        model = build_model(ModelConfig.from_dict(config["model"]))
    except (TypeError, LipcertError) as err:
        raise CheckpointError(f"{run_dir / CONFIG}: invalid model config: {err}") from err
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {err}") from err
    load_state_checked(model, state, str(weights))
    return model.eval(), config


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` or raise ``CheckpointError`` saying what differs."""
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{source} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(expected[name].shape)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source}: {name} contains NaN or Inf values")
    model.load_state_dict(state)

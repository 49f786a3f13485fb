"""Shared fixtures: tiny trained runs, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lipcert.checkpoint import save_run
from lipcert.presets import preset
from lipcert.train import train

# Two cores: one torch thread per test process avoids pathological slowdowns when other
# processes (pytest-xdist workers, the machine's other jobs) share the cores.
torch.set_num_threads(1)

TINY_PRESETS = [
    "vit-mnist-lipschitz-tiny",
    "vit-mnist-standard-tiny",
    "gpt-shakespeare-lipschitz-tiny",
    "gpt-shakespeare-standard-tiny",
]


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny preset trained once and saved as a run directory."""
    root = tmp_path_factory.mktemp("runs")
    return {
        name: save_run(train(preset(name), progress=False), root / name) for name in TINY_PRESETS
    }

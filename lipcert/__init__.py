"""lipcert: certified Lipschitz bounds and adversarial testing for transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lipcert.certificate import Certificate, certify
from lipcert.errors import LipcertError

__all__ = ["Certificate", "LipcertError", "certify", "load", "load_with_config"]


def load(run_dir: str | Path) -> nn.Module:
    """Rebuild the model of a run directory (bit-identical outputs), in eval mode."""
    from lipcert.checkpoint import load_run

    model, _ = load_run(run_dir)
    return model


def load_with_config(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a run directory and its parsed ``config.json``."""
    from lipcert.checkpoint import load_run

    return load_run(run_dir)

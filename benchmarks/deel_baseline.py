"""deel-torchlip's 1-Lipschitz baselines for ``certified_vs_deel.py``: the networks, their
budgeted HKR training, and their export as ``.pt2`` files that ``lipcert certify`` reads.

* **Dense network**: ``Flatten → SpectralLinear(n, 256) → GroupSort2 →
  SpectralLinear(256, 256) → GroupSort2 → SpectralLinear(256, classes)``, as in
  deel-torchlip's dense MNIST example ("Example 3: HKR classifier on MNIST dataset").
* **Convolutional network**: ``SpectralConv2d(c, 16, 3) → GroupSort2 →
  ScaledL2NormPool2d(2) → SpectralConv2d(16, 32, 3) → GroupSort2 → ScaledL2NormPool2d(2) →
  Flatten → SpectralLinear(32·H/4·W/4, 64) → GroupSort2 → SpectralLinear(64, classes, no
  bias)``, as in deel-torchlip's "Example 4: HKR multiclass and fooling".
* **Training**: ``HKRMulticlassLoss(alpha=0.98, min_margin=1.0)`` (deel-lip calls it
  ``MulticlassHKR``), Adam, shuffled epochs until a wall-clock budget is spent (checked
  after every batch, so the last epoch may be partial).
* **Export**: ``vanilla_export()`` (plain ``Linear``/``Conv2d``, deel's ``GroupSort2``,
  ``LPPool2d(2)``), then ``torch.export.save`` with a dynamic batch dimension: lipcert
  certifies the exported graph as it is (it recognises GroupSort2 and L2-norm pooling).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

DEEL_VERSION = "1.0.5"
HKR_ALPHA = 0.98
HKR_MIN_MARGIN = 1.0
HIDDEN = 256


def require_deel() -> Any:
    """Import ``deel.torchlip``, or exit non-zero saying how to install it."""
    try:
        from deel import torchlip
    except ImportError as err:
        sys.exit(f"error: this benchmark needs deel-torchlip ({err}); install the benchmark "
                 f"extra with `pip install -e .[bench]` (deel-torchlip=={DEEL_VERSION})")
    if torchlip.__version__ != DEEL_VERSION:
        print(f"warning: deel-torchlip {torchlip.__version__} is installed; this benchmark "
              f"pins {DEEL_VERSION}", file=sys.stderr)
    return torchlip


def build_deel(torchlip: Any, in_features: int, num_classes: int) -> nn.Module:
    """deel-torchlip's 1-Lipschitz dense net: in-256-256-classes, SpectralLinear + GroupSort2."""
    return torchlip.Sequential(
        nn.Flatten(),
        torchlip.SpectralLinear(in_features, HIDDEN),
        torchlip.GroupSort2(),
        torchlip.SpectralLinear(HIDDEN, HIDDEN),
        torchlip.GroupSort2(),
        torchlip.SpectralLinear(HIDDEN, num_classes),
    )


def build_deel_conv(torchlip: Any, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """deel-torchlip's 1-Lipschitz convolutional net of its HKR tutorial (module docstring)
    for images of ``shape`` (C, H, W), H and W divisible by 4."""
    channels, height, width = shape
    return torchlip.Sequential(
        torchlip.SpectralConv2d(channels, 16, (3, 3), padding="same"),
        torchlip.GroupSort2(),
        torchlip.ScaledL2NormPool2d(kernel_size=(2, 2)),
        torchlip.SpectralConv2d(16, 32, (3, 3), padding="same"),
        torchlip.GroupSort2(),
        torchlip.ScaledL2NormPool2d(kernel_size=(2, 2)),
        nn.Flatten(),
        torchlip.SpectralLinear(32 * (height // 4) * (width // 4), 64),
        torchlip.GroupSort2(),
        torchlip.SpectralLinear(64, num_classes, bias=False),
    )


@dataclass
class DeelTraining:
    """What the budgeted deel training did; ``log`` has one row per (possibly partial) epoch:
    epoch, step, loss, train_acc, elapsed_s."""

    epochs: float
    steps: int
    wall_s: float
    log: list[dict[str, float]] = field(default_factory=list)

    def log_csv(self) -> str:
        """The log as CSV, every value to 6 significant digits."""
        return pd.DataFrame(self.log).map(lambda v: f"{v:.6g}").to_csv(
            index=False, lineterminator="\n")


def train_deel(torchlip: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               num_classes: int, budget_s: float, batch_size: int, lr: float, seed: int
               ) -> DeelTraining:
    """Adam + multiclass HKR over shuffled epochs until ``budget_s`` seconds have passed
    (checked after every batch)."""
    loss_fn = torchlip.HKRMulticlassLoss(alpha=HKR_ALPHA, min_margin=HKR_MIN_MARGIN)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    batches_per_epoch = math.ceil(len(x) / batch_size)
    steps, log = 0, []
    model.train()
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < budget_s:
        order = torch.randperm(len(x), generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            xb, yb = x[idx], y[idx]
            out = model(xb)
            loss = loss_fn(out, nn.functional.one_hot(yb, num_classes))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((out.detach().argmax(1) == yb).sum())
            seen += len(idx)
            elapsed = time.perf_counter() - start
            if elapsed >= budget_s:
                break
        log.append({"epoch": round(steps / batches_per_epoch, 4), "step": steps,
                    "loss": loss_sum / seen, "train_acc": correct / seen, "elapsed_s": elapsed})
        print(f"  deel epoch {log[-1]['epoch']:.2f}: loss {log[-1]['loss']:.4f}, "
              f"train acc {log[-1]['train_acc']:.4f}, {elapsed:.0f}/{budget_s:.0f} s", flush=True)
    model.eval()
    return DeelTraining(steps / batches_per_epoch, steps, elapsed, log)


def export_deel(model: nn.Module, x_test: torch.Tensor, path: Path
                ) -> tuple[nn.Module, float | None]:
    """``vanilla_export()`` the trained net and ``torch.export.save`` it to ``path`` (a name
    ending ``.pt2``) with a dynamic batch dimension, checking that the program computes the
    module's outputs. Returns the vanilla module and, for a dense net, the product of its
    layers' float64 σ_max (a plain SVD: a cross-check, not a certificate; ``None`` for a
    convolutional net, whose layers' norms are not their kernels' σ_max)."""
    vanilla = model.vanilla_export().eval()
    sigma: float | None = 1.0
    for module in vanilla.modules():
        if isinstance(module, nn.Conv2d):
            sigma = None
            break
        if isinstance(module, nn.Linear):
            sigma *= float(torch.linalg.matrix_norm(module.weight.double(), ord=2))
    batch = torch.export.Dim("batch")
    program = torch.export.export(vanilla, (x_test[:2],), dynamic_shapes=({0: batch},))
    with torch.no_grad():  # the dynamic batch dimension really is dynamic
        if not torch.equal(program.module()(x_test[:5]), vanilla(x_test[:5])):
            raise AssertionError("the exported program's outputs differ from the module's")
    torch.export.save(program, path)
    return vanilla, sigma

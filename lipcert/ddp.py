"""Training under torchrun: ``DistributedDataParallel`` over one global batch.

Every rank draws the same global batch of B samples (the batch generator is seeded alike)
and takes a contiguous block of B_r of its rows (``lipcert.distributed.block``; uneven
blocks allowed). Every loss is a mean over its samples (tokens, for text, T per row), so
the global batch's loss is Σ_r (B_r / B)·ℓ_r; DDP averages the ranks' gradients, (1/W)·Σ_r
∇ℓ'_r, so each rank back-propagates ℓ'_r = W·(B_r / B)·ℓ_r and the averaged gradient is
the global batch's. After the average every rank holds the same gradient (gloo and NCCL
give every rank the same reduced values), so the optimizers (Muon included) and the
weight constraints, which are deterministic (their only randomness is seeded by the
matrix's shape), leave the weights identical on every rank. Only the order of the
floating-point sums differs from one process, so the weights stay close to, not equal to,
those of one process.

Decisions that must agree on every rank use global values: the loss that is logged and
checked for NaN (reduced over the ranks), and the elapsed time of ``max_time_s`` (rank
0's clock).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lipcert.distributed import block, broadcast, world

__all__ = ["DataParallel"]


class DataParallel:
    """The training model on every rank: ``net`` (the DDP wrapper, or the model itself in
    one process) for forward passes, ``module`` for everything else."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.world = world()
        self.module = model
        self.device = device
        self.net: nn.Module = model
        if self.world.size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.net = DistributedDataParallel(model, device_ids=ids)

    def shard(self, x: torch.Tensor, y: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's rows of the global batch, and W·B_r/B, the factor of its loss."""
        if self.world.size == 1:
            return x, y, 1.0
        rows = block(len(x), self.world)
        return (x[rows.start:rows.stop], y[rows.start:rows.stop],
                self.world.size * len(rows) / len(x))

    def global_stats(self, loss: torch.Tensor, correct: int, n: int, factor: float
                     ) -> tuple[float, int, int]:
        """The global batch's loss, correct count and count, the same on every rank."""
        if self.world.size == 1:
            return loss.item(), correct, n
        t = torch.tensor([loss.item() * factor / self.world.size, correct, n],
                         dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t[0]), int(t[1]), int(t[2])

    def elapsed(self, seconds: float) -> float:
        """Rank 0's elapsed seconds, so that a time budget ends every rank's loop alike."""
        return broadcast(seconds) if self.world.size > 1 else seconds

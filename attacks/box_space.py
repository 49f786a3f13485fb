"""Attacks on inputs of any shape in a box [lo, hi]^n (``--domain box:LO,HI``).

torchattacks clamps to [0, 1] and reshapes per-sample norms as if inputs were 4-D images
(``attacks.embedding`` explains why). ``BoxSpace`` maps the box onto [0, 1]^n by the affine
map x = lo + (hi − lo)·u (an ``AffineBoxMap`` with c = (lo + hi)/2, s = hi − lo), so
torchattacks' clamp is exactly the domain's, and gives the attacks a 4-D view (B, 1, …) of
u. Budgets scale exactly: ‖x − x'‖ = (hi − lo)·‖u − u'‖ in every norm, so
ε_box = ε / (hi − lo). Adversarial inputs are decoded relative to the clean input,
x' = x + (hi − lo)·(u' − u), and ``attacks.space.project`` enforces the budget and the box
in the model's own coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from attacks.embedding import AffineBoxMap
from lipcert.errors import LipcertError

__all__ = ["BoxSpace"]


@dataclass(frozen=True)
class BoxSpace(AffineBoxMap):
    """Inputs with every element in [``lo``, ``hi``] (finite, lo < hi), of any shape."""

    lo: float
    hi: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
            raise LipcertError(f"an attack box needs finite lo < hi, got [{self.lo}, {self.hi}]")

    @property
    def center(self) -> float:
        return (self.lo + self.hi) / 2

    @property
    def scale(self) -> float:
        """hi − lo: one unit of box coordinates is this many units of input space."""
        return self.hi - self.lo

    def describe(self) -> dict[str, Any]:
        return {"kind": "box", "domain": f"[{self.lo!r}, {self.hi!r}]",
                "map": "x = lo + (hi - lo)*u"}

    def validate(self, x: torch.Tensor, eps_l2: list[float], eps_linf: list[float]) -> None:
        if x.numel() and (x.min() < self.lo or x.max() > self.hi):
            raise LipcertError(f"the inputs lie in [{x.min().item():.6g}, {x.max().item():.6g}], "
                               f"outside the domain [{self.lo:g}, {self.hi:g}]")

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(self.lo, self.hi)

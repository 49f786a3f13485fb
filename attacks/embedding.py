"""Embedding-space attacks: an adapter that lets torchattacks attack embedded text.

Why this adapter is hand-written. torchattacks assumes image batches (B, C, H, W) in
[0, 1]: most attacks hard-code ``clamp(0, 1)``, and PGDL2/APGD-L2 reshape per-sample norms
with ``.view(B, 1, 1, 1)`` or sum over ``dim=(1, 2, 3)``. Token embeddings are neither in
[0, 1] nor 4-D. Fed a (B, T, d) batch, PGDL2 raises a broadcast error with its random start
and, without it, silently broadcasts the step to (B, B, T, d); the clamp would also cut
every negative embedding coordinate to 0. Neither library offers a hook for a different
domain, so the map is written out here, and tested:

* an affine map from the box [0, 1]^n to the embedding space, x = c + s·(u − 0.5), with a
  scalar centre c and scale s = 2·h, where the half-width h is wide enough that the box
  holds every clean embedding plus the largest ε used: then the attacks' clamp never binds;
* budgets rescaled exactly: ‖x − x'‖ = s·‖u − u'‖ in every norm, so ε_box = ε / s;
* a 4-D view (B, 1, T, d) of the box coordinates, so per-sample reshapes are per sample.

c and s are scalars, not per-sample values, because APGD, FAB and AutoAttack call the model
on subsets of the batch. Adversarial inputs are decoded relative to the clean input
(x' = x + s·(u' − u)), so the clean point is exactly x; ``attacks.space.project`` then
enforces the budget in the original embedding space.

``NextTokenClassifier`` turns a GPT (``lipcert.models.EmbeddingSpaceGPT``: embeddings
(B, T, d) → logits (B, T, V)) into a classifier of the next character at one position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lipcert.errors import LipcertError

__all__ = ["AffineBoxMap", "BoxModel", "EmbeddingBox", "NextTokenClassifier", "four_d_shape"]


def four_d_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(B, T, d) → (B, 1, T, d); (B, n) → (B, 1, 1, n); (B, a, b, c, …) → (B, 1, a, b·c·…)."""
    batch, *rest = shape
    if not rest:
        raise ValueError("inputs need a batch dimension and at least one more")
    if len(rest) == 1:
        return (batch, 1, 1, rest[0])
    return (batch, 1, rest[0], math.prod(rest[1:]))


class AffineBoxMap:
    """The affine map x = c + s·(u − 0.5) between torchattacks' box u ∈ [0, 1]^n (viewed
    4-D) and the model's inputs x, with c = ``center`` and s = ``scale`` given by the
    subclass, as is ``clamp`` (its projection onto the input domain). Budgets scale exactly,
    ‖x − x'‖ = s·‖u − u'‖ in every norm, and adversarial inputs are decoded relative to the
    clean input, x' = x + s·(u' − u)."""

    center: float
    scale: float

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def wrap(self, model: nn.Module, sample_shape: tuple[int, ...]) -> nn.Module:
        return BoxModel(model, self, sample_shape)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (0.5 + (x - self.center) / self.scale).reshape(four_d_shape(tuple(x.shape)))

    def box_eps(self, eps: float) -> float:
        return eps / self.scale

    def decode(self, x: torch.Tensor, u_clean: torch.Tensor, u_adv: torch.Tensor
               ) -> torch.Tensor:
        return x + self.scale * (u_adv - u_clean).reshape(x.shape)


class BoxModel(nn.Module):
    """``model`` seen from the box: u (B, 1, …) ↦ model(P(c + s·(u − 0.5))), reshaped to the
    model's per-sample input shape, where P is the box's domain projection (identity when
    the domain is unbounded), so attacks optimise exactly what is evaluated afterwards."""

    def __init__(self, model: nn.Module, box: AffineBoxMap,
                 sample_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.model, self.box = model, box
        self.sample_shape = tuple(sample_shape)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        x = self.box.center + self.box.scale * (u.reshape(len(u), *self.sample_shape) - 0.5)
        return self.model(self.box.clamp(x))


@dataclass(frozen=True)
class EmbeddingBox(AffineBoxMap):
    """The affine box map x = c + s·(u − 0.5), s = 2·``half_width``, c = ``center``.

    The box covers x ∈ [c − h, c + h] in every coordinate. ``validate`` checks that it
    holds every clean input plus the largest ε, which is enough for both norms because a
    perturbation with ‖δ‖₂ ≤ ε or ‖δ‖∞ ≤ ε has |δ_i| ≤ ε in every coordinate.

    ``max_token_norm``, if set, is the input domain: every token (last dimension) has L2
    norm at most this (for embedded text: the embedding table's largest row norm, the
    domain certificates are valid on). ``clamp`` projects onto it; the projection is
    non-expansive and the clean input lies inside, so it never lengthens a perturbation
    in L2 (``attacks.space.project`` re-checks both norms).
    """

    half_width: float
    center: float = 0.0
    max_token_norm: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.half_width) and self.half_width > 0):
            raise LipcertError(f"the box half-width must be finite and > 0, "
                               f"got {self.half_width}")

    @classmethod
    def around(cls, x: torch.Tensor, eps_max: float, margin: float = 2.0,
               center: float = 0.0, max_token_norm: float | None = None) -> EmbeddingBox:
        """A box holding ``x`` plus ``margin`` times the room it needs for ``eps_max``:
        h = margin · (max|x − c| + eps_max). ``margin > 1`` leaves room for minimal
        attacks (CW, DeepFool) that move further than ε before the harness projects."""
        reach = float((x.double() - center).abs().max()) if x.numel() else 0.0
        return cls(margin * (reach + eps_max), center, max_token_norm)

    @classmethod
    def for_token_norm(cls, max_token_norm: float, eps_max: float, margin: float = 2.0
                       ) -> EmbeddingBox:
        """The box for every sequence of tokens of norm ≤ ``max_token_norm`` (so for every
        sequence of embedding-table rows, whichever tokens are attacked), with that
        domain: no coordinate of such a token exceeds its norm."""
        return cls(margin * (max_token_norm + eps_max), 0.0, max_token_norm)

    @property
    def scale(self) -> float:
        """s = 2h: one unit of box coordinates is s units of embedding space."""
        return 2.0 * self.half_width

    def describe(self) -> dict[str, Any]:
        return {"kind": "embedding-box", "half_width": self.half_width, "center": self.center,
                "max_token_norm": self.max_token_norm,
                "map": "x = center + 2*half_width*(u - 0.5)"}

    def validate(self, x: torch.Tensor, eps_l2: list[float], eps_linf: list[float]) -> None:
        eps_max = max([*eps_l2, *eps_linf], default=0.0)
        reach = float((x.double() - self.center).abs().max()) if x.numel() else 0.0
        if reach + eps_max > self.half_width:
            raise LipcertError(
                f"the embedding box (half-width {self.half_width:.4g}) is too narrow: inputs "
                f"reach {reach:.4g} and ε up to {eps_max:.4g}, so torchattacks' clamp(0, 1) "
                "would bind; use a wider box (EmbeddingBox.around)"
            )
        if self.max_token_norm is not None and x.numel():
            norms = torch.linalg.vector_norm(x.double(), dim=-1)
            if norms.max() > self.max_token_norm:
                raise LipcertError(f"input tokens have norms up to {norms.max():.6g}, above "
                                   f"the domain's bound {self.max_token_norm:.6g}")

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_token_norm is None:
            return x
        norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        return x * torch.clamp(self.max_token_norm / norms.clamp_min(1e-30), max=1.0)


class NextTokenClassifier(nn.Module):
    """A sequence model's logits at one ``position`` as a classifier: (B, T, d) → (B, V).

    For a causal GPT the prediction at position p depends on tokens 0..p only; the default
    −1 is the next character after the whole window. A model that already returns (B, V)
    is passed through.
    """

    def __init__(self, model: nn.Module, position: int = -1) -> None:
        super().__init__()
        self.model, self.position = model, position

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        logits = self.model(embeddings)
        return logits[:, self.position] if logits.dim() == 3 else logits

"""Where attacks run, and how their results are brought back within budget.

torchattacks assumes its inputs live in [0, 1]^n (it clamps to that box) and measures ε in
the same coordinates. An ``AttackSpace`` maps the model's inputs into such a box and back:

* ``ImageSpace``: images already live in [0, 1]^n, so the map is the identity;
* ``attacks.embedding.EmbeddingBox``: an affine map for embedded text (see there).

Whatever the attack returns, ``project`` puts the perturbation back inside the ε-ball of
the *model's* input space (and ``space.clamp`` inside its domain), and checks the result in
float64, so every recorded adversarial example is within budget exactly, not up to the
rounding of the attack's own projection.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import nn

from lipcert.errors import LipcertError

__all__ = ["AttackSpace", "ImageSpace", "measure", "project"]


class AttackSpace(Protocol):
    """The map between a model's input space and torchattacks' [0, 1] box."""

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (recorded with the results)."""

    def validate(self, x: torch.Tensor, eps_l2: list[float], eps_linf: list[float]) -> None:
        """Raise ``LipcertError`` if ``x`` or an ε does not fit this space."""

    def wrap(self, model: nn.Module, sample_shape: tuple[int, ...]) -> nn.Module:
        """The model as a function of box coordinates (what torchattacks attacks)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Box coordinates of the inputs ``x`` (a 4-D tensor, batch first)."""

    def box_eps(self, eps: float) -> float:
        """The budget in box coordinates that equals ``eps`` in the model's space."""

    def decode(self, x: torch.Tensor, u_clean: torch.Tensor, u_adv: torch.Tensor
               ) -> torch.Tensor:
        """The adversarial input in the model's space, given ``x`` = decode(``u_clean``)."""

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        """Project onto the input domain (a no-op where the domain is unbounded)."""


class ImageSpace:
    """Images in [0, 1]^n: torchattacks attacks them directly (the identity map)."""

    def describe(self) -> dict[str, Any]:
        return {"kind": "image", "domain": "[0, 1]"}

    def validate(self, x: torch.Tensor, eps_l2: list[float], eps_linf: list[float]) -> None:
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise LipcertError(f"image inputs must lie in [0, 1], got values in "
                               f"[{x.min().item():.4g}, {x.max().item():.4g}]")
        n = x[0].numel() if len(x) else 1
        for eps in eps_linf:
            if eps >= 1:
                raise LipcertError(f"an L∞ ε of {eps} covers the whole [0, 1] pixel range; "
                                   "image L∞ budgets must be < 1 (write 8/255, not 8)")
        for eps in eps_l2:
            if eps >= math.sqrt(n):
                raise LipcertError(f"an L2 ε of {eps} is at least the diameter √n = "
                                   f"{math.sqrt(n):.4g} of [0, 1]^{n}; no image is robust")

    def wrap(self, model: nn.Module, sample_shape: tuple[int, ...]) -> nn.Module:
        return model

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def box_eps(self, eps: float) -> float:
        return eps

    def decode(self, x: torch.Tensor, u_clean: torch.Tensor, u_adv: torch.Tensor
               ) -> torch.Tensor:
        return u_adv.reshape(x.shape)

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


def measure(x: torch.Tensor, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ‖x_adv − x‖₂ and ‖x_adv − x‖∞ of the flattened inputs, in float64.

    The float64 difference of two float32 tensors is exact, so these are the true norms up
    to the rounding of the final sum.
    """
    delta = (x_adv.double() - x.double()).flatten(1)
    return torch.linalg.vector_norm(delta, dim=1), delta.abs().amax(dim=1)


def project(x: torch.Tensor, x_adv: torch.Tensor, norm: str, eps: float | torch.Tensor,
            space: AttackSpace) -> torch.Tensor:
    """``x_adv`` moved into the ``norm`` ball of radius ``eps`` around ``x`` and into the
    domain of ``space``, with the budget checked by ``measure`` (float64).

    ``eps`` is one radius, or one per sample (a tensor of shape (B,)). First the ball: L∞
    clips each coordinate of δ to [−ε, ε], L2 scales δ by min(1, ε/‖δ‖₂). Then the domain
    (``space.clamp``). Then, for samples whose measured δ still exceeds ε (float rounding,
    or a domain projection that is not a coordinate clamp), δ is shrunk towards x by a
    growing factor until ``measure`` agrees; the domain is convex and holds x, so shrinking
    stays inside it. A sample that cannot be fitted (only possible for ε near float32
    resolution) falls back to δ = 0.
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"unknown norm {norm!r}")
    radius = torch.as_tensor(eps, dtype=torch.float64, device=x.device).expand(len(x))
    column = radius.view(-1, 1)
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        bound = column.to(delta.dtype)
        delta = torch.minimum(torch.maximum(delta, -bound), bound)
    else:
        length = torch.linalg.vector_norm(delta.double(), dim=1, keepdim=True)
        delta = delta * torch.clamp(column / length.clamp_min(1e-300), max=1.0).to(delta.dtype)
    out = space.clamp(x + delta.view_as(x))
    delta = (out - x).flatten(1)
    for attempt in range(12):
        l2, linf = measure(x, out)
        size = l2 if norm == "l2" else linf
        over = size > radius
        if not over.any():
            return out
        if attempt == 11:
            break
        factor = (radius[over] / size[over]) * max(0.0, 1.0 - 1e-6 * 8.0**attempt)
        delta[over] *= factor.clamp(max=1.0).to(delta.dtype).unsqueeze(1)
        out = x + delta.view_as(x)
    out[over] = x[over]
    return out

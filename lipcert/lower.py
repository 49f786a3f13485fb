"""Empirical lower bounds on the Lipschitz constant of a model's logits (kind ``lower``).

If f is L-Lipschitz in the L2 norm and differentiable at x, then for every unit vector v

    ‖J(x)v‖ = lim_{t→0} ‖f(x + tv) − f(x)‖ / t ≤ L,

so the spectral norm ‖J(x)‖₂ = max_{‖v‖=1} ‖J(x)v‖ at any point, and ‖J(x)v‖ for any unit v,
is a lower bound of L. A lower bound is a witness: the value is a norm actually measured at
a recorded point, never an extrapolation. Two caveats: the measurement carries the
rounding error of the model's dtype (about 1e-6 relative in float32), and at a kink of f
(ReLU at 0, a projection's boundary) autograd returns one one-sided derivative, which is a
limit of Jacobians at nearby points for the usual activations; data and ascent points
almost never sit exactly on a kink.

With a certified upper bound U, the lower bound brackets the true constant, L ∈ [lower, U];
``tightness_ratio`` = U / lower says how much the certificate could still improve.

Jacobian products use reverse-mode autograd only: Jᵀu is one backward pass, and Jv is the
backward pass of the linear map u ↦ Jᵀu (double backward). ``torch.func.jvp`` is not used
because it silently returns a zero tangent through custom operators that only register a
backward formula (such as ``lipcert::token_ball``), and ``torch.func.vjp`` refuses them.
Double backward through ``scaled_dot_product_attention`` needs its math backend, which is
selected for the duration of each computation. The model must treat batch samples
independently (eval mode: no batch statistics); then the Jacobian of the batched function
is block diagonal and one batched product is the per-sample products side by side.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lipcert.errors import LipcertError

__all__ = ["LowerBound", "empirical_lipschitz", "jacobian_norm", "tightness_ratio"]

Model = Callable[[torch.Tensor], torch.Tensor]
_INNER_ITERS = 3  # warm-started power iterations per ascent step


@dataclass
class LowerBound:
    """A measured lower bound of the Lipschitz constant (L2 → L2) of a model's logits.

    ``value`` = ‖J(point)v‖ for a unit vector v, where ``point`` was reached from sample
    ``at_index`` of the given inputs (``point`` is that sample itself when gradient ascent
    did not improve on it). ``initial`` is the best value over the given samples, before
    gradient ascent.
    """

    value: float
    at_index: int
    method: str
    point: torch.Tensor = field(repr=False)
    initial: float
    kind: Literal["lower"] = "lower"

    def to_dict(self) -> dict[str, float | int | str]:
        """The JSON form: ``{"value", "kind", "at_index", "method"}``."""
        return {"value": self.value, "kind": self.kind, "at_index": self.at_index,
                "method": self.method}


def jacobian_norm(
    f: Model, x: torch.Tensor, iters: int = 30, *, seed: int = 0, batch_size: int = 256
) -> torch.Tensor:
    """Per-sample spectral norm of the Jacobian of ``f`` at each row of ``x`` (float64, (B,)).

    ``f`` maps a batch (B, *in) to (B, *out); J_b = ∂f(x)_b/∂x_b is taken with both sides
    flattened. Power iteration on J_bᵀJ_b from a seeded random start,

        v ← JᵀJv / ‖JᵀJv‖   (``iters`` times),   σ̂ = ‖J v‖ with ‖v‖ = 1,

    returns σ̂ ≤ σ_max(J_b), a lower bound of the Lipschitz constant (module docstring).
    σ̂ never decreases with more iterations (the Rayleigh quotient of a PSD matrix grows
    along power iteration); the relative error of σ̂² shrinks like (σ₂/σ₁)^(4·iters), which
    is slow when the top singular values cluster (orthogonally constrained models).
    """
    sigma, _, _ = _scan(f, x, iters, seed, batch_size)
    return sigma


def empirical_lipschitz(
    f: Model,
    x: torch.Tensor,
    *,
    iters: int = 30,
    ascent_steps: int = 50,
    top_k: int = 8,
    step_size: float | None = None,
    domain: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
    batch_size: int = 256,
) -> LowerBound:
    """The largest Jacobian spectral norm of ``f`` found at and near the samples ``x``.

    1. ``jacobian_norm`` at every sample.
    2. From the ``top_k`` best samples, ``ascent_steps`` steps of normalised gradient ascent
       on σ(x)² = ‖J(x)‖₂²: with (u, v) the current top singular pair of J(x) (u = Jv/‖Jv‖,
       held fixed during the step), the step follows ∇ₓ‖J(x)ᵀu‖², which equals
       ∇ₓ‖J(x)v‖² = ∇ₓσ(x)² at the singular pair (both are 2σ·uᵀ(∂J)v). Each sample moves
       by its own step length η in L2 (default 0.02·√n, n the elements per sample), is
       clamped to ``domain`` when one is given, and is measured with a few warm-started
       power iterations: a step that raises the measured norm is kept and η grows by 1.5,
       otherwise it is undone and η halves.
    3. The final points are measured again with ``iters`` warm-started power iterations.

    The value is the largest norm measured, at a data sample or at a final point, so it
    never falls below step 1's best (``LowerBound.initial``).
    """
    if top_k < 1 or ascent_steps < 0 or iters < 1:
        raise LipcertError("empirical_lipschitz needs top_k >= 1, ascent_steps >= 0, iters >= 1")
    sigma, v, u = _scan(f, x, iters, seed, batch_size)
    top = torch.argsort(sigma, descending=True)[:top_k]
    best = int(top[0])
    value, point, at_index = float(sigma[best]), x[best], best
    if ascent_steps:
        points, final = _ascend(f, x[top], v[top], u[top], sigma[top], ascent_steps, iters,
                                step_size, domain)
        j = int(torch.argmax(final))
        if final[j] > value:
            value, point, at_index = float(final[j]), points[j], int(top[j])
    method = (f"power iteration on JᵀJ ({iters} iterations) at {len(x)} samples, then "
              f"{ascent_steps} steps of gradient ascent on ‖J(x)‖₂ from the top "
              f"{len(top)}; largest measured ‖J(x)v‖, ‖v‖ = 1")
    return LowerBound(value, at_index, method, point.detach().clone(), float(sigma[best]))


def tightness_ratio(upper: float | None, lower: float | None) -> float | None:
    """``upper / lower``, or ``None`` when either is missing, not finite, or lower ≤ 0.

    Since lower ≤ L ≤ upper, the ratio is ≥ 1 and bounds how loose the certificate can be.
    """
    if upper is None or lower is None or not (math.isfinite(upper) and math.isfinite(lower)):
        return None
    return upper / lower if lower > 0 else None


# --------------------------------------------------------------------------- internals


class _Linearization:
    """Products with J(x) and J(x)ᵀ for one batch, from one forward pass (reverse mode)."""

    def __init__(self, f: Model, x: torch.Tensor) -> None:
        self.x = x.detach().requires_grad_(True)
        self.y = f(self.x)
        if not isinstance(self.y, torch.Tensor) or self.y.dim() == 0 or len(self.y) != len(x):
            got = getattr(self.y, "shape", type(self.y).__name__)
            raise LipcertError(f"the model must map a batch of {len(x)} to {len(x)} outputs, "
                               f"got {got}")
        self.zero = not self.y.requires_grad  # f does not depend on x
        if not self.zero:
            self.u0 = torch.zeros_like(self.y, requires_grad=True)
            (self.g,) = torch.autograd.grad(self.y, self.x, self.u0, create_graph=True)

    def jv(self, v: torch.Tensor) -> torch.Tensor:
        """J v: the vector-Jacobian product of the linear map u ↦ Jᵀu, applied to v."""
        if self.zero:
            return torch.zeros_like(self.y)
        (out,) = torch.autograd.grad(self.g, self.u0, v, retain_graph=True, allow_unused=True,
                                     materialize_grads=True)
        return out

    def jtu(self, u: torch.Tensor) -> torch.Tensor:
        """Jᵀ u."""
        if self.zero:
            return torch.zeros_like(self.x)
        (out,) = torch.autograd.grad(self.y, self.x, u, retain_graph=True)
        return out


def _norms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norms in float64."""
    return t.detach().flatten(1).double().norm(dim=1)


def _unit(w: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Each sample of ``w`` scaled to norm 1; ``fallback`` where ``w`` is zero."""
    n = _norms(w).to(w.dtype).view(-1, *[1] * (w.dim() - 1))
    return torch.where(n > 0, w / n.clamp_min(torch.finfo(w.dtype).tiny), fallback)


def _power(f: Model, x: torch.Tensor, v: torch.Tensor, iters: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(σ̂, v, u): σ̂ = ‖Jv‖ after ``iters`` power iterations from ``v``; u = Jv/‖Jv‖."""
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        lin = _Linearization(f, x)
        v = _unit(v, v)
        for _ in range(iters):
            v = _unit(lin.jtu(lin.jv(v)), v)
        jv = lin.jv(v)
    u = _unit(jv, torch.zeros_like(jv))
    return _norms(jv) / _norms(v), v.detach(), u.detach()


def _scan(f: Model, x: torch.Tensor, iters: int, seed: int, batch_size: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_power`` over all samples, in chunks, from a seeded random start."""
    if not x.is_floating_point() or x.dim() < 1 or len(x) == 0:
        raise LipcertError(
            f"the Jacobian needs a non-empty floating-point batch, got {x.dtype} of shape "
            f"{tuple(x.shape)} (for a GPT, pass embeddings to EmbeddingSpaceGPT)"
        )
    gen = torch.Generator().manual_seed(seed)
    v0 = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    parts = [_power(f, x[i:i + batch_size], v0[i:i + batch_size], iters)
             for i in range(0, len(x), batch_size)]
    sigma, v, u = (torch.cat(p) for p in zip(*parts, strict=True))
    return sigma, v, u


def _ascent_gradient(f: Model, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """∇ₓ Σ_b ‖J_b(x)ᵀu_b‖² with u fixed (samples are independent, so row b is sample b's)."""
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        xr = x.detach().requires_grad_(True)
        y = f(xr)
        if not y.requires_grad:
            return torch.zeros_like(x)
        (jtu,) = torch.autograd.grad(y, xr, u, create_graph=True)
        if not jtu.requires_grad:  # J does not depend on x (f is affine)
            return torch.zeros_like(x)
        (grad,) = torch.autograd.grad(jtu.pow(2).sum(), xr, allow_unused=True,
                                      materialize_grads=True)
    return grad.detach()


def _ascend(
    f: Model,
    x: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    sigma: torch.Tensor,
    steps: int,
    iters: int,
    step_size: float | None,
    domain: tuple[float, float] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive normalised gradient ascent on σ(x) from each row of x; (points, σ̂ there)."""
    x = x.detach().clone()
    shape = (-1, *[1] * (x.dim() - 1))
    n = x[0].numel()
    eta = torch.full((len(x),), step_size or 0.02 * math.sqrt(n), dtype=torch.float64)
    for _ in range(steps):
        grad = _ascent_gradient(f, x, u)
        step = _unit(grad, torch.zeros_like(grad)) * eta.to(x.dtype).view(shape)
        trial = x + step
        if domain is not None:
            trial = trial.clamp(*domain)
        s, v_new, u_new = _power(f, trial, v, _INNER_ITERS)
        better = s > sigma
        x, v, u = _pick(better, trial, x), _pick(better, v_new, v), _pick(better, u_new, u)
        sigma = torch.where(better, s, sigma)
        eta = torch.where(better, eta * 1.5, eta * 0.5)
    final, _, _ = _power(f, x, v, iters)
    return x, final


def _pick(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sample b of ``a`` where ``mask[b]``, else of ``b``."""
    return torch.where(mask.view(-1, *[1] * (a.dim() - 1)), a, b)

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

The search can be given a wall-clock budget. Stopping early only means fewer points were
measured: the value is still the largest norm actually measured at a recorded point, so it
stays a lower bound (a weaker one). ``LowerBound.stopped`` says whether the search finished
or its budget ran out, and how far it got.

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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lipcert.bounds.state import Domain, as_domain
from lipcert.errors import LipcertError

__all__ = ["LowerBound", "SearchProgress", "empirical_lipschitz", "jacobian_norm",
           "tightness_ratio"]

Model = Callable[[torch.Tensor], torch.Tensor]
Clock = Callable[[], float]
_INNER_ITERS = 3  # warm-started power iterations per ascent step
_SCAN_SHARE = 0.5  # with a budget, the scan of the samples stops after this share of it
_CHUNKS_PER_BUDGET = 20  # with a budget, one scanned chunk takes about 1/20 of it
_FIRST_CHUNK = 4  # samples in the first chunk, before the time per sample is known


@dataclass
class SearchProgress:
    """How far ``empirical_lipschitz`` has got, reported after each chunk and step."""

    phase: Literal["scan", "ascent"]
    samples_scanned: int
    samples: int
    ascent_step: int
    ascent_steps: int
    best: float
    elapsed_s: float
    budget_s: float | None


@dataclass
class LowerBound:
    """A measured lower bound of the Lipschitz constant (L2 → L2) of a model's logits.

    ``value`` = ‖J(point)v‖ for a unit vector v, where ``point`` was reached from sample
    ``at_index`` of the given inputs (``point`` is that sample itself when gradient ascent
    did not improve on it). ``initial`` is the best value over the scanned samples, before
    gradient ascent. ``stopped`` is ``"finished"``, or ``"budget"`` when the wall-clock
    budget ``budget_s`` ran out after ``samples_scanned`` samples and ``ascent_steps_done``
    steps; ``elapsed_s`` is how long the search ran.
    """

    value: float
    at_index: int
    method: str
    point: torch.Tensor = field(repr=False)
    initial: float
    kind: Literal["lower"] = "lower"
    samples_scanned: int = 0
    ascent_steps_done: int = 0
    elapsed_s: float = 0.0
    budget_s: float | None = None
    stopped: Literal["finished", "budget"] = "finished"

    def to_dict(self) -> dict[str, float | int | str]:
        """The JSON form: ``{"value", "kind", "at_index", "method"}``."""
        return {"value": self.value, "kind": self.kind, "at_index": self.at_index,
                "method": self.method}

    def search_dict(self) -> dict[str, Any]:
        """How the search went, for the JSON: ``budget_s`` (``None``: no budget),
        ``elapsed_s``, ``stopped``, ``samples_scanned``, ``ascent_steps``."""
        budget = self.budget_s if self.budget_s is not None and math.isfinite(
            self.budget_s) else None
        return {"budget_s": budget, "elapsed_s": self.elapsed_s, "stopped": self.stopped,
                "samples_scanned": self.samples_scanned, "ascent_steps": self.ascent_steps_done}


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
    sigma, _, _ = _scan(f, x, iters, seed, batch_size, _Budget(None, time.perf_counter))
    return sigma


def empirical_lipschitz(
    f: Model,
    x: torch.Tensor,
    *,
    iters: int = 30,
    ascent_steps: int = 50,
    top_k: int = 8,
    step_size: float | None = None,
    domain: Domain | tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
    batch_size: int = 256,
    budget_s: float | None = None,
    on_progress: Callable[[SearchProgress], None] | None = None,
    clock: Clock = time.perf_counter,
) -> LowerBound:
    """The largest Jacobian spectral norm of ``f`` found at and near the samples ``x``.

    1. ``jacobian_norm`` at every sample.
    2. From the ``top_k`` best samples, ``ascent_steps`` steps of normalised gradient ascent
       on σ(x)² = ‖J(x)‖₂²: with (u, v) the current top singular pair of J(x) (u = Jv/‖Jv‖,
       held fixed during the step), the step follows ∇ₓ‖J(x)ᵀu‖², which equals
       ∇ₓ‖J(x)v‖² = ∇ₓσ(x)² at the singular pair (both are 2σ·uᵀ(∂J)v). Each sample moves
       by its own step length η in L2 (default 0.02·√n, n the elements per sample), is
       projected onto ``domain`` when one is given (a box, or a ball per token), and is
       measured with a few warm-started power iterations: a step that raises the measured
       norm is kept and η grows by 1.5, otherwise it is undone and η halves.
    3. The final points are measured again with ``iters`` warm-started power iterations.

    The value is the largest norm measured, at a data sample or at a final point, so it
    never falls below step 1's best (``LowerBound.initial``).

    ``budget_s`` (seconds of ``clock``; ``None`` or ∞: no limit): step 1 runs in chunks
    sized to take about 1/20 of the budget each, and stops once half the budget is spent
    (after its first chunk, so at least one sample is measured); step 2 stops when the
    whole budget is spent, and step 3 is then skipped, the ascent's own measurements
    (``_INNER_ITERS`` power iterations at each kept point) standing. Each phase may overrun
    by the chunk or step under way. ``on_progress`` is called after each chunk and step.
    """
    if top_k < 1 or ascent_steps < 0 or iters < 1:
        raise LipcertError("empirical_lipschitz needs top_k >= 1, ascent_steps >= 0, iters >= 1")
    if budget_s is not None and not budget_s > 0:
        raise LipcertError(f"the lower-bound budget must be > 0 seconds, got {budget_s}")
    budget = _Budget(budget_s, clock)

    def report(phase: Literal["scan", "ascent"], scanned: int, step: int, best: float) -> None:
        if on_progress is not None:
            on_progress(SearchProgress(phase, scanned, len(x), step, ascent_steps, best,
                                       budget.elapsed(), budget_s))

    sigma, v, u = _scan(f, x, iters, seed, batch_size, budget,
                        lambda s: report("scan", len(s), 0, float(s.max())))
    scanned = len(sigma)
    top = torch.argsort(sigma, descending=True)[:top_k]
    best = int(top[0])
    value, point, at_index = float(sigma[best]), x[best], best
    steps_done, ascended = 0, True
    if ascent_steps:
        points, final, steps_done, ascended = _ascend(
            f, x[top], v[top], u[top], sigma[top], ascent_steps, iters, step_size, domain,
            budget, lambda k, s: report("ascent", scanned, k, max(value, float(s.max()))))
        j = int(torch.argmax(final))
        if final[j] > value:
            value, point, at_index = float(final[j]), points[j], int(top[j])
    finished = scanned == len(x) and ascended
    method = (f"power iteration on JᵀJ ({iters} iterations) at {scanned} samples, then "
              f"{steps_done} steps of gradient ascent on ‖J(x)‖₂ from the top "
              f"{len(top)}; largest measured ‖J(x)v‖, ‖v‖ = 1")
    if not finished:
        method += (f"; stopped by its {budget_s:g} s budget (planned: {len(x)} samples, "
                   f"{ascent_steps} steps and a final measurement)")
    return LowerBound(value, at_index, method, point.detach().clone(), float(sigma[best]),
                      samples_scanned=scanned, ascent_steps_done=steps_done,
                      elapsed_s=budget.elapsed(), budget_s=budget_s,
                      stopped="finished" if finished else "budget")


def tightness_ratio(upper: float | None, lower: float | None) -> float | None:
    """``upper / lower``, or ``None`` when either is missing, not finite, or lower ≤ 0.

    Since lower ≤ L ≤ upper, the ratio is ≥ 1 and bounds how loose the certificate can be.
    """
    if upper is None or lower is None or not (math.isfinite(upper) and math.isfinite(lower)):
        return None
    return upper / lower if lower > 0 else None


# --------------------------------------------------------------------------- internals


class _Budget:
    """A wall-clock budget on ``clock``, started when created (``None`` or ∞: unlimited)."""

    def __init__(self, seconds: float | None, clock: Clock) -> None:
        self.seconds = seconds if seconds is not None and math.isfinite(seconds) else None
        self.clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def spent(self, share: float = 1.0) -> bool:
        return self.seconds is not None and self.elapsed() >= share * self.seconds

    def chunk(self, seconds_per_sample: float, most: int) -> int:
        """Samples per chunk: about 1/``_CHUNKS_PER_BUDGET`` of the budget, 1 to ``most``."""
        if self.seconds is None or seconds_per_sample <= 0:
            return most
        fit = int(self.seconds / _CHUNKS_PER_BUDGET / seconds_per_sample)
        return max(1, min(most, fit))


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


def _scan(f: Model, x: torch.Tensor, iters: int, seed: int, batch_size: int, budget: _Budget,
          on_chunk: Callable[[torch.Tensor], None] | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_power`` over the samples in order, in chunks, from a seeded random start (the
    same start vectors however the samples are chunked). Without a budget every sample is
    measured in chunks of ``batch_size``; with one, the scan stops once ``_SCAN_SHARE`` of
    it is spent, and the results cover the first samples only."""
    if not x.is_floating_point() or x.dim() < 1 or len(x) == 0:
        raise LipcertError(
            f"the Jacobian needs a non-empty floating-point batch, got {x.dtype} of shape "
            f"{tuple(x.shape)} (for a GPT, pass embeddings to EmbeddingSpaceGPT)"
        )
    gen = torch.Generator().manual_seed(seed)
    v0 = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
    parts = []
    start, size = 0, batch_size if budget.seconds is None else min(batch_size, _FIRST_CHUNK)
    while start < len(x):
        began = budget.clock()
        parts.append(_power(f, x[start:start + size], v0[start:start + size], iters))
        start += len(parts[-1][0])
        if on_chunk is not None:
            on_chunk(torch.cat([p[0] for p in parts]))
        if budget.spent(_SCAN_SHARE):
            break
        size = budget.chunk((budget.clock() - began) / len(parts[-1][0]), batch_size)
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
    domain: Domain | tuple[float, float] | None,
    budget: _Budget,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Adaptive normalised gradient ascent on σ(x) from each row of x: (points, σ̂ there,
    steps taken, whether it finished). When the budget runs out, the σ̂ measured during the
    ascent are returned without the final ``iters`` power iterations (each is ‖J(point)v‖
    for a unit v)."""
    x = x.detach().clone()
    shape = (-1, *[1] * (x.dim() - 1))
    n = x[0].numel()
    eta = torch.full((len(x),), step_size or 0.02 * math.sqrt(n), dtype=torch.float64)
    for taken in range(steps):
        if budget.spent():
            return x, sigma, taken, False
        grad = _ascent_gradient(f, x, u)
        step = _unit(grad, torch.zeros_like(grad)) * eta.to(x.dtype).view(shape)
        trial = x + step
        if domain is not None:
            trial = as_domain(domain).project(trial)
        s, v_new, u_new = _power(f, trial, v, _INNER_ITERS)
        better = s > sigma
        x, v, u = _pick(better, trial, x), _pick(better, v_new, v), _pick(better, u_new, u)
        sigma = torch.where(better, s, sigma)
        eta = torch.where(better, eta * 1.5, eta * 0.5)
        if on_step is not None:
            on_step(taken + 1, sigma)
    if budget.spent():
        return x, sigma, steps, False
    final, _, _ = _power(f, x, v, iters)
    return x, final, steps, True


def _pick(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sample b of ``a`` where ``mask[b]``, else of ``b``."""
    return torch.where(mask.view(-1, *[1] * (a.dim() - 1)), a, b)

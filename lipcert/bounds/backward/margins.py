"""Local certificates from enclosures of the margins' gradients (RecurJac-style; derivations:
docs/local-margin.md).

For a sample x with label y and logits z, the margins are m_j = z_y − z_j (j ≠ y). On the
set B = B₂(x, r) ∩ D (D the input domain; B is convex, so it contains the segment from x
to any of its points), the reverse walk encloses ∇m_j(ξ) for every ξ ∈ B elementwise by
G_c ± G_r, and by the mean value theorem (Lebourg's for the piecewise-smooth ops), with
δ = x′ − x,

    m_j(x′) − m_j(x) ≥ −Σ_k max_{g ∈ G_c ± G_r} (−g_k·δ_k) ≥ −‖v‖₂·‖δ‖₂ ≥ −L_j(x, r)·r,

where v_k = |G_c,k| + G_r,k, except on a box domain: a coordinate at the lower end of the
domain can only increase (δ_k ≥ 0), so v_k = max(0, G_r,k − G_c,k), and one at the upper
end only decrease, v_k = max(0, G_c,k + G_r,k). L_j(x, r) := ‖v‖₂ (‖ |G_c| + G_r ‖₂ on an
unbounded domain). So x is certified at radius r if m_j(x) > r·L_j(x, r) for every j ≠ y:
no √2 and no Lipschitz bound of the whole logit vector, each margin is bounded directly.

A second sufficient test comes from the forward pass alone: the Taylor model of the logits,
z(x′) = z(x) + A·δ + e with e in its enclosure, gives m_j(x′) ≥ m_j(x) − r·L_j(x, 0) +
(e_y − e_j)_lo (L_j(x, 0) bounds the exact centre gradient, domain-aware as above), and the
plain intervals give m_j(x′) ≥ lo(z_y) − hi(z_j). A third takes the remainder from the
symbolic remainders (``symbolic.py``, on by default): m_j(x′) ≥ m_j(x) − r·L_j(x, 0) +
Σ_k min(g_k·R_k), the ops' own second-order terms R_k weighted by the margin's exact
sensitivities g_k; they also narrow the forward intervals. A radius passes if, for every
j, any of these lower bounds is positive.

The certified radius is the largest passing r found by geometric bisection on
[r_max·10⁻⁹, r_max], r_max = min_j m_j/L_j(x, 0), vectorised over samples (any r that
passes is sound: the balls are nested, and a radius that fails is never reported).
Misclassified samples get 0.

Float margins: the certificate is for the exact-arithmetic function. Centre margins are the
float64 forward pass and are lowered by 1e-9·(|z_y| + |z_j|) + 1e-300; L_j is raised by the
factor 1 + 1e-9 (the forward intervals and the backward rules carry their own rounding slack;
this covers the float64 evaluation of the centre values, as in ``lipcert.certificate``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram

from lipcert.bounds import BoxDomain, Propagator, as_program
from lipcert.bounds.backward.forward import Intervals, check_rules
from lipcert.bounds.backward.interval import Box, Grad, worst_slopes
from lipcert.bounds.backward.search import grid_search
from lipcert.bounds.backward.walk import walk
from lipcert.bounds.state import F64, as_domain, gamma
from lipcert.errors import LipcertError

FP_MARGIN = 1e-9
U = 2.0**-53
SPAN = 1e-9  # the bisection searches [r_max·SPAN, r_max]

IntervalFn = Callable[[Tensor, Tensor], dict[str, Any]]


@dataclass
class MarginBounds:
    """One evaluation at given radii, each (n, C), with the label's column at +inf margin
    and 0 bound: centre margins (lowered for rounding), the gradient bounds L_j(x, r) and
    the forward pass's lower bounds of the margins over the set."""

    margin: Tensor
    lipschitz: Tensor
    forward_margin: Tensor
    logits: Tensor

    def certified(self, radius: Tensor) -> Tensor:
        """(n,) whether every margin stays positive on the balls of the given radii."""
        by_gradient = self.margin > radius[:, None] * self.lipschitz
        return (by_gradient | (self.forward_margin > 0)).all(dim=1) & (radius >= 0)

    def consumed(self, radius: Tensor) -> Tensor:
        """(n,) ρ = max_j (1 − s_j/m_j), s_j the best lower bound of margin j over the ball
        (gradient or forward test): the fraction of a margin the ball may use up; the test
        passes iff ρ < 1 (for positive centre margins). Steers the radius search only."""
        slack = torch.maximum(self.margin - radius[:, None] * self.lipschitz,
                              self.forward_margin)
        rho = torch.where(torch.isinf(self.margin), -math.inf, 1 - slack / self.margin)
        return torch.nan_to_num(rho, nan=math.inf).amax(1)


@dataclass
class MarginRadii:
    """Per-sample results (each (n,), float64 unless noted)."""

    radius: Tensor  # certified L2 radius (0: not certified or misclassified)
    lipschitz: Tensor  # max_{j≠y} L_j(x, radius) at the certified radius (at r = 0 if none)
    margin: Tensor  # z_y − max_{j≠y} z_j at the centre (float64 forward pass)
    pred: Tensor  # int64 argmax of the float64 logits
    gradient_bound: Tensor  # max_j L_j(x, 0): the margins' gradient norms at x (rounded up)
    evaluations: int  # forward + backward passes per sample (the most of any batch)


class MarginCertifier:
    """Margin-gradient certificates for one exported classifier (module docstring).

    ``model``: a Propagator, ExportedProgram or nn.Module (exported with ``example``) whose
    output is (n, C) logits; ``domain``: the input domain as for :class:`Propagator`;
    ``intervals``: the forward-interval provider (default: :class:`Intervals`);
    ``symbolic``: use the symbolic remainders (with the default provider; about seven
    centre Jacobians more per batch on a two-block ViT, and much larger radii)."""

    def __init__(self, model: Propagator | ExportedProgram | nn.Module, domain: Any = (0.0, 1.0),
                 example: Tensor | None = None, intervals: IntervalFn | None = None,
                 symbolic: bool = True) -> None:
        if isinstance(model, Propagator):
            prop = model
        else:
            if isinstance(model, nn.Module) and example is None:
                raise LipcertError("exporting an nn.Module needs an example input")
            prop = Propagator(as_program(model, example))  # type: ignore[arg-type]
        check_rules(prop.graph, prop.input_name)
        self.prop = prop
        self.domain = as_domain(domain)
        self.intervals = intervals or Intervals(prop, self.domain)
        self.symbolic = symbolic
        self.graph = prop.graph
        out = next(n for n in self.graph.nodes if n.op == "output")
        outs = out.args[0]
        if isinstance(outs, list | tuple):
            if len(outs) != 1:
                raise LipcertError(f"the model has {len(outs)} outputs; certification needs "
                                   "one: (batch, classes) logits")
            outs = outs[0]
        self.logits_name = outs.name
        self.input_name = prop.input_name

    def bounds(self, inputs: Tensor, labels: Tensor, radius: Tensor,
               first_order: Tensor | None = None) -> MarginBounds:
        """Centre margins, L_j(x, r) and the forward lower bounds for every sample and class
        (one evaluation); ``first_order``: L_j(x, 0) (n, C) for the Taylor-model test."""
        n = inputs.shape[0]
        radius = radius.to(F64)
        env = self.intervals(inputs, radius)
        z = env[self.logits_name]
        if not isinstance(z, Box) or z.dim() != 2 or z.shape[0] != n:
            raise LipcertError("certification needs (batch, classes) logits that depend on the "
                               "input")
        logits = z.value
        classes = logits.shape[1]
        y = labels.reshape(-1).long()
        if bool(((y < 0) | (y >= classes)).any()):
            raise LipcertError(f"labels must lie in [0, {classes})")
        eye = torch.eye(classes, dtype=F64)
        seed_c = eye[y].unsqueeze(0) - eye.unsqueeze(1)  # [j, s, :] = e_y − e_j
        g = walk(self.graph, env, {self.logits_name: Grad(seed_c, torch.zeros_like(seed_c))},
                 self.input_name)
        lip = self._norms(g, inputs, classes)
        own = torch.nn.functional.one_hot(y, classes).bool()
        zy = logits.gather(1, y[:, None])
        margin = torch.where(own, math.inf, zy - logits - FP_MARGIN * (zy.abs() + logits.abs())
                             - 1e-300)
        lip = torch.where(own, 0.0, lip)
        lo_y = z.lo.gather(1, y[:, None])
        fwd = lo_y - z.hi - 4 * U * (lo_y.abs() + z.hi.abs())
        if first_order is not None and z.has_e:
            e_m = z.e_lo.gather(1, y[:, None]) - z.e_hi
            drop = radius[:, None] * first_order
            taylor = margin - drop + e_m - 8 * U * (margin.abs() + drop + e_m.abs())
            fwd = torch.maximum(fwd, taylor)
            sym = (self.intervals.symbolic_for(inputs, labels)
                   if isinstance(self.intervals, Intervals) else None)
            terms = None if sym is None else sym.margin_terms(env, n, classes)
            if terms is not None:
                symbolic = margin - drop + terms - 8 * U * (margin.abs() + drop + terms.abs())
                fwd = torch.maximum(fwd, symbolic)
        fwd = torch.where(own, math.inf, fwd)
        return MarginBounds(margin, lip, fwd, logits)

    def _norms(self, g: Grad | None, inputs: Tensor, classes: int) -> Tensor:
        """L_j per sample and class, (n, C): the domain-aware norm of the input gradient's
        enclosure (module docstring), rounded up."""
        n = inputs.shape[0]
        if g is None:
            return torch.zeros(n, classes, dtype=F64)
        v = worst_slopes(g, inputs.detach().to(F64).unsqueeze(0), self.domain)
        mag = v.flatten(2)
        lip = torch.linalg.vector_norm(mag, dim=2) * (1 + gamma(mag.shape[2] + 2))
        lip = torch.nan_to_num(lip * (1 + FP_MARGIN), nan=math.inf)
        return lip.T.contiguous()

    def radii(self, inputs: Tensor, labels: Tensor, steps: int = 12,
              batch_size: int = 32) -> MarginRadii:
        """Certified radii by geometric bisection (module docstring), ``batch_size`` samples
        per evaluation (a program exported with a fixed batch gets batches of that size,
        padded)."""
        labels = labels.reshape(-1)
        if inputs.shape[0] != labels.shape[0]:
            raise LipcertError("inputs and labels have different lengths")
        if inputs.shape[0] == 0:
            raise LipcertError("no samples to certify")
        if steps < 1:
            raise LipcertError("the bisection needs at least one step")
        if isinstance(self.domain, BoxDomain) and bool(
                ((inputs < self.domain.lo) | (inputs > self.domain.hi)).any()):
            raise LipcertError("an input lies outside the input domain")
        fixed = self.prop.static_batch
        size = fixed or batch_size
        classes = self._classes(_padded(inputs[:1], fixed or 1))
        if bool(((labels < 0) | (labels >= classes)).any()):
            raise LipcertError(f"labels must lie in [0, {classes})")
        parts = []
        evaluations = 0
        for a in range(0, inputs.shape[0], size):
            x, y = inputs[a:a + size], labels[a:a + size]
            k = x.shape[0]
            res = self._radii(_padded(x, fixed or k), _padded(y, fixed or k), steps)
            parts.append([getattr(res, f)[:k] for f in _FIELDS])
            evaluations = max(evaluations, res.evaluations)
        return MarginRadii(*(torch.cat(column) for column in zip(*parts, strict=True)),
                           evaluations=evaluations)

    def _classes(self, x: Tensor) -> int:
        """The number of classes, from one plain forward pass (before the costly ones)."""
        with torch.no_grad():
            out = self.prop.program.module()(x)
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise LipcertError("certification needs (batch, classes) logits")
        return int(out.shape[1])

    def _radii(self, x: Tensor, y: Tensor, steps: int) -> MarginRadii:
        n = x.shape[0]
        b0 = self.bounds(x, y, torch.zeros(n, dtype=F64))
        first = b0.lipschitz
        if self.symbolic and isinstance(self.intervals, Intervals) and \
                self.intervals.prepare_symbolic(x, y, self.logits_name):
            # the margins' gradients at x from the reverse pass: the enclosure's at r = 0
            # holds them too, but rounding slack widened through the walk inflates it
            exact = self.intervals.symbolic_for(x, y).input_gradient()
            if exact is not None:
                first = torch.minimum(first, self._norms(exact, x, first.shape[1]))
        pred = b0.logits.argmax(1)
        correct = (pred == y.long()) & (b0.margin > 0).all(1)
        ratio = torch.where(first > 0, b0.margin / first, math.inf).amin(1)
        r_max = torch.where(correct, ratio, 0.0)
        active = correct & torch.isfinite(r_max) & (r_max > 0)

        def evaluate(radius: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            b = self.bounds(x, y, radius, first_order=first)
            rho = b.consumed(radius)
            v = torch.where(rho > 0, torch.log(rho.clamp(min=1e-300)), -math.inf)
            return b.certified(radius), v, b.lipschitz.amax(1)

        best, best_l, evaluations = grid_search(evaluate, r_max, active, steps, SPAN,
                                                b0.lipschitz.amax(1))
        best = torch.where(correct & torch.isinf(r_max), math.inf, best)
        other = torch.where(torch.isinf(b0.margin), -math.inf, b0.logits)
        zy = b0.logits.gather(1, y.long()[:, None]).squeeze(1)
        return MarginRadii(best, best_l, zy - other.amax(1), pred, first.amax(1),
                           evaluations + 1)


_FIELDS = ("radius", "lipschitz", "margin", "pred", "gradient_bound")


def _padded(t: Tensor, size: int) -> Tensor:
    """``t`` with its last row repeated up to ``size`` rows (a program with a fixed batch)."""
    if t.shape[0] >= size:
        return t
    return torch.cat([t, t[-1:].expand(size - t.shape[0], *t.shape[1:])])


def margin_radii(model: Propagator | ExportedProgram | nn.Module, inputs: Tensor,
                 labels: Tensor, *, domain: Any = (0.0, 1.0), steps: int = 12,
                 batch_size: int = 32, intervals: IntervalFn | None = None,
                 symbolic: bool = True) -> MarginRadii:
    """Certified L2 radii of ``inputs`` (n, ...) with ``labels`` (n,) by margin-gradient
    bounds (module docstring); see :class:`MarginCertifier`."""
    cert = MarginCertifier(model, domain, example=inputs[:2], intervals=intervals,
                           symbolic=symbolic)
    return cert.radii(inputs, labels, steps=steps, batch_size=batch_size)

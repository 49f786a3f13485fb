"""Symbolic remainders: the Taylor models' second-order terms carried through the graph
without wrapping (derivations: docs/local-margin.md, "Symbolic remainders").

Every forward rule computes a node's remainder as e_y = J₀·e_x + R_y, J₀ the op's Jacobian
at the centre and R_y ("own", ``Box.own_lo/own_hi``) the op's own second-order term, which
is 0 for an affine op. Unrolled over the graph (linearised at the centre, so every
coefficient is an exact centre Jacobian),

    e_y = Σ_k M_{y←k}·R_k,   M_{y←k} = ∂y/∂(output of k) at the centre,

the sum over the non-affine ops k before y (and y itself). Interval arithmetic evaluates
the same sum through |J₀| op by op, and on a trained transformer that wrapping grows an
enclosure by a factor 3 to 20 per matrix; here each R_k is taken in absolute value once.

* Intervals. For the inputs of the non-affine ops ("targets"), Cauchy–Schwarz per row
  (the last dimension) of R_k gives |(M_{y←k}R_k)_e| ≤ Σ_t ‖∂y_e/∂(row t of k)‖₂·‖R_k,t‖₂,
  with ‖R_k,t‖₂ the norm of the elementwise enclosure or, where a rule bounds the row's
  norm itself (``Box.own_rows``: LayerNorm and token ball from their second derivatives,
  attention by Cauchy–Schwarz over the keys), that bound.
  The gains ‖∂y_e/∂(row t)‖₂ depend on the centre only (``ForwardJacobians.row_gains``, once per
  batch); the walk intersects each target's remainder with ±Σ (plus its own term), which
  narrows the intervals every later R_k is computed from. An attention's scores and
  probabilities (``<node>.scores``, ``<node>.probs``) are targets as well: the sum holds
  for the op's internal quantities too, over the sources before the op, with the op's own
  terms for them (c·ΔQΔKᵀ, and P's remainder as a function of Q and K); the forward rule
  asks for them through ``FwdCtx.tighten``.
* Margins. With g_k = ∂m_j/∂(output of k) at the centre (reverse mode, once per batch),
  m_j(x′) = m_j(x) + ∇m_j(x)·δ + Σ_k g_k·R_k, so
  m_j(x′) ≥ m_j(x) − r·‖∇m_j(x)‖ + Σ_k Σ_e min(g_k,e·R_lo,e, g_k,e·R_hi,e), with ∇m_j(x)
  from the same reverse pass (:meth:`input_gradient`; its norm is domain-aware).

* Normalisations. LayerNorm's variance over the set depends on a = ⟨u₀, Δx⟩/d per group
  (``rules/norm.py``), which interval arithmetic bounds by Σ|u₀_i|·|Δx_i|: every element
  at its worst at once. The same unrolling gives, for w = u₀ (the centre's centred group;
  RMSNorm: its values) and the Taylor model Δx = A·δ + Σ_k M_{x←k}R_k,

      ⟨w, Δx⟩ = ⟨Aᵀw, δ⟩ + Σ_k ⟨M_{x←k}ᵀw, R_k⟩,

  so ⟨w, Δx⟩ ∈ [−r‖v⁻‖ + Σ_k Σ_e min(w_k,e·R_lo,e, w_k,e·R_hi,e), r‖v⁺‖ + Σ_k Σ_e max(…)],
  w_k = M_{x←k}ᵀw and v = Aᵀw (reverse mode, one pass per group, once per batch), and ‖v⁺‖
  the domain-aware norm as for the margins (a coordinate at the lower end of a box domain
  only grows: v⁺_i = max(v_i, 0) there, max(−v_i, 0) at the upper end, |v_i| elsewhere;
  v⁻ the same for −v). The walk attaches the range to the normalisation's input
  (``Box.dot``). Off for the normalisations beyond MAX_DOT_WEIGHTS weights per sample.

Which ops are affine is decided per node (:func:`is_affine`): a node with a remainder and
no own term must be one of them, else the method is off for that model (never guessed).
It needs the batch in dim 0 of every non-affine op and target (checked with the bound
engine's sample ids), and is off where the non-affine ops have more than MAX_COLUMNS
coordinates per sample together (the gains cost one tangent per coordinate).

Float model: the gains and g_k are float64 evaluations, raised by 1e-9 of themselves and
1e-12 of the largest entry, as the centre Jacobian norms are (``jacobian.py``); the sums
below add γ of their length.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from lipcert.bounds.backward.evaluation import SDPA, node_values
from lipcert.bounds.backward.interval import TINY, Box, Grad, GroupDot, worst_slopes
from lipcert.bounds.backward.jacobian import PARTS, ForwardJacobians, part_owner
from lipcert.bounds.state import F64, Domain, gamma

aten = torch.ops.aten
G_REL = 1e-9  # relative padding of the float64 centre gradients
MAX_COLUMNS = 2**16  # the most per-sample coordinates of all non-affine ops together
MAX_DOT_WEIGHTS = 2**20  # per sample: Σ over normalisations of groups × source coordinates
NORMS = {aten.layer_norm: True, aten.rms_norm: False}  # normalisation → centred

_AFFINE = {
    aten.reshape, aten.view, aten._unsafe_view, aten.view_copy, aten.permute, aten.transpose,
    aten.t, aten.flatten, aten.unflatten, aten.unsqueeze, aten.squeeze, aten.select,
    aten.slice, aten.narrow, aten.cat, aten.concat, aten.stack, aten.split,
    aten.split_with_sizes, aten.chunk, aten.unbind, aten.movedim, aten.flip, aten.roll,
    aten.tensor_split, aten.hstack, aten.vstack, aten.constant_pad_nd, aten.clone,
    aten.contiguous, aten.alias, aten.detach, aten._to_copy, aten.to, aten.type_as,
    aten.alias_copy, aten.detach_copy, aten.lift_fresh_copy, aten.lift_fresh, aten.expand,
    aten.expand_as, aten.repeat, aten.index_select, aten.index, aten.repeat_interleave,
    aten.unfold, aten.diagonal, aten.pad, aten.mean, aten.sum, aten.add, aten.sub, aten.rsub,
    aten.neg, aten.linear, aten.conv1d, aten.conv2d, aten.convolution, aten.dropout,
    aten.feature_dropout, aten.alpha_dropout, aten.avg_pool1d, aten.avg_pool2d,
    aten.avg_pool3d, aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d,
    aten.adaptive_avg_pool3d, aten._adaptive_avg_pool2d, aten._adaptive_avg_pool3d,
    aten._native_batch_norm_legit_no_training, aten.batch_norm,
}
# products: affine when at most one operand depends on the input (div: the divisor must not)
_PRODUCTS = {aten.mul, aten.matmul, aten.mm, aten.bmm, aten.addmm, aten.baddbmm}


def _packet(target: Any) -> Any:
    return getattr(target, "overloadpacket", target)


def is_affine(node: torch.fx.Node, env: dict[str, Any]) -> bool:
    """Whether the node's output is an affine function of its input-dependent arguments
    (``env``: the forward intervals, where those arguments are Boxes)."""
    if node.target is operator.getitem:
        return True
    packet = _packet(node.target)
    boxes = [a for a in node.all_input_nodes if _has_box(env.get(a.name))]
    if packet in _AFFINE:
        return True
    if packet in _PRODUCTS:
        return len(boxes) <= 1
    if packet is aten.div:
        divisor = node.args[1] if len(node.args) > 1 else None
        return not (isinstance(divisor, torch.fx.Node) and _has_box(env.get(divisor.name)))
    return False


def _has_box(x: Any) -> bool:
    return any(isinstance(leaf, Box) for leaf in tree_flatten(x)[0])


def _ancestors(graph: torch.fx.Graph) -> dict[str, set[str]]:
    """Every node's set of (strict) ancestors."""
    up: dict[str, set[str]] = {}
    for node in graph.nodes:
        up[node.name] = set().union(*({a.name} | up[a.name] for a in node.all_input_nodes))
    return up


@dataclass
class _DotWeights:
    """⟨w_g, Δx_g⟩ for every group g of a normalisation's input x (module docstring):
    w (n, G, d); ``gains[k]`` (G, n, …) = M_{x←k}ᵀw; ``up``, ``down`` (G, n): ‖v⁺‖, ‖v⁻‖
    of v = Aᵀw, rounded up."""

    w: Tensor
    gains: dict[str, Tensor]
    up: Tensor
    down: Tensor


def _weighted(g: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Bounds of Σ_e g_e·R_e over R ∈ [lo, hi] (one per leading index of g and sample; g
    (m, n, …), lo and hi (n, …)), with the float padding of g (1e-9 of each entry, 1e-12 of
    the largest) and γ of the sum's length."""
    lo, hi = lo.unsqueeze(0), hi.unsqueeze(0)
    top = float(g.abs().max()) if g.numel() else 0.0
    slack = (G_REL * g.abs() + 1e-12 * top) * torch.maximum(lo.abs(), hi.abs())
    a, b = g * lo, g * hi
    low = (torch.minimum(a, b) - slack).flatten(2)
    high = (torch.maximum(a, b) + slack).flatten(2)
    pad = gamma(low.shape[2] + 2) * torch.maximum(low.abs(), high.abs()).sum(2)
    return low.sum(2) - pad, high.sum(2) + pad


def _rows_norm(src: Box) -> Tensor:
    """(rows, n): a bound of ‖R_row‖₂ per sample of a source's own remainder (dim 0 batch,
    rows along the last dimension): the norm of its elementwise enclosure, rounded up, or
    the rule's own row bound (``Box.own_rows``) where that is smaller."""
    assert src.own_lo is not None and src.own_hi is not None
    m = torch.maximum(src.own_lo.abs(), src.own_hi.abs())
    norms = torch.linalg.vector_norm(m, dim=-1) * (1 + gamma(m.shape[-1] + 2))
    if src.own_rows is not None:
        norms = torch.minimum(norms, src.own_rows)
    return norms.reshape(m.shape[0], -1).T


class SymbolicRemainders:
    """Gains and margin gradients for one batch of centres; :meth:`tighten` during the
    forward walk and :meth:`margin_terms` after it (module docstring)."""

    def __init__(self, graph: torch.fx.Graph, consts: dict[str, Any], input_name: str,
                 logits_name: str, domain: Domain | None = None) -> None:
        self.graph, self.consts = graph, consts
        self.input_name, self.logits_name = input_name, logits_name
        self.domain = domain
        self.ready = False
        self.dots: dict[str, _DotWeights] = {}
        self.sources: list[str] = []
        self.before: dict[str, list[str]] = {}
        self.gains: dict[tuple[str, str], Tensor] = {}
        self.grads: dict[str, Tensor] = {}
        self.input_grad: Tensor | None = None

    def prepare(self, center: Tensor, labels: Tensor | None, env0: dict[str, Any],
                batch_major: Callable[[str], bool],
                jacobians: ForwardJacobians | None = None) -> bool:
        """Classify the nodes from the forward intervals ``env0`` (any radius), compute the
        gains and (with ``labels``) the centre gradients of every margin; False (and
        :meth:`tighten` and :meth:`margin_terms` do nothing) where the model is outside the
        method. ``jacobians``: the forward-mode engine already set up for ``center``."""
        self.ready = False
        self.grads = {}
        self.dots = {}
        self.input_grad = None
        order = [nd for nd in self.graph.nodes if nd.op == "call_function"
                 and _has_box(env0.get(nd.name))]
        sources = []
        for node in order:
            out = env0[node.name]
            if isinstance(out, Box) and out.has_own:
                if not batch_major(node.name):
                    return False
                sources.append(node.name)
            elif isinstance(out, list | tuple) and all(
                    o.has_own for o in out if isinstance(o, Box)):
                continue  # sort, max pooling: each output's own term enters at its getitem
            elif not is_affine(node, env0):
                return False
        if sum(env0[k].value[0].numel() for k in sources) > MAX_COLUMNS:
            return False  # the gains would cost more than the method is worth
        source_set = set(sources)
        targets = {a.name for nd in order if nd.name in source_set for a in nd.all_input_nodes
                   if isinstance(env0.get(a.name), Box) and a.name != self.input_name
                   and batch_major(a.name)}
        targets |= {f"{nd.name}{part}" for nd in order for part in PARTS
                    if nd.target is SDPA and batch_major(f"{nd.name}{part}")}
        position = {nd.name: i for i, nd in enumerate(self.graph.nodes)}
        position.update({t: position[part_owner(t)] for t in targets})
        x = center.detach().to(F64)
        if jacobians is None:
            jacobians = ForwardJacobians(self.graph, self.consts, self.input_name, x,
                                         batch_major)
        gains: dict[tuple[str, str], Tensor] = {}
        for k in sources:
            later = {t for t in targets if position[t] > position[k]}
            if later:
                for t, g in jacobians.row_gains(k, later).items():
                    gains[(t, k)] = g
        # the sources upstream of each target; a target one of them misses (no gains) is
        # left as it is
        upstream = _ancestors(self.graph)
        self.before = {t: [k for k in sources if k in upstream[part_owner(t)]]
                       for t in targets}
        self.before = {t: ks for t, ks in self.before.items()
                       if all((t, k) in gains for k in ks)}
        self.sources, self.gains = sources, gains
        xg = x.clone().requires_grad_(True)
        vals = node_values(self.graph, self.consts, self.input_name, xg)
        self.dots = self._dot_weights(order, vals, xg, env0, batch_major)
        if labels is not None:
            self.grads = self._margin_gradients(vals, xg, labels.reshape(-1).long(), sources)
        self.ready = True
        return True

    def _dot_weights(self, order: list[torch.fx.Node], vals: dict[str, Any], xg: Tensor,
                     env0: dict[str, Any], batch_major: Callable[[str], bool]
                     ) -> dict[str, _DotWeights]:
        """The weights of ⟨w_g, Δx_g⟩ for the input x of every LayerNorm and RMSNorm
        (module docstring), while their number stays within MAX_DOT_WEIGHTS per sample."""
        out: dict[str, _DotWeights] = {}
        budget = MAX_DOT_WEIGHTS
        for node in order:
            centred = NORMS.get(_packet(node.target))
            x = node.args[0]
            if centred is None or not isinstance(x, torch.fx.Node) \
                    or x.name not in self.before or x.name in out or not batch_major(x.name):
                continue
            value = vals[x.name]
            d = math.prod(node.args[1])
            groups = value[0].numel() // d
            ks = self.before[x.name]
            cost = groups * sum(env0[k].value[0].numel() for k in ks)
            if cost > budget:
                continue
            budget -= cost
            xs = value.reshape(value.shape[0], groups, d)
            w = (xs - xs.mean(-1, keepdim=True) if centred else xs).detach()
            per_group = [torch.autograd.grad((xs[:, g] * w[:, g]).sum(),
                                             [vals[k] for k in ks] + [xg], retain_graph=True,
                                             allow_unused=True) for g in range(groups)]
            gains = {k: torch.stack([torch.zeros_like(vals[k]) if row[i] is None
                                     else row[i].detach() for row in per_group])
                     for i, k in enumerate(ks)}
            v = torch.stack([torch.zeros_like(xg) if row[-1] is None else row[-1].detach()
                             for row in per_group])
            out[x.name] = _DotWeights(w, gains, self._domain_norm(v, xg),
                                      self._domain_norm(-v, xg))
        return out

    def _domain_norm(self, v: Tensor, x: Tensor) -> Tensor:
        """(m, n): a bound of max ⟨v, δ⟩ over ‖δ‖ ≤ 1 within the domain at x (module
        docstring), for v (m, n, …), rounded up."""
        # max ⟨v, δ⟩ = max −⟨−v, δ⟩
        mag = worst_slopes(Grad(-v, torch.zeros_like(v)), x.detach().unsqueeze(0),
                           self.domain).flatten(2)
        norm = torch.linalg.vector_norm(mag, dim=2) * (1 + gamma(mag.shape[2] + 2))
        top = float(norm.max()) if norm.numel() else 0.0
        return norm * (1 + G_REL) + 1e-12 * top + TINY

    def _margin_gradients(self, vals: dict[str, Any], xg: Tensor, labels: Tensor,
                          names: list[str]) -> dict[str, Tensor]:
        """{source: (C, n, ...)} ∂m_j/∂(source output) at the centre, m_j = z_y − z_j,
        raised in magnitude by the float padding (kept as signed values; the padding is
        applied in :meth:`margin_terms`)."""
        if not names:
            return {}
        z = vals[self.logits_name]
        zy = z.gather(1, labels[:, None]).squeeze(1)
        outs = [vals[k] for k in names] + [xg]
        per_class = []
        for j in range(z.shape[1]):
            grads = torch.autograd.grad((zy - z[:, j]).sum(), outs, retain_graph=True,
                                        allow_unused=True)
            per_class.append([torch.zeros_like(o) if g is None else g.detach()
                              for g, o in zip(grads, outs, strict=True)])
        stacked = [torch.stack([row[i] for row in per_class]) for i in range(len(outs))]
        self.input_grad = stacked[-1]
        return dict(zip(names, stacked[:-1], strict=True))

    def input_gradient(self) -> Grad | None:
        """The margins' gradients at the centres, (C, n, ...), as an enclosure whose radius
        is the float padding (1e-9 of each entry and 1e-12 of the largest)."""
        g = self.input_grad
        if not self.ready or g is None:
            return None
        top = float(g.abs().max()) if g.numel() else 0.0
        return Grad(g, G_REL * g.abs() + 1e-12 * top + TINY)

    def tighten(self, name: str, box: Any, env: dict[str, Any]) -> Any:
        """The node's Box with its remainder intersected with own + Σ_k gains·‖R_k,row‖
        (module docstring); anything else unchanged."""
        if not self.ready or name not in self.before or not isinstance(box, Box) \
                or not box.has_e:
            return box
        total = torch.zeros_like(box.value)
        terms = 0
        for k in self.before[name]:
            src = env[k]
            if not isinstance(src, Box) or not src.has_own:
                return box
            rn = _rows_norm(src)  # (rows, n)
            gain = self.gains[(name, k)]  # (rows, n, ...)
            total = total + (gain * rn.reshape(*rn.shape, *([1] * (gain.dim() - 2)))).sum(0)
            terms += rn.shape[0]
        total = total * (1 + gamma(terms + 2)) + TINY
        own_lo, own_hi = (box.own_lo, box.own_hi) if box.has_own else (0.0, 0.0)
        e_lo = torch.maximum(box.e_lo, own_lo - total)
        e_hi = torch.minimum(box.e_hi, own_hi + total)
        dot = self._dot_range(name, env)
        return Box(box.value, box.lo, box.hi, box.l2, box.rdev, e_lo, e_hi, box.aux,
                   box.own_lo, box.own_hi, dot if dot is not None else box.dot, box.own_rows)

    def _dot_range(self, name: str, env: dict[str, Any]) -> GroupDot | None:
        """The range of ⟨w_g, Δx_g⟩ for a normalisation's input x (module docstring)."""
        weights = self.dots.get(name)
        radius = getattr(env.get(self.input_name), "l2", None)
        if weights is None or radius is None:
            return None
        lo, hi = -radius * weights.down, radius * weights.up  # (G, n)
        size = hi - lo
        for k, g in weights.gains.items():
            src = env[k]
            if not isinstance(src, Box) or not src.has_own:
                return None
            t_lo, t_hi = _weighted(g, src.own_lo, src.own_hi)
            lo, hi, size = lo + t_lo, hi + t_hi, size + t_lo.abs() + t_hi.abs()
        pad = gamma(len(weights.gains) + 3) * size
        lo, hi = lo - pad, hi + pad
        d = weights.w.shape[-1]
        return GroupDot(weights.w.reshape(-1, d), lo.T.reshape(-1, 1), hi.T.reshape(-1, 1))

    def margin_terms(self, env: dict[str, Any], n: int, classes: int) -> Tensor | None:
        """(n, C) lower bounds of Σ_k g_k·R_k for every margin, or None if unavailable."""
        if not self.ready or any(k not in self.grads for k in self.sources):
            return None
        total = torch.zeros(classes, n, dtype=F64)
        size = torch.zeros(classes, n, dtype=F64)
        for k in self.sources:
            src = env[k]
            if not isinstance(src, Box) or not src.has_own:
                return None
            term = _weighted(self.grads[k], src.own_lo, src.own_hi)[0]
            total, size = total + term, size + term.abs()
        total = total - gamma(len(self.sources) + 2) * size - TINY
        return torch.nan_to_num(total.T.contiguous(), nan=-math.inf)

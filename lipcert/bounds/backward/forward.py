"""Forward intervals of every node over the input set B₂(x, r) ∩ D, for the backward rules.

:class:`Intervals` walks the exported graph with the forward rules of
``lipcert.bounds.backward.rules``: each input-dependent node gets a
:class:`~lipcert.bounds.backward.interval.Box`, its value at the centre input (float64) and
an elementwise enclosure over the input set, mostly in centre (mean-value) form, which is
tight for small radii; nodes that do not depend on the input are evaluated exactly in float64.
The input's Box is [x − r, x + r] ∩ D with the per-sample ℓ2 deviation r, which the first
linear layers turn into exact per-output bounds ‖W_e‖·r. With ``engine=True`` the enclosures
are also intersected with those of lipcert's bound engine in local mode (two sound
enclosures intersect to a sound one).

After each rule the walk makes sure the enclosure holds the centre value (it is a point of
the set) and widens it by 1e-13 of its magnitude for the rounding of elementwise formulas;
rules add the slack of their sums themselves.

Row deviations from the Taylor model: x_row − x₀_row = A_row·δ + e_row, so
‖x_row − x₀_row‖ ≤ r·‖A_row‖₂ + ‖e_row‖ with the operator norm of the row's Jacobian, where
the elementwise first-order parts r·‖A_e‖ add up to r·‖A_row‖_F (each element at its worst
at once). ‖A_row‖₂² is the largest eigenvalue of the Gram matrix A_rowA_rowᵀ, which the
input pass records for the rows of at most 64 elements of the nodes it reaches
(``jacobian.py``: its compressed stack before the first token mixing, its one tangent per
input coordinate after it); eigvalsh in float64 is raised by
10⁻⁹ of itself and 10⁻¹⁰ of the trace, which covers its backward error and the Gram
matrix's rounding (both below 10⁻¹² of the trace).

Matrix deviations (``Box.mdev``, per sample and leading index of a node of at least three
dimensions: ‖ΔX‖_F over its last two, e.g. one attention head's keys): with U(t) the input
coordinates row t depends on, ‖A·δ‖_F² = Σ_t ‖A_t·δ_{U(t)}‖² ≤ Σ_c δ_c²·Σ_{t: c ∈ U(t)} ‖A_t‖₂²
≤ r²·max_c Σ_{t ∋ c} ‖A_t‖₂², so ‖ΔX‖_F ≤ r·√(max_c Σ_{t ∋ c} ‖A_t‖₂²) + ‖e‖_F. Before the
first token mixing each row depends on one patch or token, and the bound is the largest
row's, not the rows' √Σ: attention's own-term row bounds take it for ‖ΔK‖_F and ‖ΔV‖_F.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.fx.node import map_arg
from torch.utils._pytree import tree_flatten, tree_map

import lipcert.bounds.backward.rules  # noqa: F401  (registers the rules)
from lipcert.bounds import Bound, BoxDomain, EmbeddingDomain, Propagator
from lipcert.bounds.backward.evaluation import SDPA, is_runtime_check
from lipcert.bounds.backward.interval import TINY, Box, row_norm
from lipcert.bounds.backward.jacobian import ForwardJacobians
from lipcert.bounds.backward.registry import FwdCtx, lookup_backward, lookup_forward
from lipcert.bounds.backward.rules.shape import CONSTANT_OPS
from lipcert.bounds.backward.symbolic import SymbolicRemainders
from lipcert.bounds.state import F64, Domain, gamma
from lipcert.errors import LipcertError

REL = 1e-13


def _active(x: Any) -> bool:
    return any(isinstance(leaf, Box) for leaf in tree_flatten(x)[0])


def _constant(t: Tensor) -> Tensor:
    t = t.detach()
    return t.to(F64) if t.is_floating_point() else t


def _finish(out: Any, lin: Tensor | None, lin_rows: Tensor | None = None,
            lin_blocks: Tensor | None = None) -> Any:
    """Pad, combine the enclosures and hold the centre. With the first-order part
    ``lin`` = r·‖A_e‖ of the Taylor model x = x₀ + Aδ + e, x ∈ x₀ ± lin + [e_lo, e_hi],
    and conversely e ∈ [lo − x₀ − lin, hi − x₀ + lin]. The row deviation is at most the box's
    row norm, the sample's l2 and, with ``lin_rows`` = r·‖A_row‖₂, lin_rows + ‖e_row‖ (module
    docstring); every element moves at most its row's deviation. The own remainder's row
    bound grows by the row norm of the padding; ``lin_rows`` is kept on the Box (attention's
    own-term bound splits the ball's budget between rows with it). With ``lin_blocks``, the
    first-order part's
    bound of ‖ΔX‖_F over the last two dimensions, the matrix deviation is lin_blocks + ‖e‖_F
    or the rows' √Σ rdev², the smaller."""
    if isinstance(out, list | tuple):
        return type(out)(_finish(o, None) for o in out)
    if not isinstance(out, Box):
        return out
    v = out.value
    mag = torch.nan_to_num(torch.maximum(out.lo.abs(), out.hi.abs()), posinf=0.0)
    pad = REL * (mag + v.abs()) + TINY
    lo, hi = out.lo - pad, out.hi + pad
    e_lo, e_hi = out.e_lo, out.e_hi
    own_lo, own_hi = (out.own_lo - pad, out.own_hi + pad) if out.has_own else (None, None)
    own_rows = out.own_rows + row_norm(pad) if out.own_rows is not None and v.dim() else None
    if lin is not None and e_lo is not None and e_hi is not None:
        lo = torch.maximum(lo, v - lin + e_lo - pad)
        hi = torch.minimum(hi, v + lin + e_hi + pad)
        e_lo = torch.maximum(e_lo, lo - v - lin - pad)
        e_hi = torch.minimum(e_hi, hi - v + lin + pad)
    lo, hi = torch.minimum(lo, v), torch.maximum(hi, v)
    if v.dim() == 0:
        return Box(v, lo, hi, out.l2, None, e_lo, e_hi, out.aux, own_lo, own_hi, out.dot,
                   own_rows)
    rdev = row_norm(torch.maximum(hi - v, v - lo))
    if out.rdev is not None:
        rdev = torch.minimum(rdev, out.rdev.expand(rdev.shape))
    if out.l2 is not None and v.dim() >= 2:
        rdev = torch.minimum(rdev, out.l2.reshape(-1, *([1] * (v.dim() - 2))))
    if lin_rows is not None and e_lo is not None and e_hi is not None:
        e_rows = row_norm(torch.maximum(e_lo.abs(), e_hi.abs()))
        rdev = torch.minimum(rdev, (lin_rows + e_rows) * (1 + 4 * 2.0**-53))
    mdev = None
    if lin_blocks is not None and e_lo is not None and e_hi is not None and v.dim() >= 3:
        e_mat = row_norm(row_norm(torch.maximum(e_lo.abs(), e_hi.abs())))
        mdev = torch.minimum(row_norm(rdev), (lin_blocks + e_mat) * (1 + 4 * 2.0**-53))
    move = rdev.unsqueeze(-1) + pad
    lo = torch.maximum(lo, v - move)
    hi = torch.minimum(hi, v + move)
    return Box(v, lo, hi, out.l2, rdev, e_lo, e_hi, out.aux, own_lo, own_hi, out.dot,
               own_rows, mdev, lin_rows)


def input_box(domain: Domain, center: Tensor, radius: Tensor) -> Box:
    """The model input: [x − r, x + r] ∩ D elementwise, per-sample ℓ2 deviation r, and the
    Taylor model x = x₀ + δ (A = I, remainder 0)."""
    c = center.detach().to(F64)
    r = radius.to(F64).reshape(-1, *([1] * (c.dim() - 1)))
    if isinstance(domain, BoxDomain):
        d_lo, d_hi = domain.lo, domain.hi
    elif isinstance(domain, EmbeddingDomain):
        d_lo, d_hi = -domain.max_norm, domain.max_norm
    else:
        raise LipcertError(f"unknown input domain {domain!r}")
    if bool(((c < d_lo) | (c > d_hi)).any()):
        raise LipcertError("an input lies outside the input domain")
    lo = torch.clamp(c - r, min=d_lo)
    hi = torch.clamp(c + r, max=d_hi)
    zero = torch.zeros_like(c)
    return Box(c, lo, hi, radius.to(F64).clone(), None, zero, zero)


class Intervals:
    """Forward intervals for one exported program (module docstring). ``taylor``: use the
    first-order Taylor models (exact centre Jacobians, computed once per batch of centres)."""

    def __init__(self, prop: Propagator, domain: Domain, taylor: bool = True) -> None:
        self.prop, self.domain = prop, domain
        self.taylor = taylor
        self.graph = prop.graph
        self.consts = {name: _constant(c.t) for name, c in prop.consts.items()}
        self.cache: dict[Any, Any] = {}
        self._centre: Tensor | None = None
        self._norms: dict[str, Tensor] = {}
        self._grams: dict[str, Tensor] = {}
        self._row_norms: dict[str, Tensor] = {}
        self._block_norms: dict[str, Tensor] = {}
        self._units: dict[str, Tensor] = {}
        self._row_grams: dict[str, Tensor] = {}
        self._memo: dict[str, Any] = {}
        self._sids: dict[str, Tensor | None] = {}
        self.jacobians: ForwardJacobians | None = None
        self.symbolic: SymbolicRemainders | None = None
        self._symbolic_key: tuple[Tensor, Tensor] | None = None

    def prepare(self, center: Tensor) -> None:
        """Centre Jacobian row norms and the sample of every element, for this batch."""
        if self._centre is not None and self._centre is center:
            return
        zero = torch.zeros(center.shape[0], dtype=F64)
        res = self.prop.run(self.domain, center=center, radius=zero, ibp=False)
        sids: dict[str, Tensor | None] = {}
        for node in self.graph.nodes:
            b = res.env.get(node.name)
            if isinstance(b, Bound):
                sid = b.sid
                if sid is None and center.shape[0] == 1 and b.dim() > 0:
                    # the engine tracks no ids for one sample: every element is sample 0's
                    sid = torch.zeros(b.shape, dtype=torch.int64)
                sids[node.name] = sid
                if node.target is SDPA:
                    inner = None if sid is None else sid[..., :1]
                    sids[f"{node.name}.scores"] = sids[f"{node.name}.probs"] = inner
        self._sids = sids
        self._centre = center
        self.jacobians = ForwardJacobians(self.graph, self.consts, self.prop.input_name, center,
                                          self.batch_major)
        self._norms = self.jacobians.input_norms()
        self._grams = {name: g for name, g in self.jacobians.score_grams.items()
                       if self.batch_major(name)}
        self._row_norms = {name: _largest_singular(g) for name, g in
                           self.jacobians.row_grams.items() if self.batch_major(name)}
        self._units = {name: units for name, units in self.jacobians.row_units.items()
                       if name in self._row_norms}
        self._row_grams = {name: g for name, g in self.jacobians.row_grams.items()
                           if name in self._units}
        self._block_norms = {name: _matrix_norms(self._row_norms[name], units) for name, units
                             in self._units.items() if units.dim() >= 3}
        self._memo = {}

    def batch_major(self, name: str) -> bool:
        """Whether dim 0 of the node is the sample (by the bound engine's sample ids)."""
        sid = self._sids.get(name)
        if sid is None or sid.dim() == 0 or self._centre is None:
            return False
        n = self._centre.shape[0]
        if sid.shape[0] != n:
            return False
        ids = torch.arange(n).reshape(-1, *([1] * (sid.dim() - 1)))
        return bool((sid == ids).all())

    def prepare_symbolic(self, center: Tensor, labels: Tensor, logits_name: str) -> bool:
        """Set up the symbolic remainders (``symbolic.py``) for this batch of centres and
        labels; True if the model is within that method. Later calls with this same
        ``center`` tensor tighten the intervals with them."""
        self.prepare(center)
        self.symbolic = None
        env0 = self(center, torch.zeros(center.shape[0], dtype=F64))
        sym = SymbolicRemainders(self.graph, self.consts, self.prop.input_name, logits_name,
                                 self.domain)
        if not sym.prepare(center, labels, env0, self.batch_major, self.jacobians):
            return False
        self.symbolic, self._symbolic_key = sym, (center, labels)
        return True

    def symbolic_for(self, center: Tensor, labels: Tensor | None = None
                     ) -> SymbolicRemainders | None:
        """The symbolic remainders prepared for exactly these centres (and labels)."""
        if self.symbolic is None or self._symbolic_key is None:
            return None
        c, y = self._symbolic_key
        if c is not center or (labels is not None and not torch.equal(y, labels)):
            return None
        return self.symbolic

    def first_order(self, name: str, radius: Tensor, shape: torch.Size) -> Tensor | None:
        """r·‖A_row‖ of a node (or of an attention's scores or probabilities) per element."""
        norms = self._norms.get(name)
        if norms is None or norms.shape != shape:
            return None
        sid = self._sids.get(name, "missing")
        if isinstance(sid, str):
            return None
        if sid is None:
            return norms * radius.max()
        s = sid.expand(shape)
        r = torch.where(s >= 0, radius[s.clamp(min=0)], radius.max())
        return norms * r * (1 + 4 * 2.0**-53)

    def first_order_rows(self, name: str, radius: Tensor, shape: torch.Size
                         ) -> tuple[Tensor | None, Tensor | None]:
        """For a batch-major node whose rows' Gram matrices the input pass recorded (module
        docstring): r·‖A_row‖₂ per row and the first-order bound of ‖ΔX‖_F over the last
        two dimensions; each None where not known."""

        def scaled(norms: Tensor | None, lead: torch.Size) -> Tensor | None:
            if norms is None or norms.shape != lead:
                return None
            return norms * radius.reshape(-1, *([1] * (norms.dim() - 1))) * (1 + 4 * 2.0**-53)

        return (scaled(self._row_norms.get(name), shape[:-1]),
                scaled(self._block_norms.get(name), shape[:-2]))

    def __call__(self, center: Tensor, radius: Tensor) -> dict[str, Any]:
        if self.taylor:
            self.prepare(center)
        radius = radius.to(F64)
        env: dict[str, Any] = {}
        ctx = FwdCtx(n=center.shape[0], cache=self.cache,
                     radius=radius if self.taylor else None,
                     grams=self._grams if self.taylor else {},
                     units=self._units if self.taylor else {},
                     row_grams=self._row_grams if self.taylor else {}, memo=self._memo)
        sym = self.symbolic_for(center) if self.taylor else None
        tighten = None if sym is None else (lambda name, out: sym.tighten(name, out, env))
        for node in self.graph.nodes:
            if node.op == "placeholder":
                env[node.name] = (input_box(self.domain, center, radius)
                                  if node.name == self.prop.input_name
                                  else self.consts[node.name])
            elif node.op == "call_function":
                env[node.name] = self._apply(ctx, node, env, radius, tighten)
        return env

    def _apply(self, ctx: FwdCtx, node: torch.fx.Node, env: dict[str, Any],
               radius: Tensor, tighten: Tighten | None) -> Any:
        if not self.taylor:
            return forward_node(ctx, node, env, None)
        return forward_node(ctx, node, env, lambda name, shape: self.first_order(
            name, radius, shape), tighten, lambda name, shape: self.first_order_rows(
            name, radius, shape))


FirstOrder = Callable[[str, torch.Size], Tensor | None]
FirstOrderRows = Callable[[str, torch.Size], tuple[Tensor | None, Tensor | None]]
Tighten = Callable[[str, Any], Any]


def forward_node(ctx: FwdCtx, node: torch.fx.Node, env: dict[str, Any],
                 first_order: FirstOrder | None, tighten: Tighten | None = None,
                 first_order_rows: FirstOrderRows | None = None) -> Any:
    """The forward value of one call node from ``env``: constant folding, or its forward rule
    and :func:`_finish`. ``first_order(name, shape)``: r·‖A_e‖ per element of a node (or of
    an attention's ``<name>.scores`` / ``<name>.probs``), or None without Taylor models;
    ``first_order_rows(name, shape)``: r·‖A_row‖₂ per row and the first-order bound of
    ‖ΔX‖_F over the last two dimensions (each or None); ``tighten(name, box)``: a sharper
    remainder (symbolic remainders), applied before :func:`_finish` intersects the interval
    with the Taylor model."""
    if is_runtime_check(node.target):
        return None
    args = map_arg(node.args, lambda a: env[a.name])
    kwargs = map_arg(dict(node.kwargs), lambda a: env[a.name])
    if node.target is operator.getitem and isinstance(args[0], list | tuple):
        return args[0][args[1]]
    if not _active((args, kwargs)):
        with torch.no_grad():
            out = node.target(*args, **kwargs)
        return tree_map(lambda t: _constant(t) if isinstance(t, Tensor) else t, out)
    fn = lookup_forward(node.target)
    if fn is None:
        raise LipcertError(f"no forward-interval rule for {node.target}")
    ctx.node = node
    ctx.first_order = None
    ctx.tighten = tighten
    if first_order is not None and node.target is SDPA:
        q, k = args[0], args[1]
        shape = torch.Size((*torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]),
                            q.shape[-2], k.shape[-2]))
        ctx.first_order = {f"{node.name}.{part}": first_order(f"{node.name}.{part}", shape)
                           for part in ("scores", "probs")}
    out = fn(ctx, *args, **kwargs)
    if tighten is not None:
        out = tighten(node.name, out)
    lin = lin_rows = lin_blocks = None
    if isinstance(out, Box) and first_order is not None:
        lin = first_order(node.name, out.shape)
    if isinstance(out, Box) and first_order_rows is not None:
        lin_rows, lin_blocks = first_order_rows(node.name, out.shape)
    return _finish(out, lin, lin_rows, lin_blocks)


def _largest_singular(gram: Tensor) -> Tensor:
    """(…): an upper bound of √λ_max of each Gram matrix (…, w, w) (module docstring)."""
    top = torch.linalg.eigvalsh(gram)[..., -1].clamp(min=0)
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (top * (1 + 1e-9) + 1e-10 * trace).sqrt() * (1 + 4 * 2.0**-53) + 1e-300


def _matrix_norms(rows: Tensor, units: Tensor) -> Tensor:
    """(n, …): √(max_c Σ_{t ∋ c} ‖A_t‖²) over the last dimension t of the row norms
    ``rows`` (n, …, T) (module docstring), ``units`` (coordinates, …, T) whether row t
    depends on input coordinate c; rounded up."""
    sq = rows.square()
    per = torch.einsum("c...t,n...t->cn...", units.to(sq.dtype), sq)
    top = per.amax(0) * (1 + gamma(rows.shape[-1] + 2))
    return top.sqrt() * (1 + 4 * 2.0**-53)


SHAPE_QUERIES = {torch.ops.aten.sym_size, torch.ops.aten.sym_numel, torch.ops.aten.sym_stride,
                 torch.ops.aten.size, torch.ops.aten.numel, torch.ops.aten.dim}


def dependent_nodes(graph: torch.fx.Graph, input_name: str) -> list[torch.fx.Node]:
    """The call nodes that depend on the model input, in graph order."""
    seen = {input_name}
    out = []
    for node in graph.nodes:
        if node.op == "call_function" and any(a.name in seen for a in node.all_input_nodes):
            seen.add(node.name)
            out.append(node)
    return out


def check_rules(graph: torch.fx.Graph, input_name: str) -> None:
    """Raise one error naming every operator on the input's path that lacks a forward rule,
    or (for an op with a floating-point output that is not a constant) a backward rule."""
    missing: dict[str, str] = {}
    # Nodes that read only the input's sizes (arange(seq_len), a buffer sliced to the
    # sequence length) are constants for a batch, evaluated as they are.
    by_value = {input_name}
    for node in dependent_nodes(graph, input_name):
        packet = getattr(node.target, "overloadpacket", node.target)
        if packet in SHAPE_QUERIES or packet in CONSTANT_OPS:
            continue  # shape queries, zeros_like & co. (their own forward rules)
        if not any(a.name in by_value for a in node.all_input_nodes):
            continue
        by_value.add(node.name)
        if node.target is operator.getitem:
            continue
        leaves = tree_flatten(node.meta.get("val"))[0]
        if not any(isinstance(t, Tensor) for t in leaves):
            continue  # a shape computation (symbolic sizes), evaluated as is
        floating = any(isinstance(t, Tensor) and t.is_floating_point() for t in leaves)
        if lookup_forward(node.target) is None or (
                floating and lookup_backward(node.target) is None):
            missing.setdefault(str(node.target), node.name)
    if missing:
        listed = ", ".join(f"{op} (node '{name}')" for op, name in missing.items())
        raise LipcertError(
            f"no margin-gradient rule for {len(missing)} operator(s): {listed}; add "
            "@forward_rule and @backward_rule functions in lipcert/bounds/backward/rules/")

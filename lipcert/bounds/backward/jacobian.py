"""Row norms of exact Jacobians at the centre input, by forward-mode differentiation in
float64: ‖∂y_e/∂x‖₂ of every node y (the first-order part of the forward intervals) and
the gains ‖∂y_e/∂(row t of k)‖₂ of the symbolic remainders (``symbolic.py``).

A pass seeds one tangent per source coordinate (all samples at once: samples never mix)
and pushes the stack through the later ops (``tangents.push``), accumulating the squares
of each recorded node's tangents. Attention nodes also give the norms of their scores and
probabilities (``<node>.scores``, ``<node>.probs``), and the input pass the Gram matrix
A_iA_iᵀ of each score row's Jacobian A_i = ∂s_i/∂x (S × input size) where a row has at most
MAX_GRAM_KEYS keys (``ForwardJacobians.score_grams``; for attention's softmax terms,
``rules/attention.py``), and of each row's Jacobian, of at most MAX_ROW_GRAM elements, at
the nodes its compressed stack reads and at those its one-tangent-per-coordinate stack
reaches after the first token mixing (``ForwardJacobians.row_grams``; their largest
eigenvalues bound the rows' ℓ2 deviations, ``forward.py``).

Compressed passes (derivation: docs/local-margin.md, "Cost"). The source's coordinates
fall into units (its rows, or single coordinates); ``dependency.py`` finds which units
every later element can depend on and colours the units so that, at the nodes before the
first token-mixing op, no element depends on two units of one colour. One tangent then
seeds coordinate c of every unit of a colour: by linearity it carries the sum of those
units' columns, and at a node where no element depends on two of them each element holds
exactly its own unit's entry. Such nodes are recorded from the compressed stack; where the
graph mixes the units (attention), the stack is split back into one tangent per
coordinate by masking each unit's elements at the last conflict-free nodes, and the rest
of the graph runs as before. Only nodes whose dim 0 is the sample (``batch_major``) are
read or split this way. A token-wise block of a ViT thus costs one tangent per coordinate
of a row instead of one per coordinate of the sample.

The result is a float64 evaluation; it is raised by the factor 1 + 1e-9 and by 1e-12 of the
node's largest norm, which covers its rounding (relative errors of order 1e-15 per op)
under the same float model as the centre values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lipcert.bounds.backward.dependency import (
    Dep,
    colouring,
    conflict_free,
    dependencies,
)
from lipcert.bounds.backward.evaluation import SDPA, as_f64, is_runtime_check, node_values
from lipcert.bounds.backward.tangents import push

REL = 1e-9
BUDGET = 2**23  # the most elements of one node's tangent stack at a time
MAX_GRAM_KEYS = 64  # score rows with more keys get no Gram matrix (it costs S per entry)
MAX_ROW_GRAM = 64  # the widest rows whose Gram matrices the input pass records


class ForwardJacobians:
    """Forward-mode Jacobian norms for one batch of centres ``x``: centre values computed
    once, shared by every pass. ``batch_major(name)``: whether dim 0 of the node is the
    sample (None: no compressed passes)."""

    def __init__(self, graph: torch.fx.Graph, consts: dict[str, Any], input_name: str,
                 x: Tensor, batch_major: Callable[[str], bool] | None = None,
                 budget: int = BUDGET) -> None:
        self.graph, self.input_name, self.budget = graph, input_name, budget
        self.nodes = list(graph.nodes)
        x = x.detach().to(torch.float64)
        consts = as_f64(consts)
        with torch.no_grad():
            self.vals = node_values(graph, consts, input_name, x)
            self.vals1 = (_one_sample(graph, consts, input_name, x, self.vals)
                          if batch_major else None)
        self.batch_major = batch_major or (lambda name: False)
        self.coeffs: dict[Any, Any] = {}
        self.score_grams: dict[str, Tensor] = {}
        self.row_grams: dict[str, Tensor] = {}
        self.row_units: dict[str, Tensor] = {}

    def input_norms(self) -> dict[str, Tensor]:
        """``{node: ‖∂y_e/∂x‖₂ per element}`` for the input and every node depending on it,
        attention nodes' scores and probabilities included; also sets
        :attr:`score_grams`, :attr:`row_grams` and :attr:`row_units` (the input
        coordinates each of those rows depends on, (input size, …))."""
        names = {nd.name for nd in self.nodes if nd.op == "call_function"}
        rec = self._pass(self.input_name, 1, names | {self.input_name}, total=True)
        self.score_grams, self.row_grams = rec.grams, rec.row_grams
        self.row_units = rec.row_units
        return {name: _rounded_up(s.sqrt()) for name, s in rec.sq.items()}

    def row_gains(self, source: str, targets: set[str]) -> dict[str, Tensor]:
        """``{target: G}`` with G[t, s, ...] = ‖∂y_e/∂(row t of the source)‖₂ at the centre
        for every element e of sample s of each target after ``source`` (a row: the last
        dimension; the source's dim 0 is the batch). A target is a node, or an attention
        node's scores or probabilities (``<node>.scores``, ``<node>.probs``)."""
        width = self.vals[source].shape[-1]
        sq = self._pass(source, width, targets, total=False).sq
        return {name: _rounded_up(s.sqrt()) for name, s in sq.items() if name in targets}

    def _pass(self, source: str, width: int, targets: set[str], total: bool) -> _Recorder:
        """The recorder of one pass: sums of squared tangents per recorded node, over all
        source coordinates (``total``, shape of the node) or per unit of ``width``
        coordinates (units first)."""
        src = self.vals[source]
        units = src[0].numel() // width
        at = next(i for i, nd in enumerate(self.nodes) if nd.name == source)
        recorded = targets
        targets = targets | {part_owner(t) for t in targets}  # the nodes the pass must reach
        stop = max((i for i, nd in enumerate(self.nodes) if nd.name in targets), default=at)
        reach = {source}
        chain = []
        for nd in self.nodes[at + 1:stop + 1]:
            if nd.op == "call_function" and not is_runtime_check(nd.target) and any(
                    a.name in reach for a in nd.all_input_nodes):
                reach.add(nd.name)
                chain.append(nd)
        room = max(1, self.budget // max([src.numel()] + [self._size(nd) for nd in chain]))
        plan = _Plan(self, source, units, chain, targets, total, room)
        rec = _Recorder(plan, total, recorded)
        if total and source in targets:
            rec.sq[source] = torch.ones_like(src)
        chunk_c = max(1, min(width, room // plan.colours)) if plan.need_c else width
        at_cut: list[Tensor] = []
        for c0 in range(0, width, chunk_c):
            cs = torch.arange(c0, min(width, c0 + chunk_c))
            kept = self._compressed(plan, rec, src, cs) if plan.need_c else {}
            if plan.cut is not None:
                at_cut.append(kept[plan.cut])
            elif plan.need_e:
                step = max(1, room // len(cs))
                for u0 in range(0, units, step):
                    us = torch.arange(u0, min(units, u0 + step))
                    tans = self._split(plan, src, cs, us, kept)
                    self._expanded(plan, rec, tans, len(cs), us)
        if plan.cut is not None:
            stack = torch.cat([t.reshape(plan.colours, -1, *t.shape[1:]) for t in at_cut], 1)
            step = max(1, room // plan.support)
            for u0 in range(0, units, step):
                us = torch.arange(u0, min(units, u0 + step))
                tans = {plan.cut: _narrowed(stack, plan.deps[plan.cut], plan.colour, us,
                                            plan.support)}
                self._expanded(plan, rec, tans, plan.support, us)
        return rec

    def _size(self, nd: torch.fx.Node) -> int:
        """The largest tensor a node's tangents have per tangent (attention: its scores)."""
        size = max((t.numel() for t in _leaves(self.vals[nd.name])), default=1)
        if nd.target is SDPA:
            q, k = self.vals[nd.args[0].name], self.vals[nd.args[1].name]
            size = max(size, q[..., 0].numel() * k.shape[-2])
        return size

    def _compressed(self, plan: _Plan, rec: _Recorder, src: Tensor, cs: Tensor
                    ) -> dict[str, Tensor]:
        """The compressed stack through the nodes that need it; returns the stacks at the
        nodes where the expanded tangents start (``plan.split``)."""
        onehot = torch.nn.functional.one_hot(plan.colour, plan.colours).T.to(torch.float64)
        tans: dict[str, Any] = {plan.source: _seed(onehot, cs, plan.width, src)}
        kept: dict[str, Tensor] = {}
        last = _last_uses(plan.chain, plan.need_c)
        for i, nd in enumerate(plan.chain):
            if nd.name not in plan.need_c:
                continue
            tans[nd.name] = self._push(nd, tans, rec, compressed=True, c=len(cs))
            if nd.name in plan.split:
                kept[nd.name] = tans[nd.name]
            for a in nd.all_input_nodes:
                if last.get(a.name) == i:
                    tans.pop(a.name, None)
        return kept

    def _split(self, plan: _Plan, src: Tensor, cs: Tensor, us: Tensor,
               kept: dict[str, Tensor]) -> dict[str, Any]:
        """One tangent per coordinate (units ``us`` × coordinates ``cs``) at the source or
        at the split points, from the compressed stacks."""
        tans: dict[str, Any] = {}
        if plan.source in plan.need_e:
            eye = torch.zeros(len(us), plan.units, dtype=torch.float64)
            eye[torch.arange(len(us)), us] = 1.0
            tans[plan.source] = _seed(eye, cs, plan.width, src)
        for name, stack in kept.items():
            tans[name] = _split(stack, plan.deps[name], plan.colour, plan.colours, us)
        return tans

    def _expanded(self, plan: _Plan, rec: _Recorder, tans: dict[str, Any], c: int,
                  us: Tensor) -> None:
        """The per-unit tangents (``c`` per unit of ``us``) from ``tans`` through the nodes
        that need them."""
        run = {nd.name for nd in plan.chain if nd.name in plan.need_e and nd.name not in tans}
        last = _last_uses(plan.chain, run)
        for i, nd in enumerate(plan.chain):
            if nd.name in run:
                tans[nd.name] = self._push(nd, tans, rec, compressed=False, c=c, us=us)
            for a in nd.all_input_nodes:
                if last.get(a.name) == i:
                    tans.pop(a.name, None)

    def _push(self, nd: torch.fx.Node, tans: dict[str, Any], rec: _Recorder,
              compressed: bool, c: int, us: Tensor | None = None) -> Any:
        tan = push(nd, self.vals, tans, self.coeffs)
        parts = {}
        if nd.target is SDPA and isinstance(tan, list):
            parts = {f"{nd.name}.scores": tan[1], f"{nd.name}.probs": tan[2]}
            tan = tan[0]
        readable = nd.name in rec.plan.readable
        if nd.name in rec.plan.targets and tan is not None and readable == compressed:
            if isinstance(tan, list):
                parts.update({f"{nd.name}[{j}]": t for j, t in enumerate(tan)})
            else:
                parts[nd.name] = tan
            for name, t in parts.items():
                if isinstance(t, Tensor) and (rec.total or name in rec.names):
                    rec.add(name, nd.name, t, compressed, c, us)
        return tan


class _Plan:
    """Which nodes of one pass run compressed and which expanded, and where the expanded
    tangents start: at the last conflict-free nodes before the mixing (``split``), or at
    one node that every other recorded node is reached through (``cut``), whose units each
    touch fewer elements (``support``) than they have coordinates (module docstring)."""

    def __init__(self, jac: ForwardJacobians, source: str, units: int,
                 chain: list[torch.fx.Node], targets: set[str], total: bool,
                 room: int) -> None:
        self.source, self.units, self.chain, self.targets = source, units, chain, targets
        self.width = jac.vals[source][0].numel() // units
        self.deps: dict[str, Dep] = {}
        self.colour = torch.arange(units)
        if jac.vals1 is not None and jac.batch_major(source):
            self.deps = dependencies(chain, jac.vals1, source, units, jac.batch_major)
            self.colour = colouring(self.deps, units)
        self.colours = int(self.colour.max()) + 1
        n = jac.vals[source].shape[0]
        self.readable = {
            nd.name for nd in chain
            if self.colours < units and isinstance(self.deps.get(nd.name), Tensor)
            and not (nd.target is SDPA and (total or any(nd.name + p in targets
                                                         for p in PARTS)))
            and _fits(self.deps[nd.name], jac.vals[nd.name], n) and jac.batch_major(nd.name)
            and conflict_free(self.deps[nd.name], self.colour, self.colours)}
        # readable nodes none of whose rows depends on two units of one colour (the input
        # pass records their rows' Gram matrices)
        self.row_free = {name for name in self.readable if total and self.deps[name].dim() >= 3
                         and conflict_free(self.deps[name].any(-1), self.colour, self.colours)}
        # expanded nodes with rows (per sample at least two dimensions), read in the input
        # pass, where the tangents are one per coordinate of every unit
        self.row_spread = {nd.name for nd in chain if total and nd.name not in self.readable
                           and jac.batch_major(nd.name)
                           and isinstance(jac.vals[nd.name], Tensor)
                           and jac.vals[nd.name].dim() >= 3}
        reach = {source} | {nd.name for nd in chain}
        inputs = {nd.name: {a.name for a in nd.all_input_nodes} & reach for nd in chain}
        later = {t for t in targets & reach if t != source and t not in self.readable}
        self.cut, self.support = None, self.width
        if not total and later:
            self._choose_cut(jac, chain, inputs, later, n, room)
        self.need_c: set[str] = set()
        self.need_e: set[str] = set()
        self.split: set[str] = set() if self.cut is None else {self.cut}
        if self.cut is not None:
            self.need_c.add(self.cut)
        for nd in reversed(chain):
            name = nd.name
            if name in targets:
                (self.need_c if name in self.readable else self.need_e).add(name)
            if name in self.need_e and name != self.cut:
                if self.cut is None and name in self.readable:
                    self.split.add(name)
                    self.need_c.add(name)
                else:
                    self.need_e |= inputs[name]
            if name in self.need_c:
                self.need_c |= inputs[name]
        self.need_e.discard(self.cut)

    def _choose_cut(self, jac: ForwardJacobians, chain: list[torch.fx.Node],
                    inputs: dict[str, set[str]], later: set[str], n: int, room: int) -> None:
        """The last readable node that dominates every expanded target (each path from the
        source to one passes through it), if its units touch fewer elements than they have
        coordinates and its compressed stack for all coordinates fits in memory."""
        dom: dict[str, set[str]] = {self.source: {self.source}}
        for nd in chain:
            ins = [dom[a] for a in inputs[nd.name]]
            dom[nd.name] = {nd.name} | (set.intersection(*ins) if ins else set())
        common = set.intersection(*(dom[t] for t in later)) & self.readable
        for nd in reversed(chain):
            if nd.name in common:
                dep = self.deps[nd.name]
                support = int(dep.reshape(self.units, -1).sum(1).max())
                stack = self.colours * self.width * n * dep[0].numel()
                if support < self.width and stack <= 4 * jac.budget and support <= room:
                    self.cut, self.support = nd.name, support
                return


class _Recorder:
    """Sums of squared tangents per recorded node (``total``: every node and part, else
    those in ``names``); with ``total``, also Σ_c t_c[…, j]·t_c[…, k] over the tangents of
    every attention's scores whose rows have at most MAX_GRAM_KEYS keys (``grams``: the
    Gram matrices A_iA_iᵀ of the score rows, (n, …, L, S, S)), and of the rows of at most
    MAX_ROW_GRAM elements of the nodes the compressed stack reads where no row depends on
    two units of one colour (``row_grams``, (n, …, w, w)): there the sum over the
    compressed tangents is the row's Gram matrix, since each tangent carries one unit's
    columns on every row; and of the nodes the expanded stack runs through
    (``_Plan.row_spread``), where the tangents are the input's coordinates one by one;
    ``row_units``: which units each of those rows depends on (units, …; every unit where
    the dependency analysis has no mask)."""

    def __init__(self, plan: _Plan, total: bool, names: set[str]) -> None:
        self.plan, self.total, self.names = plan, total, names
        self.sq: dict[str, Tensor] = {}
        self.grams: dict[str, Tensor] = {}
        self.row_grams: dict[str, Tensor] = {}
        self.row_units: dict[str, Tensor] = {}

    def add(self, name: str, node: str, t: Tensor, compressed: bool, c: int,
            us: Tensor | None) -> None:
        plan = self.plan
        if self.total:
            s = _square_sum(t, 1)[0]
            if name.endswith(".scores") and not compressed and t.shape[-1] <= MAX_GRAM_KEYS:
                gram = torch.einsum("t...j,t...k->...jk", t, t)
                self.grams[name] = self.grams[name] + gram if name in self.grams else gram
            elif compressed and name in plan.row_free and t.shape[-1] <= MAX_ROW_GRAM:
                self._row_gram(name, t, plan.deps[node].any(-1)[:, 0])
            elif not compressed and name == node and node in plan.row_spread \
                    and t.shape[-1] <= MAX_ROW_GRAM:
                dep = plan.deps.get(node)
                units = (dep.any(-1)[:, 0] if isinstance(dep, Tensor) and dep.dim() >= 3
                         else torch.ones(plan.units, *t.shape[2:-1], dtype=torch.bool))
                self._row_gram(name, t, units)
        elif compressed:
            s = _square_sum(t, plan.colours)[plan.colour] * plan.deps[node]
        else:
            s = _square_sum(t, len(us))
        if name not in self.sq:
            shape = s.shape if self.total or compressed else (plan.units, *s.shape[1:])
            self.sq[name] = torch.zeros(shape, dtype=torch.float64)
        if self.total or compressed:
            self.sq[name] += s
        else:
            self.sq[name].index_add_(0, us, s)

    def _row_gram(self, name: str, t: Tensor, units: Tensor) -> None:
        """Add Σ_c t_c[…, j]·t_c[…, k] over this chunk of tangents to the node's row Gram
        matrices; ``units`` (units, …): which units each row depends on."""
        gram = torch.einsum("t...j,t...k->...jk", t, t)
        old = self.row_grams.get(name)
        self.row_grams[name] = gram if old is None else old + gram
        if old is None:
            self.row_units[name] = units


def _square_sum(t: Tensor, groups: int) -> Tensor:
    """Σ t² over each of ``groups`` equal consecutive blocks of dim 0 (one fused
    multiply-add pass per block member: no squared copy of the whole stack)."""
    blocks = t.reshape(groups, t.shape[0] // groups, *t.shape[1:])
    acc = torch.zeros(groups, *t.shape[1:], dtype=t.dtype)
    for i in range(blocks.shape[1]):
        acc.addcmul_(blocks[:, i], blocks[:, i])
    return acc


def _seed(rows: Tensor, cs: Tensor, width: int, src: Tensor) -> Tensor:
    """Tangents (k·|cs|, n, …) seeding coordinate c ∈ cs of the units weighted by each of
    the k rows of ``rows`` (k, units)."""
    k, units = rows.shape
    e = torch.zeros(len(cs), width, dtype=torch.float64)
    e[torch.arange(len(cs)), cs] = 1.0
    seed = rows[:, None, :, None] * e[None, :, None, :]  # (k, |cs|, units, width)
    n = src.shape[0]
    seed = seed.reshape(k * len(cs), 1, units * width).expand(-1, n, -1)
    return seed.reshape(k * len(cs), *src.shape).contiguous()


def _split(stack: Tensor, dep: Tensor, colour: Tensor, colours: int, us: Tensor) -> Tensor:
    """One tangent per (unit in ``us``, coordinate) from the compressed stack (colour,
    coordinate): each unit's colour's tangent on the elements that depend on the unit."""
    c = stack.shape[0] // colours
    per = stack.reshape(colours, c, *stack.shape[1:])[colour[us]]
    out = per * dep[us].unsqueeze(1)
    return out.reshape(len(us) * c, *stack.shape[1:])


def _narrowed(stack: Tensor, dep: Tensor, colour: Tensor, us: Tensor, support: int
              ) -> Tensor:
    """``support`` tangents per unit of ``us`` at the cut, on the unit's own elements, with
    the same Gram matrix as its W coordinates' tangents there: with T (W × support) a
    unit's tangents on its elements (one sample), T = QR gives TᵀT = RᵀR, so the rows of R
    give every later node the same sums of squares Σ_c (a·T_c)² = ‖Ta‖² = ‖Ra‖²."""
    k = len(us)
    flat = dep[us].reshape(k, -1)  # (units, elements of one sample)
    # each unit's elements first, in order; padding positions point at element 0 with 0
    order = torch.argsort((~flat).to(torch.int8), dim=1, stable=True)[:, :support]
    valid = flat.gather(1, order)
    t = stack[colour[us]].flatten(3)  # (units, W, n, elements)
    own = t.gather(3, order[:, None, None, :].expand(-1, t.shape[1], t.shape[2], -1))
    own = own * valid[:, None, None, :]
    r = torch.linalg.qr(own.permute(0, 2, 1, 3), mode="r")[1]  # (units, n, support, support)
    src = r.permute(0, 2, 1, 3) * valid[:, None, None, :]  # (units, row j, n, element)
    out = torch.zeros(k, support, *t.shape[2:], dtype=t.dtype)
    out.scatter_add_(3, order[:, None, None, :].expand(-1, support, t.shape[2], -1), src)
    return out.reshape(k * support, *stack.shape[2:])


PARTS = (".scores", ".probs")  # an attention node's internal quantities


def part_owner(name: str) -> str:
    """The node a target belongs to: ``<node>.scores``, ``<node>.probs`` → ``<node>``."""
    for part in PARTS:
        if name.endswith(part):
            return name.removesuffix(part)
    return name


def _fits(dep: Tensor, value: Any, n: int) -> bool:
    return isinstance(value, Tensor) and dep.shape[1] == 1 and \
        value.shape == (n, *dep.shape[2:])


def _leaves(x: Any) -> list[Tensor]:
    return [t for t in torch.utils._pytree.tree_flatten(x)[0] if isinstance(t, Tensor)]


def _last_uses(chain: list[torch.fx.Node], names: set[str]) -> dict[str, int]:
    """Position in ``chain`` of the last node among ``names`` that reads each node."""
    last: dict[str, int] = {}
    for i, nd in enumerate(chain):
        if nd.name in names:
            for a in nd.all_input_nodes:
                last[a.name] = i
    return last


def _one_sample(graph: torch.fx.Graph, consts: dict[str, Any], input_name: str, x: Tensor,
                vals: dict[str, Any]) -> dict[str, Any]:
    """Every node's value on the first sample alone (for the dependency analysis), or
    ``vals``, those on the whole batch, where the program does not run on one sample (a
    fixed batch size; the analysis then seeds the first sample only)."""
    try:
        return node_values(graph, consts, input_name, x[:1])
    except RuntimeError:
        return vals


def _rounded_up(norm: Tensor) -> Tensor:
    top = float(norm.max()) if norm.numel() else 0.0
    return norm * (1 + REL) + 1e-12 * top + 1e-300


def centre_jacobian_norms(graph: torch.fx.Graph, consts: dict[str, Any], input_name: str,
                          x: Tensor, budget: int = BUDGET,
                          batch_major: Callable[[str], bool] | None = None
                          ) -> dict[str, Tensor]:
    """``{node name: ‖∂y_e/∂x‖₂ per element}`` at the centre ``x`` (float64) for every node
    that depends on the input (:meth:`ForwardJacobians.input_norms`)."""
    return ForwardJacobians(graph, consts, input_name, x, batch_major, budget).input_norms()


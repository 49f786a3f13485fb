"""Property tests of the order-statistic rules (rules/order.py): max / min over dimensions,
elementwise max / min, sort, topk, and the GroupSort2 pattern, which must certify a
deel-torchlip network at its true bound of 1."""

from __future__ import annotations

import math
import operator

import deel.torchlip as torchlip
import pytest
import torch
from rules_harness import (
    BoundCall,
    Case,
    bound_program,
    check_rule,
    jacobian,
    maybe,
    ri,
    weight,
)

from lipcert.bounds import BoxDomain, Ctx, Propagator, input_bound
from lipcert.bounds.rules.order import fuse_pair_sorts, pair_sort_source

aten = torch.ops.aten
F64 = torch.float64
SEED = 3000  # + the index of a RULE_CASES entry


def _data_shape(g: torch.Generator) -> tuple[int, ...]:
    """A per-sample shape of 1 to 3 dimensions of sizes 1 to 3."""
    return tuple(ri(g, 1, 3) for _ in range(ri(g, 1, 3)))


def _mixed(g: torch.Generator, shape: tuple[int, ...]):
    """A program prefix: a linear layer along the last dimension (correlated elements) or
    the input itself."""
    W = weight(g, shape[-1], shape[-1], 2.0)
    use = maybe(g, 0.6)

    def pre(call, z):
        return call(aten.linear.default, z, W) if use else z

    return pre


def case_max_dim(g):
    shape = _data_shape(g)
    dim = ri(g, 1, len(shape)) - (len(shape) + 1 if maybe(g) else 0)  # positive or negative
    keep = maybe(g)
    op = aten.max.dim if maybe(g) else aten.min.dim
    pre = _mixed(g, shape)

    def prog(call, z):
        out = call(op, pre(call, z), dim, keep)
        return call(operator.getitem, out, 0)

    return Case(prog, shape)


def case_amax(g):
    shape = _data_shape(g)
    dims = [d for d in range(1, len(shape) + 1) if maybe(g)] or [len(shape)]
    dims = [d - len(shape) - 1 if maybe(g) else d for d in dims]
    keep = maybe(g)
    op = aten.amax.default if maybe(g) else aten.amin.default
    pre = _mixed(g, shape)
    return Case(lambda call, z: call(op, pre(call, z), dims, keep), shape)


def case_max_all(g):
    """max / min of all of one sample's elements (each sample selected, reduced, stacked)."""
    shape = _data_shape(g)
    op = aten.max.default if maybe(g) else aten.min.default
    pre = _mixed(g, shape)

    def prog(call, z):
        parts = call(aten.unbind.int, pre(call, z), 0)
        outs = [call(op, call(operator.getitem, parts, b)) for b in range(z.shape[0])]
        return call(aten.stack.default, outs)

    return Case(prog, shape)


def case_extreme(g):
    """max / min of two activations, or of an activation and a (broadcast) constant, or of
    an activation and a broadcast activation."""
    t, d = ri(g, 1, 3), ri(g, 1, 4)
    W1, W2 = weight(g, d, d, 2.0), weight(g, d, d, 2.0)
    op = [aten.maximum.default, aten.minimum.default, aten.max.other, aten.min.other,
          aten.fmax.default, aten.fmin.default][ri(g, 0, 5)]
    kind = ri(g, 0, 2)
    c = torch.randn(d, generator=g, dtype=F64)

    def prog(call, z):
        a = call(aten.linear.default, z, W1)
        if kind == 0:
            return call(op, a, call(aten.linear.default, z, W2))
        if kind == 1:
            return call(op, c, a)
        b = call(aten.amax.default, call(aten.linear.default, z, W2), [-1], True)
        return call(op, a, b)

    return Case(prog, (t, d))


def case_sort(g):
    shape = _data_shape(g)
    dim = ri(g, 1, len(shape)) - (len(shape) + 1 if maybe(g) else 0)
    desc = maybe(g)
    stable = maybe(g)
    pre = _mixed(g, shape)

    def prog(call, z):
        if stable:
            out = call(aten.sort.stable, pre(call, z), stable=True, dim=dim, descending=desc)
        else:
            out = call(aten.sort.default, pre(call, z), dim, desc)
        return call(operator.getitem, out, 0)

    return Case(prog, shape)


def case_topk(g):
    shape = _data_shape(g)
    dim = ri(g, 1, len(shape))
    k = ri(g, 1, shape[dim - 1])
    largest = maybe(g)
    in_order = k > 1 or maybe(g)
    pre = _mixed(g, shape)

    def prog(call, z):
        out = call(aten.topk.default, pre(call, z), k, dim, largest, in_order)
        return call(operator.getitem, out, 0)

    return Case(prog, shape)


def case_pair_sort(g):
    """GroupSort2 as deel-torchlip writes it (pairs, min and max, put back side by side),
    its variants (amin / amax, stack, max first, pairs along an earlier dimension), and
    near misses that are not the pattern (min and max of different tensors)."""
    t, m = ri(g, 1, 3), ri(g, 1, 3)
    d = 2 * m
    W, W2 = weight(g, d, d, 2.0), weight(g, d, d, 2.0)
    reducer = ri(g, 0, 1)  # 0: min.dim / max.dim, 1: amin / amax
    joiner = ri(g, 0, 1)  # 0: cat of keepdim results, 1: stack
    max_first = maybe(g, 0.3)
    pairs_last = maybe(g, 0.7)
    near_miss = maybe(g, 0.15)

    def pick(call, y, largest, dim, keep):
        if reducer == 0:
            out = call(aten.max.dim if largest else aten.min.dim, y, dim, keep)
            return call(operator.getitem, out, 0)
        return call(aten.amax.default if largest else aten.amin.default, y, [dim], keep)

    def prog(call, z):
        B = z.shape[0]
        y = call(aten.linear.default, z, W)
        other = call(aten.linear.default, z, W2) if near_miss else y
        shape = [B, t, m, 2] if pairs_last else [B, t, 2, m]
        dim = 3 if pairs_last else 2
        v, v2 = (call(aten.view.default, a, shape) for a in (y, other))
        keep = joiner == 0
        lo, hi = pick(call, v, False, dim, keep), pick(call, v2, True, dim, keep)
        parts = [hi, lo] if max_first else [lo, hi]
        if joiner == 0:
            out = call(aten.cat.default, parts, dim)
        else:
            out = call(aten.stack.default, parts, dim)
        return call(aten.view.default, out, [B, t, d])

    return Case(prog, (t, d), offset=0.5)


RULE_CASES = {
    "max_dim": case_max_dim,
    "amax": case_amax,
    "max_all": case_max_all,
    "elementwise_extreme": case_extreme,
    "sort": case_sort,
    "topk": case_topk,
    "pair_sort": case_pair_sort,
}


@pytest.mark.parametrize("name", list(RULE_CASES))
def test_rule_soundness(name: str) -> None:
    check_rule(RULE_CASES[name], seed=SEED + list(RULE_CASES).index(name),
               record=(__name__, name))


# --------------------------------------------------------------------------- GroupSort2


def test_pair_sort_is_certified_at_the_input_bound() -> None:
    """The recognised pattern keeps lip exactly (a permutation per pair), where the min and
    the max bounded apart give √2; the rewrite leaves no min / max node behind."""
    W = torch.linalg.qr(torch.randn(8, 8, dtype=F64))[0]

    def prog(call, z):
        v = call(aten.view.default, call(aten.linear.default, z, W), [1, 4, 2])
        lo = call(operator.getitem, call(aten.min.dim, v, 2, True), 0)
        hi = call(operator.getitem, call(aten.max.dim, v, 2, True), 0)
        return call(aten.view.default, call(aten.cat.default, [lo, hi], 2), [1, 8])

    ctx = Ctx(1)
    box = torch.ones(1, 8, dtype=F64)
    z = input_bound(ctx, BoxDomain(-1.0, 1.0), (1, 8), box=(-box, box))
    call = BoundCall(ctx)
    apart = prog(call, z)  # run as it goes: no rewrite
    lip_w = float(call(aten.linear.default, z, W).lip)
    assert lip_w == pytest.approx(1.0, rel=1e-6)
    assert float(apart.lip) == pytest.approx(math.sqrt(2) * lip_w, rel=1e-12)
    fused, _ = bound_program(prog, Ctx(1), z, z.lo)
    assert float(fused.lip) == pytest.approx(lip_w, rel=1e-12)
    graph = call.graph
    cat = next(n for n in graph.nodes if n.target is aten.cat.default)
    assert pair_sort_source(cat) is not None
    graph.output(list(graph.nodes)[-2])  # the final view
    assert fuse_pair_sorts(graph) == 1
    assert cat not in graph.nodes
    targets = [n.target for n in graph.nodes]
    assert aten.sort.default in targets
    assert aten.min.dim not in targets and aten.max.dim not in targets


def _deel_dense(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torchlip.Sequential(
        torchlip.SpectralLinear(12, 32), torchlip.GroupSort2(),
        torchlip.SpectralLinear(32, 32), torchlip.GroupSort2(),
        torchlip.SpectralLinear(32, 4),
    )
    return net.vanilla_export().eval()


def test_deel_groupsort_network_is_certified_at_one() -> None:
    """A dense deel-torchlip network (SpectralLinear + GroupSort2), exported after
    ``vanilla_export()``: 1-Lipschitz by construction, certified ≤ 1.01 globally and
    locally, and never below its exact Jacobian norms (random and searched points)."""
    model = _deel_dense(0)
    program = torch.export.export(model, (torch.rand(2, 12),),
                                  dynamic_shapes=({0: torch.export.Dim.AUTO},))
    prop = Propagator(program)
    assert fuse_pair_sorts(prop.graph) == 0  # the engine already rewrote both layers
    targets = [n.target for n in prop.graph.nodes]
    assert aten.min.dim not in targets and aten.sort.default in targets
    glob = prop.run((0.0, 1.0), sample_shape=(12,))
    bound = float(glob.lip.max())
    assert bound <= 1.01
    x = torch.rand(6, 12, dtype=torch.float32)
    local = prop.run((0.0, 1.0), center=x, radius=0.05)
    assert float(local.lip.max()) <= bound * (1 + 1e-12)
    model64 = model.double()
    pts = torch.rand(64, 4, 12, dtype=F64)
    J, _ = jacobian(lambda call, v: model64(v), pts)
    assert float(torch.linalg.matrix_norm(J, ord=2).max()) <= bound * (1 + 1e-9)
    xa = torch.rand(32, 12, dtype=F64, requires_grad=True)
    xb = (xa.detach() + 0.01 * torch.randn(32, 12, dtype=F64)).requires_grad_(True)
    opt = torch.optim.Adam([xa, xb], lr=0.02)
    for _ in range(60):  # ascend the difference ratio over pairs in the domain
        a, b = xa.clamp(0, 1), xb.clamp(0, 1)
        ratio = (model64(a) - model64(b)).norm(dim=1) / (a - b).norm(dim=1).clamp_min(1e-9)
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    assert float(ratio.detach().max()) <= bound * (1 + 1e-9)

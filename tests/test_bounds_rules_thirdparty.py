"""The L2-norm pooling rule and pattern (lipcert/bounds/rules/thirdparty.py): property tests
that try to break the bound (random and gradient-searched points, exact Jacobians), and the
recognition of torch's ``LPPool`` graphs as deel-torchlip's ``ScaledL2NormPool2d`` exports
them."""

from __future__ import annotations

import math

import deel.torchlip as torchlip
import pytest
import torch
from rules_harness import Case, check_rule, maybe, ri, weight

from lipcert.bounds import Propagator
from lipcert.bounds.rules.thirdparty import fuse_l2_norm_pools, l2_norm_pool_op, l2_pool_source

aten = torch.ops.aten
F64 = torch.float64


def case_l2_norm_pool(g: torch.Generator) -> Case:
    """y_w = s·‖x_w‖ over 1-D or 2-D windows (overlapping or not) of a mixed input."""
    nd = ri(g, 1, 2)
    kernel = [ri(g, 1, 3) for _ in range(nd)]
    stride = [ri(g, 1, k) for k in kernel] if maybe(g) else list(kernel)
    spatial = tuple(k + ri(g, 0, 3) for k in kernel)
    channels = ri(g, 1, 2)
    scale = 1.0 if maybe(g) else float(torch.rand((), generator=g)) * 2 + 0.1
    shape = (channels, *spatial)
    W = weight(g, spatial[-1], spatial[-1], 2.0)

    def prog(call, z):
        mixed = call(aten.linear.default, z, W)
        return call(l2_norm_pool_op, mixed, kernel, stride, scale)

    return Case(prog, shape)


RULE_CASES = {"l2_norm_pool": case_l2_norm_pool}
SEED = 7100  # + the index of a RULE_CASES entry


@pytest.mark.parametrize("name", list(RULE_CASES))
def test_rule_holds(name: str) -> None:
    check_rule(RULE_CASES[name], seed=SEED + list(RULE_CASES).index(name),
               record=(__name__, name))


@pytest.mark.parametrize("pool", [torch.nn.LPPool2d(2, 2), torch.nn.LPPool2d(2, (2, 3), (1, 2)),
                                  torch.nn.LPPool1d(2, 3)])
def test_lppool_graph_is_fused_into_the_same_function(pool: torch.nn.Module) -> None:
    """torch's LPPool(2) export (pow, avg_pool, sign, abs, relu, mul, mul, pow) becomes one
    l2_norm_pool node computing the same values, and nothing of the pattern is left."""
    x = torch.rand(3, 2, 7, 8) if isinstance(pool, torch.nn.LPPool2d) else torch.rand(3, 2, 9)
    program = torch.export.export(pool, (x,))
    graph = program.graph_module.graph
    output = next(n for n in graph.nodes if n.op == "output").args[0][0]
    assert l2_pool_source(output) is not None
    assert fuse_l2_norm_pools(graph) == 1
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert targets == [l2_norm_pool_op]
    program.graph_module.recompile()
    assert torch.allclose(program.module()(x), pool(x), rtol=1e-6, atol=1e-7)


def test_other_square_roots_are_not_fused() -> None:
    """A square root of an average pool with padding (partial windows) is not the pattern."""
    def f(x: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.avg_pool2d(x * x, 2, 2, padding=1) * 4).sqrt()

    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return f(x)

    graph = torch.export.export(Net(), (torch.rand(1, 1, 4, 4),)).graph_module.graph
    assert fuse_l2_norm_pools(graph) == 0


def test_deel_conv_network_is_certified_below_one() -> None:
    """deel-torchlip's convolutional network (SpectralConv2d, GroupSort2,
    ScaledL2NormPool2d, as in its HKR tutorial, smaller), after ``vanilla_export()``: a
    global bound ≤ 1.01 on the graph with both patterns fused, never below the exact
    Jacobian norm at random points and at points found by gradient ascent. The engine
    fuses both patterns itself (GroupSort2 and L2-norm pooling)."""
    torch.manual_seed(0)
    net = torchlip.Sequential(
        torchlip.SpectralConv2d(1, 4, (3, 3), padding="same"), torchlip.GroupSort2(),
        torchlip.ScaledL2NormPool2d(kernel_size=(2, 2)),
        torchlip.SpectralConv2d(4, 8, (3, 3), padding="same"), torchlip.GroupSort2(),
        torchlip.ScaledL2NormPool2d(kernel_size=(2, 2)), torch.nn.Flatten(),
        torchlip.SpectralLinear(8 * 3 * 3, 16), torchlip.GroupSort2(),
        torchlip.SpectralLinear(16, 4, bias=False),
    ).vanilla_export().eval()
    program = torch.export.export(net, (torch.rand(2, 1, 12, 12),),
                                  dynamic_shapes=({0: torch.export.Dim.AUTO},))
    prop = Propagator(program)
    targets = {n.target for n in prop.graph.nodes}
    assert l2_norm_pool_op in targets and aten.sort.default in targets
    assert aten.sign.default not in targets and aten.min.dim not in targets
    bound = float(prop.run((0.0, 1.0), sample_shape=(1, 12, 12)).lip.max())
    assert bound <= 1.01
    net64 = net.double()
    x = torch.rand(16, 1, 12, 12, dtype=F64, requires_grad=True)
    worst = 0.0
    for _ in range(10):  # ascent on the largest Jacobian norm, staying in [0, 1]
        jac = torch.func.vmap(torch.func.jacrev(lambda v: net64(v[None])[0]))(x)
        norms = torch.linalg.matrix_norm(jac.flatten(2), ord=2)
        worst = max(worst, float(norms.detach().max()))
        (grad,) = torch.autograd.grad(norms.sum(), x)
        with torch.no_grad():
            x = (x + 0.05 * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None,
                                                                             None]).clamp(0, 1)
        x.requires_grad_(True)
    assert 0 < worst <= bound * (1 + 1e-9)
    assert math.isfinite(bound)

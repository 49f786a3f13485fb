"""Graph normalisation and engine errors: in-place operators are functionalised, operators
without a rule are decomposed into ones with rules, every node still without a rule is named
in one error before anything is propagated, and an exception inside a rule becomes a
one-line error naming the node."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import lipcert.bounds.propagate as propagate
from lipcert.bounds import (
    RULES,
    Propagator,
    RuleError,
    UnsupportedOpError,
    as_program,
    layer_table,
    lookup,
)
from lipcert.certificate import certify
from lipcert.errors import LipcertError

aten = torch.ops.aten
F64 = torch.float64


# Two operators that have no bound rule and no decomposition, whatever rules exist.
@torch.library.custom_op("lipcert_test::odd_a", mutates_args=())
def odd_a(x: Tensor) -> Tensor:
    return x.sin()


@odd_a.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("lipcert_test::odd_b", mutates_args=())
def odd_b(x: Tensor) -> Tensor:
    return x.cos()


@odd_b.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


class Block(nn.Module):
    """A ResNet basic block written the way torchvision writes it (in-place ReLU and +=),
    plus an in-place scaling; ``inplace=False`` is the same function out of place."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.inplace:
            out += x
            out.mul_(0.5)
        else:
            out = (out + x) * 0.5
        return self.relu(out)


def _resnet(inplace: bool) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), Block(inplace), nn.Flatten(),
                        nn.Linear(2 * 6 * 6, 3))
    for bn in (net[1].bn1, net[1].bn2):
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _jacobian_norms(model: nn.Module, x: Tensor) -> Tensor:
    m64 = copy.deepcopy(model).double()
    out = []
    for xi in x.to(F64):
        J = torch.autograd.functional.jacobian(lambda z: m64(z.unsqueeze(0)).squeeze(0), xi)
        out.append(torch.linalg.matrix_norm(J.reshape(J.shape[0], -1), ord=2))
    return torch.stack(out)


def _mutable_calls(graph: torch.fx.Graph) -> list[str]:
    return [n.name for n in graph.nodes if n.op == "call_function"
            and getattr(getattr(n.target, "_schema", None), "is_mutable", False)]


def test_in_place_resnet_block_certifies_like_its_functional_twin() -> None:
    inplace, functional = _resnet(True), _resnet(False)
    x = torch.rand(4, 1, 6, 6)
    program = as_program(inplace, x)
    assert len(_mutable_calls(program.graph)) >= 3  # relu_, add_, mul_ as exported
    prop = Propagator(program)
    assert _mutable_calls(prop.graph) == [] and _mutable_calls(prop.program.graph) == []
    y = inplace(x).argmax(1)
    a = certify(inplace, x, y)
    b = certify(functional, x, y)
    assert a.lipschitz_upper == pytest.approx(b.lipschitz_upper, rel=1e-12)
    # functionalisation also lowers flatten to view, which loses the Flatten's own row
    rows_a = {r.name: r.upper for r in a.layers}
    rows_b = {r.name: r.upper for r in b.layers}
    assert {"0", "1", "1.conv1", "1.bn1", "1.conv2", "1.bn2", "3"} <= set(rows_a) <= set(rows_b)
    assert rows_a == pytest.approx({k: rows_b[k] for k in rows_a}, rel=1e-12)
    g = torch.Generator().manual_seed(3)
    points = torch.cat([x, torch.rand(4, 1, 6, 6, generator=g)])
    assert bool((_jacobian_norms(functional, points) <= a.lipschitz_upper).all())
    local = prop.run((0.0, 1.0), center=x, radius=0.05)
    assert torch.allclose(local.output.value, functional(x).double(), rtol=1e-5, atol=1e-6)


def test_supported_program_is_not_rewritten() -> None:
    """A program whose nodes all have rules and that mutates nothing is used as it is."""
    program = as_program(_resnet(False), torch.rand(2, 1, 6, 6))
    assert Propagator(program).program is program


def test_op_without_a_rule_is_decomposed_into_ops_with_rules(monkeypatch) -> None:
    """Without its rule, ``linear`` is decomposed (into ``t`` and ``addmm``) and the model
    still certifies; its dedicated rule is never looser than the decomposition's."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 3)).eval()
    x = torch.rand(3, 4, 4)
    y = model(x).argmax(1)
    with_rule = certify(model, x, y)
    monkeypatch.delitem(RULES, aten.linear)
    assert lookup(aten.linear.default) is None
    prop = Propagator.from_model(model, x)
    targets = {n.target for n in prop.graph.nodes if n.op == "call_function"}
    assert aten.linear.default not in targets and aten.addmm.default in targets
    assert prop.unsupported == []
    decomposed = certify(model, x, y)
    assert with_rule.lipschitz_upper <= decomposed.lipschitz_upper
    g = torch.Generator().manual_seed(5)
    points = torch.cat([x, torch.rand(6, 4, 4, generator=g)])
    assert bool((_jacobian_norms(model, points) <= decomposed.lipschitz_upper).all())
    # the decomposed nodes keep their modules: the per-layer table still has the Linears
    rows = {r.name for r in layer_table(prop, prop.run((0.0, 1.0), sample_shape=(4, 4)))}
    assert {"1", "3"} <= rows


class TwoOdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        a = odd_a(self.first(x))
        b = odd_b(self.second(a))
        return odd_b(b) + a


def test_every_node_without_a_rule_is_named_in_one_error(monkeypatch) -> None:
    prop = Propagator.from_model(TwoOdd().eval(), torch.rand(2, 4))
    assert [n.target for n in prop.unsupported] == [
        torch.ops.lipcert_test.odd_a.default, torch.ops.lipcert_test.odd_b.default,
        torch.ops.lipcert_test.odd_b.default]

    def never(*args, **kwargs):
        raise AssertionError("propagation started")

    monkeypatch.setattr(propagate, "input_bound", never)
    with pytest.raises(UnsupportedOpError) as err:
        prop.run((0.0, 1.0), sample_shape=(4,))
    msg = str(err.value)
    assert msg.startswith("no bound rule for 2 operators:")
    assert "lipcert_test.odd_a.default (graph node 'odd_a', from the model's top level)" in msg
    assert "graph node 'odd_b', from the model's top level; graph node 'odd_b_1'" in msg
    assert "@lipcert.bounds.rule(torch.ops.lipcert_test.odd_a)" in msg
    assert "@lipcert.bounds.rule(torch.ops.lipcert_test.odd_b)" in msg
    assert "lipcert/bounds/rules/custom.py" in msg
    with pytest.raises(UnsupportedOpError, match="no bound rule for 2 operators"):
        certify(TwoOdd().eval(), torch.rand(2, 4), torch.zeros(2, dtype=torch.long))


def test_nodes_that_depend_on_the_input_only_through_sizes_need_no_rule() -> None:
    """``ones_like(x)`` and ``ones(x.shape[0], ...)`` do not depend on x's values: an
    operator without a rule applied to them is evaluated exactly."""

    class SizesOnly(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x * odd_a(torch.ones_like(x)) + odd_b(torch.ones(x.shape[0], 4))

    prop = Propagator.from_model(SizesOnly(), torch.rand(3, 4))
    assert prop.unsupported == []
    res = prop.run((0.0, 1.0), sample_shape=(4,))
    assert float(res.lip.max()) == pytest.approx(float(torch.tensor(1.0).sin()), rel=1e-9)


def test_an_exception_inside_a_rule_is_a_one_line_error(monkeypatch) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU()), nn.Linear(4, 2)).eval()

    def broken(ctx, x):
        raise ValueError("boom\nwith a second line")

    monkeypatch.setitem(RULES, aten.relu.default, broken)
    prop = Propagator.from_model(model, torch.rand(2, 4))
    expected = ("the bound rule of aten.relu.default failed at graph node 'relu', from module "
                "'1.0' (torch.nn.modules.activation.ReLU): ValueError: boom with a second line")
    with pytest.raises(RuleError) as err:
        prop.run((0.0, 1.0), sample_shape=(4,))
    assert str(err.value) == expected
    assert isinstance(err.value, LipcertError) and isinstance(err.value.__cause__, ValueError)
    with pytest.raises(RuleError, match="ValueError: boom"):
        certify(model, torch.rand(3, 4), torch.zeros(3, dtype=torch.long))

"""Property tests of the activation rules added for third-party models (rules/activation.py):
hardswish, hardsigmoid, the clamp family, integer and scalar-base powers, eval-mode dropout."""

from __future__ import annotations

import math
import operator

import pytest
import torch
from rules_harness import BoundCall, Case, check_rule, maybe, ri, weight

from lipcert.bounds import BoxDomain, Ctx, UnsupportedOpError, input_bound

aten = torch.ops.aten
F64 = torch.float64
SEED = 4000  # + the index of a RULE_CASES entry


def _pointwise(fn, pos: bool = False, offset: float = 2.0):
    """Cases of y = fn(call, x) on the input itself or on a linear map of it (correlated
    elements), with intervals of random width around random points."""

    def make(g):
        t, d = ri(g, 1, 3), ri(g, 1, 4)
        width = float(torch.empty(()).uniform_(0.1, 2.0, generator=g))
        if pos or maybe(g, 0.4):
            return Case(fn, (t, d), pos=pos, offset=offset, width=width)
        W = weight(g, d, d, 2.0)
        return Case(lambda call, z: fn(call, call(aten.linear.default, z, W)), (t, d),
                    offset=offset)

    return make


def case_clamp(g):
    t, d = ri(g, 1, 3), ri(g, 1, 4)
    W1, W2, W3 = (weight(g, d, d, 2.0) for _ in range(3))
    kind = ri(g, 0, 8)
    a = float(torch.randn((), generator=g)) if maybe(g, 0.8) else None
    b = float(torch.randn((), generator=g)) + 0.5 if a is None or maybe(g, 0.8) else None
    ta = torch.randn(d, generator=g, dtype=F64)
    tb = torch.randn(t, d, generator=g, dtype=F64)  # some below ta: the op then gives tb

    def prog(call, z):
        y = call(aten.linear.default, z, W1)
        if kind == 0:
            return call(aten.clamp.default, y, a, b)
        if kind == 1:
            return call(aten.clip.default, y, a, b)
        if kind == 2:
            return call(aten.clamp.Tensor, y, ta, tb)
        if kind == 3:
            return call(aten.clamp.Tensor, y, call(aten.linear.default, z, W2), None)
        if kind == 4:
            lo = call(aten.linear.default, z, W2)
            return call(aten.clamp.Tensor, y, lo, call(aten.linear.default, z, W3))
        if kind == 5:
            return call(aten.clamp_min.default, y, -0.3 if a is None else a)
        if kind == 6:
            return call(aten.clamp_min.Tensor, y, ta)
        if kind == 7:
            return call(aten.clamp_max.default, y, 0.4 if b is None else b)
        return call(aten.clamp_max.Tensor, y, call(aten.linear.default, z, W2))

    return Case(prog, (t, d), offset=1.5)


def case_pow_integer(g):
    """x^n for integers n (negative ones on intervals away from 0), the exponent as an int,
    a float or a 0-d tensor, and GPT-2's tanh GELU written out (x³ inside)."""
    n = [-3, -2, -1, 0, 2, 3, 3, 4, 5, 7][ri(g, 0, 9)]
    form = ri(g, 0, 2)
    t, d = ri(g, 1, 3), ri(g, 1, 4)
    W = weight(g, d, d, 1.5)
    exponent = n if form == 0 else float(n) if form == 1 else torch.tensor(float(n),
                                                                           dtype=F64)
    op = aten.pow.Tensor_Tensor if form == 2 else aten.pow.Tensor_Scalar
    if n < 0:
        return Case(lambda call, z: call(op, z, exponent), (t, d), pos=True, offset=1.0,
                    width=float(torch.empty(()).uniform_(0.05, 1.0, generator=g)))
    if maybe(g, 0.25):
        return Case(lambda call, z: _gelu_tanh_written_out(call, call(aten.linear.default, z,
                                                                        W)), (t, d))
    if maybe(g):
        return Case(lambda call, z: call(op, z, exponent), (t, d), width=0.8)
    return Case(lambda call, z: call(op, call(aten.linear.default, z, W), exponent), (t, d),
                width=0.6)


def _gelu_tanh_written_out(call, x):
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) as GPT-2's NewGELUActivation exports."""
    inner = call(aten.add.Tensor, x, call(aten.mul.Tensor,
                                          call(aten.pow.Tensor_Scalar, x, 3.0), 0.044715))
    t = call(aten.tanh.default, call(aten.mul.Tensor, inner, math.sqrt(2.0 / math.pi)))
    return call(aten.mul.Tensor, call(aten.mul.Tensor, x, 0.5), call(aten.add.Tensor, t, 1.0))


def case_pow_scalar_base(g):
    c = [0.25, 0.5, 1.0, 2.0, math.e, 3.0][ri(g, 0, 5)]
    t, d = ri(g, 1, 3), ri(g, 1, 4)
    W = weight(g, d, d, 1.5)
    if maybe(g):
        return Case(lambda call, z: call(aten.pow.Scalar, c, z), (t, d))
    return Case(lambda call, z: call(aten.pow.Scalar, c, call(aten.linear.default, z, W)),
                (t, d))


def case_dropout_family(g):
    """Eval-mode dropout of every kind is the identity."""
    t, d = ri(g, 1, 3), ri(g, 1, 4)
    W = weight(g, d, d, 2.0)
    kind = ri(g, 0, 4)
    p = float(torch.rand((), generator=g)) * 0.9

    def prog(call, z):
        y = call(aten.linear.default, z, W)
        if kind == 4:
            out = call(aten.native_dropout.default, y, p, False)
            return call(operator.getitem, out, 0)
        op = [aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
              aten.feature_alpha_dropout.default][kind]
        return call(op, y, p, False)

    return Case(prog, (t, d))


RULE_CASES = {
    "hardswish": _pointwise(lambda call, z: call(aten.hardswish.default, z), offset=3.0),
    "hardsigmoid": _pointwise(lambda call, z: call(aten.hardsigmoid.default, z), offset=3.0),
    "clamp": case_clamp,
    "pow_integer": case_pow_integer,
    "pow_scalar_base": case_pow_scalar_base,
    "dropout_family": case_dropout_family,
}


@pytest.mark.parametrize("name", list(RULE_CASES))
def test_rule_soundness(name: str) -> None:
    check_rule(RULE_CASES[name], seed=SEED + list(RULE_CASES).index(name),
               record=(__name__, name))


def _box(lo: float, hi: float, shape=(1, 3)):
    ctx = Ctx(1)
    x = input_bound(ctx, BoxDomain(lo, hi), shape)
    return ctx, x


@pytest.mark.parametrize(("op", "slope"), [(aten.hardswish.default, 1.5),
                                           (aten.hardsigmoid.default, 1 / 6)])
def test_hard_activations_global_slopes(op, slope) -> None:
    ctx, x = _box(-math.inf, math.inf)
    out = BoundCall(ctx)(op, x)
    assert float(out.lip) == pytest.approx(slope, rel=1e-6)
    assert float(out.lip) >= slope
    ctx, x = _box(3.5, 9.0)  # hardswish is the identity there, hardsigmoid constant
    out = BoundCall(ctx)(op, x)
    assert float(out.lip) == pytest.approx(1.0 if op is aten.hardswish.default else 0.0,
                                           abs=1e-12)


def test_pow_refusals() -> None:
    ctx, x = _box(-1.0, 1.0)
    with pytest.raises(UnsupportedOpError, match="include 0"):
        BoundCall(ctx)(aten.pow.Tensor_Scalar, x, -2)
    with pytest.raises(UnsupportedOpError, match="≤ 0"):
        BoundCall(ctx)(aten.pow.Tensor_Scalar, x, 0.5)
    with pytest.raises(UnsupportedOpError, match="base ≤ 0"):
        BoundCall(ctx)(aten.pow.Scalar, -2.0, x)


def test_dropout_in_training_mode_is_refused() -> None:
    ctx, x = _box(-1.0, 1.0)
    for train in (True, None):  # native_dropout reads None as training
        with pytest.raises(UnsupportedOpError, match="eval mode"):
            BoundCall(ctx)(aten.native_dropout.default, x, 0.5, train)
    with pytest.raises(UnsupportedOpError, match="eval mode"):
        BoundCall(ctx)(aten.feature_alpha_dropout.default, x, 0.5, True)

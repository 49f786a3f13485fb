"""Property tests of the written-out normalisations (rules/decomposed.py): RMSNorm as
x·rsqrt(mean(x²) + ε) or x / sqrt(mean(x²) + ε), and centring x − mean(x), over any
dimensions, with near misses that must fall back to the elementwise rules; and the
exported Llama-style RMSNorm and channels-first LayerNorm, which must be recognised."""

from __future__ import annotations

import pytest
import torch
from rules_harness import Case, check_rule, jacobian, maybe, ri, weight
from torch import nn

from lipcert.bounds import Propagator

aten = torch.ops.aten
F64 = torch.float64
SEED = 5000  # + the index of a RULE_CASES entry


def _shape_dims(g: torch.Generator) -> tuple[tuple[int, ...], list[int]]:
    """A per-sample shape and the dimensions (of the batched tensor) to normalise over."""
    if maybe(g):
        shape = (ri(g, 1, 3), ri(g, 1, 4))
        dims = [[-1], [2], [1], [1, 2], [-2, -1]][ri(g, 0, 4)]
    else:
        shape = (ri(g, 1, 3), ri(g, 1, 3), ri(g, 1, 3))
        dims = [[1], [1, 3], [-1], [2, 3], [-3]][ri(g, 0, 4)]
    return shape, dims


def case_rms(g):
    shape, dims = _shape_dims(g)
    W = weight(g, shape[-1], shape[-1], 2.0)
    W2 = weight(g, shape[-1], shape[-1], 2.0)
    eps = float(10 ** torch.empty(()).uniform_(-3, 0, generator=g))
    kind = ri(g, 0, 4)  # 0-1: mul (either order), 2: mul(x, x) for x², 3: div, 4: near miss
    use_linear = maybe(g, 0.7)

    def prog(call, z):
        x = call(aten.linear.default, z, W) if use_linear else z
        src = call(aten.linear.default, z, W2) if kind == 4 else x
        sq = call(aten.mul.Tensor, src, src) if kind == 2 else call(aten.pow.Tensor_Scalar,
                                                                    src, 2)
        ms = call(aten.add.Tensor, call(aten.mean.dim, sq, dims, True), eps)
        if kind == 3:
            return call(aten.div.Tensor, x, call(aten.sqrt.default, ms))
        r = call(aten.rsqrt.default, ms)
        return call(aten.mul.Tensor, r, x) if kind == 1 else call(aten.mul.Tensor, x, r)

    return Case(prog, shape, offset=2.0, width=0.6)


def case_centring(g):
    """x − mean(x), alone or followed by the RMS division (a LayerNorm written out), and a
    near miss (the mean of another tensor)."""
    shape, dims = _shape_dims(g)
    W = weight(g, shape[-1], shape[-1], 2.0)
    W2 = weight(g, shape[-1], shape[-1], 2.0)
    eps = float(10 ** torch.empty(()).uniform_(-3, 0, generator=g))
    kind = ri(g, 0, 2)

    def prog(call, z):
        x = call(aten.linear.default, z, W)
        src = call(aten.linear.default, z, W2) if kind == 2 else x
        u = call(aten.sub.Tensor, x, call(aten.mean.dim, src, dims, True))
        if kind != 1:
            return u
        ms = call(aten.mean.dim, call(aten.pow.Tensor_Scalar, u, 2), dims, True)
        return call(aten.div.Tensor, u, call(aten.sqrt.default, call(aten.add.Tensor, ms, eps)))

    return Case(prog, shape, offset=2.0, width=0.6)


RULE_CASES = {"rms_written_out": case_rms, "centring_written_out": case_centring}


@pytest.mark.parametrize("name", list(RULE_CASES))
def test_rule_soundness(name: str) -> None:
    check_rule(RULE_CASES[name], seed=SEED + list(RULE_CASES).index(name),
               record=(__name__, name))


# --------------------------------------------------------------------------- exported models


class LlamaRMSNorm(nn.Module):
    """The Hugging Face Llama RMSNorm, as written there."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class ChannelsFirstLayerNorm(nn.Module):
    """ConvNeXt's channels-first LayerNorm, as Hugging Face writes it."""

    def __init__(self, c: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def _certify(model: nn.Module, x: torch.Tensor, radius: float) -> float:
    program = torch.export.export(model.eval(), (x,))
    return float(Propagator(program).run((0.0, 1.0), center=x, radius=radius).lip.max())


def test_llama_rmsnorm_is_bounded_as_one_normalisation() -> None:
    """Near inputs of RMS norm ≥ 0.3, the written-out RMSNorm is bounded by
    max|γ|/√(ms_min + ε), close to the exact Jacobian norm, where multiplying the rules
    of x², mean, rsqrt and the product would give an order of magnitude more."""
    torch.manual_seed(0)
    model = LlamaRMSNorm(8)
    x = 0.5 + 0.2 * torch.rand(4, 3, 8)
    bound = _certify(model, x, 0.05)
    J, _ = jacobian(lambda call, v: model.double()(v), x.double().unsqueeze(0))
    exact = float(torch.linalg.matrix_norm(J, ord=2).max())
    assert exact <= bound <= 3 * exact


def test_channels_first_layer_norm_is_bounded_as_one_normalisation() -> None:
    torch.manual_seed(0)
    model = ChannelsFirstLayerNorm(4)
    x = torch.rand(2, 4, 3, 3)
    x[:, 0] += 1.0  # channel spread: the variance is bounded away from 0
    bound = _certify(model, x, 0.02)
    J, _ = jacobian(lambda call, v: model.double()(v), x.double().unsqueeze(0))
    exact = float(torch.linalg.matrix_norm(J, ord=2).max())
    assert exact <= bound <= 3 * exact

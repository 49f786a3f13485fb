"""The models: both architectures in both families, their export, and the paper's choices."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lipcert.errors import LipcertError
from lipcert.models import ModelConfig, build_model, constrained_matrices, example_input
from lipcert.models.blocks import MLP, Attention, Block
from lipcert.models.ops import token_ball

CONFIGS = [
    ModelConfig(arch=arch, family=family, d_model=32, n_layers=2, n_heads=4, vocab_size=40,
                context=16, softmax_scale=3.0, final_scale=2.0)
    for arch in ("vit", "gpt")
    for family in ("lipschitz", "standard")
]
IDS = [f"{c.arch}-{c.family}" for c in CONFIGS]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_export_and_pt2_round_trip_reproduce_outputs(config: ModelConfig, tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model(config).eval()
    x = example_input(config, batch=3)
    expected = model(x)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=1e-6)
    torch.export.save(program, tmp_path / "m.pt2")
    reloaded = torch.export.load(tmp_path / "m.pt2")
    torch.testing.assert_close(reloaded.module()(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_output_shapes(config: ModelConfig) -> None:
    out = build_model(config)(example_input(config, batch=3))
    if config.arch == "vit":
        assert out.shape == (3, config.num_classes)
    else:
        assert out.shape == (3, config.context, config.vocab_size)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.family == "lipschitz"],
                         ids=[i for i in IDS if "lipschitz" in i])
def test_lipschitz_family_has_no_layernorm_and_no_biases(config: ModelConfig) -> None:
    model = build_model(config)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
    for _, weight in constrained_matrices(model):
        fan_out, fan_in = weight.shape
        sigma = torch.linalg.matrix_norm(weight.detach().double(), ord=2)
        rms_norm = sigma * math.sqrt(fan_in / fan_out)
        assert rms_norm.item() == pytest.approx(1.0, rel=1e-5)  # orthogonal init: unit RMS norm


def test_lipschitz_attention_uses_one_over_d_scores_and_one_third_output() -> None:
    torch.manual_seed(0)
    attn = Attention(d_model=16, n_heads=2, family="lipschitz", causal=True, softmax_scale=5.0)
    x = torch.randn(1, 6, 16)
    q, k, v = (lin(x).view(1, 6, 2, 8).transpose(1, 2) for lin in (attn.q, attn.k, attn.v))
    scores = 5.0 * q @ k.transpose(-1, -2) / 8
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), -math.inf)
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 6, 16)
    torch.testing.assert_close(attn(x), attn.o(y) / 3)


def test_lipschitz_residual_is_convex_combination() -> None:
    config = ModelConfig(arch="vit", family="lipschitz", d_model=16, n_layers=3, n_heads=2)
    block = build_model(config).blocks[0]
    assert block.alpha == pytest.approx(1 / 6)
    nn.init.zeros_(block.attn.o.weight)
    nn.init.zeros_(block.mlp.down.weight)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(block(x), (5 / 6) ** 2 * x)


def test_gpt_embedding_rows_have_rms_at_most_one() -> None:
    config = CONFIGS[2]
    model = build_model(config)
    with torch.no_grad():
        model.token_embed.weight.mul_(10)
    rms = model.embedding_table().pow(2).mean(dim=1).sqrt()
    assert rms.max() <= 1 + 1e-6


def test_token_ball_is_nonexpansive_and_bounded() -> None:
    g = torch.Generator().manual_seed(0)
    radius = 3.0
    worst = 0.0
    for _ in range(200):
        scale = torch.rand(1, generator=g) * 10
        x = torch.randn(4, 7, generator=g, dtype=torch.float64) * scale
        y = x + torch.randn(4, 7, generator=g, dtype=torch.float64) * torch.rand(1, generator=g)
        px, py = token_ball(x, radius), token_ball(y, radius)
        assert torch.linalg.vector_norm(px, dim=-1).max() <= radius * (1 + 1e-12)
        ratio = torch.linalg.vector_norm(px - py) / torch.linalg.vector_norm(x - y)
        worst = max(worst, ratio.item())
    assert worst <= 1 + 1e-12


def test_vit_rejects_indivisible_patch_size() -> None:
    with pytest.raises(LipcertError, match="patch_size"):
        ModelConfig(arch="vit", family="standard", image_size=28, patch_size=5)


def test_token_ball_derivatives_agree_in_every_autodiff_mode() -> None:
    """Forward mode must not silently return a zero tangent (it did for a custom_op)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64) * 4
    v = torch.randn(3, 5, generator=g, dtype=torch.float64)
    _, forward = torch.func.jvp(lambda t: token_ball(t, 2.0), (x,), (v,))
    jacobian = torch.autograd.functional.jacobian(lambda t: token_ball(t, 2.0), x)
    expected = torch.einsum("ijkl,kl->ij", jacobian, v)
    torch.testing.assert_close(forward, expected)
    assert forward.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda t: token_ball(t, 2.0), (x.requires_grad_(),))


def test_token_ball_is_one_node_in_the_exported_graph() -> None:
    model = build_model(CONFIGS[0]).eval()
    program = torch.export.export(model, (example_input(CONFIGS[0]),))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("lipcert.token_ball.default") == 1
    assert "aten.linalg_vector_norm.default" not in targets


def test_attention_rejects_indivisible_heads() -> None:
    with pytest.raises(LipcertError, match="not divisible"):
        Attention(d_model=10, n_heads=4, family="lipschitz", causal=False, softmax_scale=1.0)


@pytest.mark.parametrize("w_scale", [1.0, 3.0])
def test_paper_formula_bound_is_not_beaten_by_measured_jacobians(w_scale: float) -> None:
    """The paper-style bound is reported beside training runs; it must hold where it is
    tested: random and gradient-ascended inputs never show a larger Jacobian norm."""
    from lipcert.lower import empirical_lipschitz

    torch.manual_seed(0)
    config = ModelConfig(arch="vit", family="lipschitz", d_model=16, n_layers=2, n_heads=2,
                         image_size=8, patch_size=4, softmax_scale=4.0, final_scale=2.0)
    model = build_model(config).eval()
    with torch.no_grad():
        for _, weight in constrained_matrices(model):
            weight.mul_(w_scale)
    bound = model.lipschitz_bound()
    lower = empirical_lipschitz(model, torch.rand(16, 1, 8, 8), ascent_steps=20, top_k=4)
    assert 0 < lower.value <= bound


def test_gpt_paper_bound_holds_per_position() -> None:
    """The GPT's bound (embedded sequence → logits of one position) against secant ratios of
    random and gradient-ascended pairs of embedded sequences."""
    torch.manual_seed(0)
    config = ModelConfig(arch="gpt", family="lipschitz", d_model=16, n_layers=2, n_heads=1,
                         vocab_size=11, context=6, softmax_scale=4.0, final_scale=2.0)
    model = build_model(config).eval()
    with torch.no_grad():
        for _, weight in constrained_matrices(model):
            weight.mul_(2.0)
    bound = model.lipschitz_bound()
    g = torch.Generator().manual_seed(1)
    a = torch.randn(32, 6, 16, generator=g).requires_grad_(True)
    b = (a.detach() + 0.1 * torch.randn(32, 6, 16, generator=g)).requires_grad_(True)
    optimizer = torch.optim.Adam([a, b], lr=0.02)
    worst = 0.0
    for _ in range(60):
        fa, fb = model.forward_embeddings(a), model.forward_embeddings(b)
        ratio = (fa - fb).norm(dim=-1).amax(dim=-1) / (a - b).flatten(1).norm(dim=1)
        worst = max(worst, ratio.max().item())
        optimizer.zero_grad()
        (-ratio.sum()).backward()
        optimizer.step()
    assert 0 < worst <= bound


def test_paper_bound_is_refused_for_the_standard_family() -> None:
    for config in (CONFIGS[1], CONFIGS[3]):
        with pytest.raises(LipcertError, match="lipschitz family only"):
            build_model(config).lipschitz_bound()


def _max_token(x: torch.Tensor) -> torch.Tensor:
    """‖E‖_{2,∞} per batch element: the largest token norm."""
    return x.norm(dim=-1).amax(dim=-1)


def _lipschitz_modules() -> list[tuple[str, nn.Module]]:
    """A one-head attention (the proven case), an MLP and a one-head block, with weights
    scaled so that every factor of their bounds matters."""
    torch.manual_seed(3)
    parts = [
        ("attention", Attention(16, 1, "lipschitz", causal=False, softmax_scale=4.0)),
        ("mlp", MLP(16, 32, "lipschitz")),
        ("block", Block(16, 1, 32, "lipschitz", n_layers=1, causal=True, softmax_scale=4.0)),
    ]
    with torch.no_grad():
        for _, module in parts:
            for p in module.parameters():
                p.mul_(1.7)
    return parts


@pytest.mark.parametrize(("name", "module"), _lipschitz_modules(), ids=["attn", "mlp", "block"])
def test_each_module_bound_holds_in_the_max_token_norm(name: str, module: nn.Module) -> None:
    """Each part's own ``lipschitz_bound`` and ``output_radius`` (tokens of norm ≤ R in)
    against random and gradient-ascended token sequences: the measured ratio
    ‖f(x) − f(y)‖_{2,∞} / ‖x − y‖_{2,∞} and the output token norms never exceed them."""
    radius = 4.0
    bound = (module.lipschitz_bound() if isinstance(module, MLP)
             else module.lipschitz_bound(radius))
    out_radius = module.output_radius(radius)
    g = torch.Generator().manual_seed(4)
    a = (3 * torch.randn(64, 5, 16, generator=g)).requires_grad_(True)
    b = (a.detach() + 0.3 * torch.randn(64, 5, 16, generator=g)).requires_grad_(True)
    optimizer = torch.optim.Adam([a, b], lr=0.05)
    worst_ratio = worst_norm = 0.0
    for _ in range(80):
        x, y = token_ball(a, radius), token_ball(b, radius)
        fx, fy = module(x), module(y)
        ratio = _max_token(fx - fy) / _max_token(x - y)
        norms = _max_token(fx)
        worst_ratio = max(worst_ratio, ratio.max().item())
        worst_norm = max(worst_norm, norms.max().item())
        optimizer.zero_grad()
        (-(ratio.sum() + norms.sum())).backward()
        optimizer.step()
    assert 0 < worst_ratio <= bound, name
    assert 0 < worst_norm <= out_radius, name

"""Coverage and soundness on whole models: lipcert's ViT and GPT (both families),
nn.TransformerEncoder (pre- and post-LN), an MLP and a small CNN, certified from the module
and from a .pt2 round trip, in global and local mode; exact Jacobian norms never exceed the
bounds; and the Lipschitz ViT's engine bound against its hand-derived bound."""

from __future__ import annotations

import copy
import importlib
import io
import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from lipcert.bounds import Propagator, as_program, layer_table
from lipcert.bounds.rules.activation import GELU_MAX_SLOPE
from lipcert.certificate import certify
from lipcert.models import EmbeddingSpaceGPT, ModelConfig, build_model
from lipcert.models.adapters import LastPosition, embedding_domain
from lipcert.models.blocks import GELU_SLOPE_PAPER

F64 = torch.float64


class EncoderClassifier(nn.Module):
    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(x).mean(1))


def _vit(family: str, **kw) -> nn.Module:
    cfg = dict(arch="vit", family=family, d_model=16, n_layers=2, n_heads=2, image_size=8,
               patch_size=4)
    cfg.update(kw)
    return build_model(ModelConfig(**cfg)).eval()


def _gpt(family: str) -> nn.Module:
    g = build_model(ModelConfig(arch="gpt", family=family, d_model=16, n_layers=1, n_heads=2,
                                vocab_size=11, context=6)).eval()
    return LastPosition(EmbeddingSpaceGPT(g)).eval()


def _make(name: str) -> tuple[nn.Module, Tensor, tuple | object]:
    torch.manual_seed(MODELS.index(name) if name in MODELS else 0)
    if name.startswith("vit"):
        family = name.split("-")[1]
        kw = dict(n_heads=1, head_hidden=8) if family == "certified" else {}
        return _vit(family, **kw), torch.rand(3, 1, 8, 8), (0.0, 1.0)
    if name.startswith("gpt"):
        m = _gpt(name.split("-")[1])
        gpt = m.model.gpt
        x = gpt.token_embeddings(torch.randint(0, 11, (3, 6))).detach()
        return m, x, embedding_domain(m)
    if name.startswith("encoder"):
        enc = EncoderClassifier(name.endswith("pre")).eval()
        return enc, torch.rand(3, 4, 8) * 2 - 1, (-1.0, 1.0)
    if name == "mlp":
        m = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12),
                          nn.GELU(), nn.Linear(12, 4))
        return m.eval(), torch.rand(3, 4, 4), (0.0, 1.0)
    m = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                      nn.MaxPool2d(2), nn.Conv2d(3, 4, 3), nn.AvgPool2d(2), nn.Flatten(),
                      nn.Linear(4, 3))
    bn = m[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return m.eval(), torch.rand(3, 1, 10, 10), (0.0, 1.0)


MODELS = ["vit-lipschitz", "vit-standard", "vit-certified", "gpt-lipschitz", "gpt-standard",
          "encoder-pre", "encoder-post", "mlp", "cnn"]


def _jacobian_norms(model: nn.Module, x: Tensor) -> Tensor:
    """Exact spectral norms of the logits' Jacobian at each row of x (float64 copy)."""
    m64 = copy.deepcopy(model).double()
    out = []
    for xi in x.to(F64):
        J = torch.autograd.functional.jacobian(lambda z: m64(z.unsqueeze(0)).squeeze(0), xi)
        out.append(torch.linalg.matrix_norm(J.reshape(J.shape[0], -1), ord=2))
    return torch.stack(out)


def _domain_points(name: str, x: Tensor, domain, k: int, g: torch.Generator) -> Tensor:
    if name.startswith("gpt"):
        v = torch.randn((k, *x.shape[1:]), generator=g)
        v = v / v.norm(dim=-1, keepdim=True) * torch.rand((k, x.shape[1], 1), generator=g)
        return v * domain.max_norm * 0.999
    lo, hi = domain
    return lo + (hi - lo) * torch.rand((k, *x.shape[1:]), generator=g)


def _ball_points(name: str, x: Tensor, r: float, domain, g: torch.Generator) -> Tensor:
    d = torch.randn(x.shape, generator=g)
    d = d / d.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.dim() - 1)))
    y = x + d * r * torch.rand((x.shape[0], *([1] * (x.dim() - 1))), generator=g)
    if name.startswith("gpt"):
        n = y.norm(dim=-1, keepdim=True)
        return y * torch.clamp(domain.max_norm * 0.999 / n, max=1.0)
    lo, hi = domain
    return y.clamp(lo, hi)


@pytest.mark.parametrize("name", MODELS)
def test_coverage_module_and_pt2(name: str) -> None:
    model, x, domain = _make(name)
    labels = model(x).argmax(1)
    # from the module
    glob = certify(model, x, labels, domain=domain, mode="global")
    loc = certify(model, x, labels, domain=domain, mode="local", bisection_steps=5)
    # from a .pt2 round trip
    buf = io.BytesIO()
    torch.export.save(as_program(model, x[:2]), buf)
    buf.seek(0)
    program = torch.export.load(buf)
    glob2 = certify(program, x, labels, domain=domain, mode="global")
    loc2 = certify(program, x, labels, domain=domain, mode="local", bisection_steps=5)
    assert glob2.lipschitz_upper == pytest.approx(glob.lipschitz_upper, rel=1e-12)
    for a, b in zip(loc.samples, loc2.samples, strict=True):
        assert a.radius_l2 == pytest.approx(b.radius_l2, rel=1e-9, abs=1e-12)
    assert math.isfinite(glob.lipschitz_upper) and glob.lipschitz_upper > 0
    assert glob.layers, "the per-layer table is empty"
    for s, sl in zip(glob.samples, loc.samples, strict=True):
        assert s.radius_l2 >= 0 and sl.radius_l2 >= s.radius_l2  # local ≥ global (max of both)
        if sl.pred == sl.label and sl.margin > 0:
            assert sl.radius_l2 > 0
    # soundness: exact Jacobians at random points of the domain ≤ the global bound
    g = torch.Generator().manual_seed(1)
    pts = torch.cat([x, _domain_points(name, x, domain, 3, g)])
    jn = _jacobian_norms(model, pts)
    assert bool((jn <= glob.lipschitz_upper).all()), (jn.max(), glob.lipschitz_upper)
    # and in local mode at points of the balls ≤ L(x, r)
    prop = Propagator(program)
    r = 0.05
    res = prop.run(domain, center=x, radius=r)
    lip_r = res.lip
    # the centre values follow the (rewritten) graph exactly
    assert torch.allclose(res.output.value, model(x).double(), rtol=1e-4, atol=1e-5)
    pts = _ball_points(name, x, r, domain, g)
    jn = _jacobian_norms(model, pts)
    assert bool((jn <= lip_r).all()), (jn, lip_r)


def test_layer_table_contents() -> None:
    model = _vit("lipschitz")
    cert = certify(model, torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    rows = {r.name: r for r in cert.layers}
    assert {"patch_embed", "blocks.0", "blocks.0.attn", "blocks.0.attn.q", "blocks.0.mlp",
            "blocks.1", "head"} <= set(rows)
    q = rows["blocks.0.attn.q"]
    assert q.kind_of_layer == "Linear" and q.kind == "upper"
    assert q.params == 16 * 16
    sigma = _sigma(model.blocks[0].attn.q.weight)
    assert sigma <= q.upper <= sigma * (1 + 1e-6)
    assert rows["blocks.0"].params == sum(p.numel() for p in model.blocks[0].parameters())
    assert rows["blocks.0.mlp"].upper == pytest.approx(
        GELU_MAX_SLOPE / GELU_SLOPE_PAPER
        * _sigma(model.blocks[0].mlp.up.weight)
        * _sigma(model.blocks[0].mlp.down.weight),
        rel=1e-6,
    )


def _sigma(w: Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach().double(), ord=2))


def hand_bound(model: nn.Module) -> float:
    """The Lipschitz ViT's bound written out by hand, with the proven multi-head form.

    Perturbations in the max-token norm (≤ whole-tensor L2); R = token norm bound:
    * patch embedding: max_i ‖W δ_i‖ ≤ σ(W_pe)‖δ‖; token ball: 1-Lipschitz, R = √d;
    * attention (one head, docs/attention.md): σ_V(1 + 2R²c·σ_Q σ_K) with c = softmax_scale/d_head;
      H heads concatenated: × √H; then σ_O and the 1/3 output scale;
      output tokens: σ_O·√H·σ_V·R/3 (each head's output is a convex combination of values);
    * MLP: σ_down·σ_up·g/1.1289 with g = 1.12890415 the exact largest slope of GELU;
      output tokens: σ_down·σ_up·R/1.1289 (|GELU(z)| ≤ |z|);
    * convex residual: (1 − α) + α·Lip(f), R ← (1 − α)R + α R_f;
    * mean over tokens (1-Lipschitz from the max-token norm to ℓ2), head σ_head, final_scale.
    """
    c = model.config
    lip = _sigma(model.patch_embed.weight)
    R = math.sqrt(c.d_model)
    for block in model.blocks:
        a, att = block.alpha, block.attn
        sq, sk, sv, so = (_sigma(m.weight) for m in (att.q, att.k, att.v, att.o))
        H = att.n_heads
        f = math.sqrt(H) * so * sv * (1 + 2 * R * R * att.score_scale * sq * sk) / 3
        lip *= (1 - a) + a * f
        R = (1 - a) * R + a * so * math.sqrt(H) * sv * R / 3
        s_up, s_down = _sigma(block.mlp.up.weight), _sigma(block.mlp.down.weight)
        lip *= (1 - a) + a * s_down * s_up * GELU_MAX_SLOPE / GELU_SLOPE_PAPER
        R = (1 - a) * R + a * s_down * s_up * R / GELU_SLOPE_PAPER
    return lip * _sigma(model.head.weight) * c.final_scale


@pytest.mark.parametrize("seed,kw", [(0, {}), (1, {"softmax_scale": 4.0, "final_scale": 2.0}),
                                     (2, {"n_heads": 4, "n_layers": 3})])
def test_hand_derived_bound_lipschitz_vit(seed: int, kw: dict) -> None:
    """The engine's bound is ≤ the hand-derived one, and its max-token path (the same
    reasoning: lip_tok into the mean pooling, times the head) is within 1% of it. The
    engine may be lower still: it also follows whole-tensor L2 bounds (mean pooling gives
    lip/√T) and interval bounds, and keeps the smallest."""
    torch.manual_seed(seed)
    model = _vit("lipschitz", patch_size=2, **kw)  # 16 tokens
    engine = Propagator.from_model(model, torch.rand(2, 1, 8, 8))
    res = engine.run((0.0, 1.0), sample_shape=(1, 8, 8))
    L = float(res.lip.max())
    hand = hand_bound(model)
    assert hand * (1 + 1e-6) >= L  # exact σ's rounded up by the certified norms only
    mean = next(n for n in res.graph.nodes if "mean" in str(n.target))
    token_path = float(res.env[mean.args[0].name].lip_tok.max())
    token_path *= _sigma(model.head.weight) * model.config.final_scale
    assert token_path * (1 + 1e-9) >= L
    assert abs(token_path - hand) <= 0.01 * hand, (token_path, hand)


def test_local_bound_shrinks_to_pointwise() -> None:
    """L(x, r) is monotone in r in practice and far below the global bound for small r."""
    torch.manual_seed(3)
    model = _vit("standard")
    x = torch.rand(2, 1, 8, 8)
    prop = Propagator.from_model(model, x)
    glob = float(prop.run((0.0, 1.0), sample_shape=(1, 8, 8)).lip.max())
    ls = [prop.run((0.0, 1.0), center=x, radius=r).lip for r in (0.0, 0.01, 0.1, 1.0)]
    for a, b in itertools.pairwise(ls):
        assert bool((a <= b * (1 + 1e-9)).all())
    assert float(ls[0].max()) < glob / 100


def test_select_is_pushed_before_rowwise_maps() -> None:
    """select(linear(x)·s)[:, -1] is bounded as linear(select(x))·s: same function, and the
    unused rows (a GPT's other positions) are never bounded."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 50)

        def forward(self, x: Tensor) -> Tensor:
            return (self.lin(torch.tanh(x)) * 3.0)[:, -1, :]

    torch.manual_seed(0)
    model = Head().eval()
    x = torch.rand(3, 5, 4)
    prop = Propagator.from_model(model, x)
    ops = [str(n.target) for n in prop.graph.nodes if n.op == "call_function"]
    assert ops.index("aten.select.int") < ops.index("aten.linear.default")
    res = prop.run((0.0, 1.0), center=x, radius=0.1)
    assert res.output.shape == (3, 50)
    assert torch.allclose(res.output.value, model(x).double(), rtol=1e-5, atol=1e-6)
    jn = _jacobian_norms(model, x)
    assert bool((jn <= res.lip).all())
    rows = {r.name: r for r in layer_table(prop, prop.run((0.0, 1.0), sample_shape=(5, 4)))}
    assert rows["lin"].upper == pytest.approx(_sigma(model.lin.weight), rel=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_layer_table_shortcut_equals_group_passes(name: str, monkeypatch) -> None:
    """The layer table reuses the model pass for a group whose outside inputs all have
    lip = lip_tok = 1; a full group pass must give the same numbers, bit for bit."""
    layers = importlib.import_module("lipcert.bounds.layers")
    model, x, domain = _make(name)
    prop = Propagator(as_program(model, x[:2]))
    glob = prop.run(domain, sample_shape=tuple(x.shape[1:]))
    fast = [(r.name, r.upper) for r in layer_table(prop, glob)]
    used = []
    real = layers._model_pass_is_group_pass
    monkeypatch.setattr(layers, "_model_pass_is_group_pass",
                        lambda *a: used.append(real(*a)) or False)
    slow = [(r.name, r.upper) for r in layer_table(prop, glob)]
    assert fast == slow
    # the shortcut applies where a group reads the model input directly (the ViTs embed
    # patches first, so no group of theirs qualifies)
    assert any(used) == (not name.startswith("vit"))

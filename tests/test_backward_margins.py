"""Margin-gradient certificates end to end (``lipcert.bounds.backward.margin_radii``).

Small ViTs of each family (briefly trained on MNIST) and an ``nn.TransformerEncoder``
classifier are certified; then PGD-L2 on the float64 model (100 steps, 4 restarts: one
untargeted, three towards the runner-up classes, margin loss, projected onto the ball
∩ [0, 1]) must not reach a negative margin within any certified radius, nor lower a margin
by more than the certificate's bound allows.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from lipcert.bounds import Propagator
from lipcert.bounds.backward import Box, MarginCertifier, jacobian, margin_radii, symbolic
from lipcert.bounds.backward.dependency import dependencies
from lipcert.bounds.backward.evaluation import SDPA, as_f64, attention_parts_exact, node_values
from lipcert.bounds.backward.forward import Intervals
from lipcert.bounds.backward.jacobian import ForwardJacobians
from lipcert.bounds.backward.margins import SPAN
from lipcert.bounds.backward.rules import attention, attention_rows
from lipcert.bounds.backward.search import grid_search
from lipcert.data import load_dataset
from lipcert.errors import LipcertError
from lipcert.models import ModelConfig, build_model, export_model
from lipcert.models.adapters import LastPosition, embedding_domain
from lipcert.models.gpt import EmbeddingSpaceGPT
from lipcert.presets import preset
from lipcert.train import train

F64 = torch.float64


@pytest.fixture(scope="module")
def mnist() -> tuple[Tensor, Tensor]:
    ds = load_dataset("mnist")
    return ds.x_test[:8], ds.y_test[:8]


def _trained(name: str) -> nn.Module:
    torch.manual_seed(0)
    return train(preset(name, steps=40, eval_every=40), progress=False).model.eval()


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.set_num_threads(1)
    return {family: _trained(f"vit-mnist-{family}-tiny")
            for family in ("standard", "lipschitz", "certified")}


def _margins(logits: Tensor, y: Tensor) -> Tensor:
    own = logits.gather(1, y[:, None]).squeeze(1)
    return own - logits.scatter(1, y[:, None], -math.inf).amax(1)


def _project(x: Tensor, c: Tensor, r: Tensor, box: tuple[float, float]) -> Tensor:
    d = x.clamp(*box) - c
    f = torch.clamp(r / d.flatten(1).norm(dim=1).clamp_min(1e-300), max=1.0)
    return (c + d * f.reshape(-1, *([1] * (x.dim() - 1)))).clamp(*box)


def pgd_min_margin(model: nn.Module, x: Tensor, y: Tensor, r: Tensor, steps: int = 100,
                   restarts: int = 4, box: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """The smallest margin z_y − max_{j≠y} z_j PGD-L2 finds in B(x, r) ∩ box (float64)."""
    model = copy.deepcopy(model).double()
    x = x.double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ranked = model(x).scatter(1, y[:, None], -math.inf).argsort(1, descending=True)
    best = torch.full((len(x),), math.inf, dtype=F64)
    shape = (-1, *([1] * (x.dim() - 1)))
    for k in range(restarts):
        d = torch.randn(x.shape, generator=g, dtype=F64)
        d = d / d.flatten(1).norm(dim=1).reshape(shape) * r.reshape(shape) * 0.5
        adv = _project(x + d, x, r, box)
        for _ in range(steps):
            adv.requires_grad_(True)
            z = model(adv)
            m = _margins(z, y) if k == 0 else (
                z.gather(1, y[:, None]) - z.gather(1, ranked[:, k - 1:k])).squeeze(1)
            best = torch.minimum(best, _margins(z.detach(), y))
            (grad,) = torch.autograd.grad(m.sum(), adv)
            step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-300).reshape(shape)
            adv = _project(adv.detach() - 0.1 * r.reshape(shape) * step, x, r, box)
        with torch.no_grad():
            best = torch.minimum(best, _margins(model(adv), y))
    return best


@pytest.mark.parametrize("family", ["standard", "lipschitz", "certified"])
def test_certified_radii_survive_pgd(models: dict[str, nn.Module],
                                     mnist: tuple[Tensor, Tensor], family: str) -> None:
    model = models[family]
    x, y = mnist
    res = margin_radii(export_model(model), x, y, steps=10)
    correct = res.pred == y
    assert bool((res.radius[~correct] == 0).all())
    assert int((res.radius > 0).sum()) >= int(correct.sum()) // 2, res.radius
    r = res.radius.clamp(max=10.0)
    worst = pgd_min_margin(model, x, y, r)
    held = worst[r > 0]
    assert bool((held > 0).all()), f"PGD crossed the boundary inside a certified radius: {held}"
    # the certificate's own claim: no margin falls by more than r·L
    drop = res.margin - worst
    assert bool((drop[r > 0] <= (r * res.lipschitz)[r > 0] * (1 + 1e-6) + 1e-9).all())


def test_zero_radius_bound_is_the_gradient_norm(models: dict[str, nn.Module],
                                                mnist: tuple[Tensor, Tensor]) -> None:
    """At r = 0, L_j is the (domain-aware) norm of the exact margin gradient at x."""
    model = models["standard"]
    x, y = mnist
    cert = MarginCertifier(export_model(model), domain=(float("-inf"), float("inf")))
    b = cert.bounds(x, y, torch.zeros(len(x), dtype=F64))
    m64 = copy.deepcopy(model).double()
    xg = x.double().requires_grad_(True)
    z = m64(xg)
    for j in range(z.shape[1]):
        (grad,) = torch.autograd.grad((z.gather(1, y[:, None]).squeeze(1) - z[:, j]).sum(), xg,
                                      retain_graph=True)
        norm = grad.flatten(1).norm(dim=1)
        expected = torch.where(y == j, torch.zeros_like(norm), norm)
        torch.testing.assert_close(b.lipschitz[:, j], expected, rtol=1e-6, atol=1e-9)


class _Encoder(nn.Module):
    """A pre-LN nn.TransformerEncoder classifier (its export folds the batch into the
    heads dimension, so several nodes are not batch-major)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(49, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        p = x.reshape(b, 1, 4, 7, 4, 7).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, 49)
        return self.head(self.enc(self.embed(p)).mean(1))


def _program(models: dict[str, nn.Module], name: str, x: Tensor, y: Tensor
             ) -> tuple[torch.export.ExportedProgram, Tensor]:
    """The exported program of a demo-family ViT with the labels ``y``, or for "encoder" a
    fresh (seed 0) :class:`_Encoder` exported with a dynamic batch and labelled by its own
    predictions on ``x``."""
    if name != "encoder":
        return export_model(models[name]), y
    torch.manual_seed(0)
    net = _Encoder().eval()
    program = torch.export.export(net, (x,), dynamic_shapes=(
        {0: torch.export.Dim("batch", min=1)},))
    with torch.no_grad():
        return program, net(x).argmax(1)


def test_transformer_encoder_classifier(mnist: tuple[Tensor, Tensor]) -> None:
    """nn.TransformerEncoder (pre-LN, batch first): its exported graph moves the batch into
    the heads dimension; certificates still hold against PGD."""
    torch.manual_seed(0)
    net = _Encoder().eval()
    x, _ = mnist
    with torch.no_grad():
        y = net(x).argmax(1)
    res = margin_radii(net, x, y, steps=8)
    assert bool((res.radius > 0).all())
    worst = pgd_min_margin(net, x, y, res.radius, steps=60, restarts=2)
    assert bool((worst > 0).all())


def test_gpt_in_embedding_space() -> None:
    """A text model certified in embedding space (the token-norm domain, relaxed to its
    bounding box): radii hold against PGD in the ball ∩ that box."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="gpt", family="standard", d_model=16, n_layers=1, n_heads=2,
                      vocab_size=12, context=6)
    gpt = build_model(cfg).eval()
    model = LastPosition(EmbeddingSpaceGPT(gpt)).eval()
    dom = embedding_domain(model)
    emb = gpt.token_embed(torch.randint(0, 12, (4, 6))).detach()
    with torch.no_grad():
        y = model(emb).argmax(1)
    res = margin_radii(model, emb, y, domain=dom, steps=6)
    assert bool((res.radius > 0).all())
    worst = pgd_min_margin(model, emb, y, res.radius, steps=60, restarts=2,
                           box=(-dom.max_norm, dom.max_norm))
    assert bool((worst > 0).all())


def test_fixed_batch_program_gives_the_same_radii() -> None:
    """A program exported with a fixed batch of 4 certifies 5 samples in padded batches
    with the same radii as a dynamic export (it cannot run on one sample, so its dependency
    analysis runs on a whole batch, ``dependency.py``; without it the first sample's radius
    here is 0.028 against 0.10); the radii are positive and PGD finds no adversarial
    example inside them."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(arch="vit", family="standard", d_model=16, n_layers=1,
                                  n_heads=2)).eval()
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        y = net(x).argmax(1)
    fixed = margin_radii(torch.export.export(net, (x[:4],)), x, y, steps=4)
    dynamic = margin_radii(export_model(net), x, y, steps=4)
    torch.testing.assert_close(fixed.radius, dynamic.radius)
    assert bool((fixed.radius > 0).all())
    assert bool((pgd_min_margin(net, x, y, fixed.radius, steps=60, restarts=2) > 0).all())


@pytest.mark.parametrize("family", ["standard", "lipschitz", "encoder"])
def test_dependencies_on_a_whole_batch_equal_those_on_one_sample(
        models: dict[str, nn.Module], mnist: tuple[Tensor, Tensor], family: str) -> None:
    """What a program exported with a fixed batch size gets: the dependency analysis on a
    whole batch of 4 (the first sample's units seeded) finds exactly the dependencies it
    finds on a batch of one sample (units: the image's 28 pixel rows), at every node of the
    ViTs; the encoder's graph moves the batch into the heads dimension, and at those nodes
    (dim 0 not the sample) the whole batch's analysis says "every unit" (None)."""
    x, y = mnist[0][:4], mnist[1][:4]
    program, _ = _program(models, family, x, y)
    iv = MarginCertifier(program).intervals
    iv.prepare(x)
    consts = as_f64(iv.consts)
    chain, source = list(iv.graph.nodes), iv.prop.input_name
    found = [dependencies(chain, node_values(iv.graph, consts, source, batch.double()),
                          source, 28, iv.batch_major) for batch in (x[:1], x)]
    assert found[0].keys() == found[1].keys() and len(found[0]) > 20
    unknown = []
    for name, one in found[0].items():
        whole = found[1][name]
        if isinstance(one, Tensor) and whole is None:
            unknown.append(name)
        elif isinstance(one, Tensor):
            assert isinstance(whole, Tensor) and torch.equal(one, whole), name
        else:
            assert type(one) is type(whole), name
    assert bool(unknown) == (family == "encoder"), unknown
    assert len(unknown) < len(found[0]) / 2


def test_misclassified_samples_get_zero(models: dict[str, nn.Module],
                                        mnist: tuple[Tensor, Tensor]) -> None:
    x, y = mnist
    wrong = (y + 1) % 10
    res = margin_radii(export_model(models["lipschitz"]), x, wrong, steps=4)
    assert bool((res.radius[res.pred != wrong] == 0).all())


def test_missing_rules_are_named_together() -> None:
    class Odd(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            h = torch.cumsum(x.flatten(1), dim=1)
            return torch.logsumexp(h.reshape(-1, 2, 392), dim=2)

    prog = torch.export.export(Odd(), (torch.rand(2, 1, 28, 28),))
    with pytest.raises(LipcertError, match=r"rule for \d+ operator\(s\): aten\.cumsum.*aten\.log"):
        MarginCertifier(Propagator(prog))


def test_bad_inputs_are_refused(models: dict[str, nn.Module],
                                mnist: tuple[Tensor, Tensor]) -> None:
    x, y = mnist
    cert = MarginCertifier(export_model(models["standard"]))
    with pytest.raises(LipcertError, match="different lengths"):
        cert.radii(x, y[:3])
    with pytest.raises(LipcertError, match="labels must lie"):
        cert.radii(x, y + 20)
    with pytest.raises(LipcertError, match="outside the input domain"):
        cert.radii(x + 2.0, y)


@pytest.mark.parametrize("family", ["standard", "lipschitz"])
def test_symbolic_remainders_hold_at_searched_points(models: dict[str, nn.Module],
                                                     mnist: tuple[Tensor, Tensor],
                                                     family: str) -> None:
    """Symbolic remainders (``symbolic.py``): at random points of the ball and at points
    that minimise each margin's Taylor remainder m_j(x′) − m_j(x) − ∇m_j(x)·δ by projected
    gradient steps, the remainder stays above the bound Σ_k g_k·R_k, and every node's value
    stays in its narrowed interval. The radius is where the bound is still finite but no
    longer small (a few times the certified radius)."""
    model = models[family]
    x32, y = mnist
    x = x32.double()
    cert = MarginCertifier(export_model(model))
    iv = cert.intervals
    radius = 3 * margin_radii(cert.prop, x32, y, steps=6).radius.clamp(min=1e-4)
    assert iv.prepare_symbolic(x32, y, cert.logits_name)
    env = iv(x32, radius)
    sym = iv.symbolic_for(x32, y)
    assert sym is not None and sym.before, "no interval was narrowed"
    terms = sym.margin_terms(env, len(x), 10)
    assert terms is not None and bool(torch.isfinite(terms).all())
    m64 = copy.deepcopy(model).double()
    own = torch.nn.functional.one_hot(y, 10).bool()

    xg = x.clone().requires_grad_(True)
    z0 = m64(xg)
    m0 = z0.gather(1, y[:, None]) - z0
    grads = torch.stack([torch.autograd.grad(m0[:, j].sum(), xg, retain_graph=True)[0]
                         for j in range(10)], 1)
    m0 = m0.detach()

    def remainder(adv: Tensor) -> Tensor:
        z = m64(adv)
        m = z.gather(1, y[:, None]) - z
        lin = (grads * (adv - x).unsqueeze(1)).flatten(2).sum(2)
        return m - m0 - lin

    g = torch.Generator().manual_seed(1)
    shape = (-1, 1, 1, 1)
    starts = [torch.randn(x.shape, generator=g, dtype=F64) for _ in range(4)]
    for j in range(10):
        for d in starts[:2]:
            adv = _project(x + d / d.flatten(1).norm(dim=1).reshape(shape) * radius.reshape(
                shape), x, radius, (0.0, 1.0))
            for _ in range(25):
                adv.requires_grad_(True)
                (step,) = torch.autograd.grad(remainder(adv)[:, j].sum(), adv)
                step = step / step.flatten(1).norm(dim=1).clamp_min(1e-300).reshape(shape)
                adv = _project(adv.detach() - 0.2 * radius.reshape(shape) * step, x, radius,
                               (0.0, 1.0))
            with torch.no_grad():
                rem = remainder(adv)
            ok = (rem >= terms - 1e-9 * (1 + rem.abs())) | own
            assert bool(ok.all()), f"margin {j}: remainder below its bound by " \
                f"{float((terms - rem)[~ok].max()):.3g}"
            if j == 0 and d is starts[0]:
                points = [adv, *(_project(x + s * radius.reshape(shape) / s.flatten(1).norm(
                    dim=1).reshape(shape), x, radius, (0.0, 1.0)) for s in starts)]
                for p in points:
                    _inside(env, iv, p.detach())
    # the narrowed intervals at their widest elements, pushed up and down: the last four
    # narrowed nodes and the attention probabilities (their scores and probabilities
    # are narrowed too)
    assert any(t.endswith(".probs") for t in sym.before)
    nodes = sorted((t for t in sym.before if t in env), key=list(env).index)[-4:]
    probs = [t for t in sym.before if t.endswith(".probs")]
    for name in nodes + probs:
        box = env[name] if name in env else _probs_box(env[name.removesuffix(".probs")])
        idx = (box.hi - box.lo).flatten(1).argmax(1, keepdim=True)
        for sign in (1.0, -1.0):
            adv = _project(x + starts[0] * 1e-3, x, radius, (0.0, 1.0))
            for _ in range(25):
                adv.requires_grad_(True)
                v = _values(iv, adv)[name].flatten(1).gather(1, idx)
                (step,) = torch.autograd.grad(sign * v.sum(), adv)
                step = step / step.flatten(1).norm(dim=1).clamp_min(1e-300).reshape(shape)
                adv = _project(adv.detach() + 0.2 * radius.reshape(shape) * step, x, radius,
                               (0.0, 1.0))
                _inside(env, iv, adv)


@pytest.mark.parametrize("family", ["standard", "lipschitz"])
def test_attention_remainders_hold_at_searched_points(models: dict[str, nn.Module],
                                                      mnist: tuple[Tensor, Tensor],
                                                      family: str) -> None:
    """The Taylor remainders of every attention node's output and probabilities,
    e(x′) = y(x′) − y(x) − J_y(x)·δ (narrowed by the symbolic remainders, scores and
    probabilities included), and the op's own remainder Y(Q′, K′, V′) − Y⁰ −
    J_Y·(ΔQ, ΔK, ΔV) (which the quadratic bound of the softmax's own term narrows), stay in
    their enclosures at random points of the ball and at points that push each sample's
    widest remainder element up and down by projected gradient steps; unlike an interval,
    a remainder has no first-order slack to hide a too-narrow enclosure in."""
    x32, y = mnist[0][:4], mnist[1][:4]
    x = x32.double()
    cert = MarginCertifier(export_model(models[family]))
    iv = cert.intervals
    radius = 3 * margin_radii(cert.prop, x32, y, steps=6).radius.clamp(min=1e-4)
    assert iv.prepare_symbolic(x32, y, cert.logits_name)
    env = iv(x32, radius)
    attention = [n for n, b in env.items() if isinstance(b, Box) and b.aux
                 and "pe_lo" in b.aux]
    assert attention, "no attention node with remainders"
    g = torch.Generator().manual_seed(2)
    nodes = {nd.name: nd for nd in iv.graph.nodes}
    for name in attention:
        box = env[name]
        for part, lo, hi in ((name, box.e_lo, box.e_hi),
                             (f"{name}.probs", box.aux["pe_lo"], box.aux["pe_hi"]),
                             (f"{name}.own", box.own_lo, box.own_hi)):

            def remainder(adv: Tensor, part: str = part, node: object = nodes[name]
                          ) -> Tensor:
                if part.endswith(".own"):
                    return _own_remainder(iv, node, x, adv)
                value, lin = torch.func.jvp(lambda z: _values(iv, z)[part], (x,), (adv - x,))
                return _values(iv, adv)[part] - value - lin

            _holds_where_pushed(remainder, lo, hi, x, radius, g, 1e-10,
                                f"{part}: remainder outside its enclosure")


@pytest.mark.parametrize("family", ["standard", "lipschitz"])
def test_softmax_quadratic_bound_holds_in_the_models(models: dict[str, nn.Module],
                                                     mnist: tuple[Tensor, Tensor],
                                                     family: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The quadratic bound of R·V₀ inside every attention node (R the softmax's own
    remainder at a reached point's scores, V₀ the centre's values), as the forward walk
    computes it from the score rows' Gram matrices and the radii, holds at random points
    of the ball and at points that push its widest entries up and down, at the certified
    radius and at 3× it; at the certified radius it is the quadratic form that decides,
    and a radius passed to it 0.5× too small fails here. So does the bound of R's row
    norms (``softmax_own_norm``), at points that push the norms of the rows with the
    largest bounds."""
    x32, y = mnist[0][:4], mnist[1][:4]
    x = x32.double()
    cert = MarginCertifier(export_model(models[family]))
    iv = cert.intervals
    certified = margin_radii(cert.prop, x32, y, steps=6).radius.clamp(min=1e-4)
    assert iv.prepare_symbolic(x32, y, cert.logits_name)
    bounds: dict[str, tuple[tuple[Tensor, Tensor], Tensor]] = {}
    original = attention._quadratic

    def record(ctx: object, name: str, parts: object, v0: Tensor) -> object:
        out = original(ctx, name, parts, v0)
        if out is not None:
            bounds[name] = out
        return out

    monkeypatch.setattr(attention, "_quadratic", record)
    nodes = {nd.name: nd for nd in iv.graph.nodes}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        at0 = _values(iv, x)
    for radius in (certified, 3 * certified):
        bounds.clear()
        iv(x32, radius)
        assert bounds, "no quadratic bound was used"
        for name, ((lo, hi), norms) in bounds.items():
            node = nodes[name]
            v0 = at0[node.args[2].name]
            s0, p0 = at0[f"{name}.scores"], at0[f"{name}.probs"]

            def r_at(adv: Tensor, node: torch.fx.Node = node, s0: Tensor = s0,
                     p0: Tensor = p0) -> Tensor:
                ds = _values(iv, adv)[f"{node.name}.scores"] - s0
                return _softmax_remainder_at(p0, s0, ds)

            def r_v(adv: Tensor, r_at: Callable[[Tensor], Tensor] = r_at,
                    v0: Tensor = v0) -> Tensor:
                return r_at(adv) @ v0

            def r_norm(adv: Tensor, r_at: Callable[[Tensor], Tensor] = r_at) -> Tensor:
                return r_at(adv).norm(dim=-1)

            _holds_where_pushed(r_v, lo, hi, x, radius, g, 1e-12,
                                f"{name}: R·V₀ outside its quadratic bound")
            _holds_where_pushed(r_norm, torch.zeros_like(norms), norms, x, radius, g, 1e-12,
                                f"{name}: ‖R_i‖ above softmax_own_norm")


def _holds_where_pushed(value: Callable[[Tensor], Tensor], lo: Tensor, hi: Tensor, x: Tensor,
                        radius: Tensor, g: torch.Generator, rel: float, what: str) -> None:
    """``value`` (of the input) stays in [lo, hi] (up to ``rel`` of itself) along 20
    projected gradient steps that push each sample's widest entry up, and 20 that push it
    down, each from a random point of the ball."""
    shape = (-1, 1, 1, 1)
    idx = (hi - lo).flatten(1).argmax(1, keepdim=True)
    for sign in (1.0, -1.0):
        d = torch.randn(x.shape, generator=g, dtype=F64)
        adv = _project(x + d / d.flatten(1).norm(dim=1).reshape(shape)
                       * radius.reshape(shape), x, radius, (0.0, 1.0))
        for _ in range(20):
            adv.requires_grad_(True)
            (step,) = torch.autograd.grad(sign * value(adv).flatten(1).gather(1, idx).sum(),
                                          adv)
            step = step / step.flatten(1).norm(dim=1).clamp_min(1e-300).reshape(shape)
            adv = _project(adv.detach() + 0.2 * radius.reshape(shape) * step, x, radius,
                           (0.0, 1.0))
            with torch.no_grad():
                v = value(adv)
            tol = rel * (1 + v.abs())
            assert bool(((v >= lo - tol) & (v <= hi + tol)).all()), what


def _softmax_remainder_at(p0: Tensor, s0: Tensor, ds: Tensor) -> Tensor:
    """softmax's own remainder p(s₀ + Δ) − p⁰ − J₀Δ over the last dimension."""
    return torch.softmax(s0 + ds, -1) - p0 - p0 * (ds - (p0 * ds).sum(-1, keepdim=True))


def _own_remainder(iv: object, node: torch.fx.Node, x: Tensor, adv: Tensor) -> Tensor:
    """An attention node's own remainder at ``adv``: Y as a function of its inputs (Q, K,
    V) minus its value and first-order part at the centre ``x``'s inputs."""
    at, at0 = _values(iv, adv), _values(iv, x)
    kwargs = torch.fx.node.map_arg(dict(node.kwargs), lambda a: at0[a.name])

    def attend(*qkv: Tensor) -> Tensor:
        rest = torch.fx.node.map_arg(node.args[len(qkv):], lambda a: at0[a.name])
        return attention_parts_exact(*qkv, *rest, **kwargs)[0]

    ins = [at[a.name] for a in node.args[:3]]
    ins0 = [at0[a.name] for a in node.args[:3]]
    value, lin = torch.func.jvp(attend, tuple(ins0), tuple(i - i0 for i, i0 in zip(
        ins, ins0, strict=True)))
    return attend(*ins) - value - lin


def _values(iv: object, x: Tensor) -> dict[str, Tensor]:
    """Every node's value at x (float64, differentiable), and every attention node's
    probabilities (``<node>.probs``)."""
    vals: dict[str, object] = {}
    for node in iv.graph.nodes:
        if node.op == "placeholder":
            vals[node.name] = x if node.name == iv.prop.input_name else iv.consts[node.name]
        elif node.op == "call_function":
            args = torch.fx.node.map_arg(node.args, lambda a: vals[a.name])
            kwargs = torch.fx.node.map_arg(dict(node.kwargs), lambda a: vals[a.name])
            if node.target is SDPA:  # written out: torch's kernel has no forward mode
                (vals[node.name], vals[f"{node.name}.scores"],
                 vals[f"{node.name}.probs"]) = attention_parts_exact(*args, **kwargs)
            else:
                vals[node.name] = node.target(*args, **kwargs)
    return vals


def _probs_box(box: Box) -> Box:
    """An attention node's enclosure of its probabilities (kept by its forward rule)."""
    return Box(box.aux["p0"], box.aux["p_lo"], box.aux["p_hi"])


def _inside(env: dict[str, object], iv: object, x: Tensor) -> None:
    with torch.no_grad():
        vals = _values(iv, x)
    for name, box in env.items():
        if isinstance(box, Box):
            parts = [(name, box)]
            if box.aux is not None and "p_lo" in box.aux:
                parts.append((f"{name}.probs", _probs_box(box)))
            for part, b in parts:
                v = vals[part]
                tol = 1e-10 * (1 + v.abs())
                assert bool(((v >= b.lo - tol) & (v <= b.hi + tol)).all()), \
                    f"{part} leaves its interval"
            # the row and matrix deviations from the centre
            dev = vals[name] - box.value
            slack = 1e-10 * (1 + float(box.value.abs().max()))
            if box.rdev is not None and dev.dim() >= 2:
                assert bool((dev.norm(dim=-1) <= box.rdev + slack).all()), f"{name}: rdev"
            if box.mdev is not None:
                assert bool((dev.norm(dim=(-2, -1)) <= box.mdev + slack).all()), \
                    f"{name}: mdev"


@pytest.mark.parametrize("model_name", ["standard", "encoder"])
def test_layer_norm_centre_dot_holds_and_is_tight(models: dict[str, nn.Module],
                                                  mnist: tuple[Tensor, Tensor],
                                                  model_name: str) -> None:
    """The range of ⟨w_g, Δx_g⟩ that the symbolic remainders give every LayerNorm input
    (``Box.dot``, w_g the group's centred centre values): at points that push it up and
    down by projected gradient steps, it stays inside, at three times the certified radius
    (where the remainders count); and at a tenth of it (where the first-order part
    dominates) the searched extremes reach 0.8 of the bound in the median and 0.5 at worst,
    so a bound twice too small fails."""
    x32, y = mnist
    x = x32.double()
    program, y = _program(models, model_name, x32, y)
    cert = MarginCertifier(program)
    iv = cert.intervals
    certified = margin_radii(cert.prop, x32, y, steps=6).radius.clamp(min=1e-4)
    assert iv.prepare_symbolic(x32, y, cert.logits_name)
    sym = iv.symbolic_for(x32, y)
    assert sym is not None and sym.dots, "no LayerNorm input got a centre-dot range"
    shape = (-1, 1, 1, 1)
    g = torch.Generator().manual_seed(2)
    start = torch.randn(x.shape, generator=g, dtype=F64)
    with torch.no_grad():
        centre = _values(iv, x)
    reached: list[Tensor] = []
    for scale in (3.0, 0.1):
        radius = scale * certified
        env = iv(x32, radius)
        for name in sym.dots:
            dot = env[name].dot
            assert dot is not None, f"{name}: no range attached"
            d = dot.w.shape[-1]
            w = dot.w.reshape(len(x), -1, d)
            lo, hi = dot.lo.reshape(len(x), -1), dot.hi.reshape(len(x), -1)
            for group in sorted({0, w.shape[1] - 1, int((hi - lo).sum(0).argmax())}):
                for sign, bound in ((1.0, hi[:, group]), (-1.0, -lo[:, group])):
                    adv = _project(x + start * 1e-3, x, radius, (0.0, 1.0))
                    for _ in range(25):
                        adv.requires_grad_(True)
                        moved = _values(iv, adv)[name] - centre[name]
                        value = sign * (moved.reshape(len(x), -1, d)[:, group]
                                        * w[:, group]).sum(-1)
                        tol = 1e-9 * (1 + bound.abs())
                        assert bool((value.detach() <= bound + tol).all()), \
                            f"{name} group {group}: ⟨w, Δx⟩ beyond its range"
                        (step,) = torch.autograd.grad(value.sum(), adv)
                        step = step / step.flatten(1).norm(dim=1).clamp_min(1e-300).reshape(
                            shape)
                        adv = _project(adv.detach() + 0.2 * radius.reshape(shape) * step, x,
                                       radius, (0.0, 1.0))
                    if scale < 1:
                        reached.append(value.detach() / bound)
    ratios = torch.cat(reached)
    assert float(ratios.median()) >= 0.8 and float(ratios.min()) >= 0.5, ratios


def test_layer_norm_dot_gains_match_perturbations(models: dict[str, nn.Module],
                                                  mnist: tuple[Tensor, Tensor]) -> None:
    """The weights of the centre-dot ranges are M_{x←k}ᵀw: adding ε·t to the output of
    source k (everything after it recomputed) moves ⟨w_g, x_g⟩ by ε·⟨w_k, t⟩ to first
    order, for every LayerNorm input x, source k and group g."""
    x32, y = mnist
    cert = MarginCertifier(export_model(models["standard"]))
    iv = cert.intervals
    assert iv.prepare_symbolic(x32, y, cert.logits_name)
    sym = iv.symbolic_for(x32, y)
    assert sym is not None and any(wts.gains for wts in sym.dots.values())
    g = torch.Generator().manual_seed(3)
    eps = 1e-6

    def moved(at: str, push: Tensor | None, name: str, w: Tensor) -> Tensor:
        vals: dict[str, object] = {}
        for node in iv.graph.nodes:
            if node.op == "placeholder":
                vals[node.name] = (x32.double() if node.name == iv.prop.input_name
                                   else iv.consts[node.name])
            elif node.op == "call_function":
                args = torch.fx.node.map_arg(node.args, lambda a: vals[a.name])
                kwargs = torch.fx.node.map_arg(dict(node.kwargs), lambda a: vals[a.name])
                vals[node.name] = (attention_parts_exact(*args, **kwargs)[0]
                                   if node.target is SDPA else node.target(*args, **kwargs))
                if node.name == at and push is not None:
                    vals[node.name] = vals[node.name] + push
        return (vals[name].reshape(w.shape) * w).sum(-1).T  # (G, n)

    checked = 0
    for name, wts in sym.dots.items():
        for k, gain in wts.gains.items():
            t = torch.randn(gain.shape[1:], generator=g, dtype=F64)
            with torch.no_grad():
                change = (moved(k, eps * t, name, wts.w) - moved(k, None, name, wts.w)) / eps
            expected = (gain * t).flatten(2).sum(2)
            scale = (gain.abs() * t.abs()).flatten(2).sum(2)
            assert bool(((change - expected).abs() <= 1e-4 * scale + 1e-9).all()), \
                f"{name} ← {k}: gains differ from the perturbation"
            checked += 1
    assert checked >= 2


def test_weighted_sums_reach_their_corners() -> None:
    """``symbolic._weighted``: Σ g·R over R ∈ [lo, hi] lies in the bounds, and the corners
    R = lo or hi chosen by the sign of g reach them to 1e-8 (the float padding of g is
    1e-9 of each entry and 1e-12 of the largest)."""
    g = torch.Generator().manual_seed(4)
    for _ in range(200):
        w = torch.randn(3, 2, 5, 7, generator=g, dtype=F64)
        lo = torch.randn(2, 5, 7, generator=g, dtype=F64)
        hi = lo + torch.rand(2, 5, 7, generator=g, dtype=F64)
        low, high = symbolic._weighted(w, lo, hi)
        top = (w * torch.where(w > 0, hi, lo)).flatten(2).sum(2)
        bottom = (w * torch.where(w > 0, lo, hi)).flatten(2).sum(2)
        size = (w.abs() * torch.maximum(lo.abs(), hi.abs())).flatten(2).sum(2)
        assert bool((low <= bottom).all() and (high >= top).all())
        assert bool(((bottom - low) <= 1e-8 * size).all())
        assert bool(((high - top) <= 1e-8 * size).all())


def test_symbolic_remainders_widen_the_radii(models: dict[str, nn.Module],
                                             mnist: tuple[Tensor, Tensor]) -> None:
    """On the standard ViT the symbolic remainders certify larger radii than the wrapped
    Taylor models alone (and never smaller ones)."""
    x, y = mnist
    program = export_model(models["standard"])
    plain = margin_radii(program, x, y, steps=8, symbolic=False)
    sym = margin_radii(program, x, y, steps=8)
    assert bool((sym.radius >= plain.radius * (1 - 1e-3)).all())
    certified = plain.radius > 0
    assert float(sym.radius[certified].median()) > 2 * float(plain.radius[certified].median())


def test_a_lone_sample_gets_its_batched_radius(models: dict[str, nn.Module],
                                               mnist: tuple[Tensor, Tensor]) -> None:
    """Certified one at a time (a single sample, the last batch of one, or a program exported
    for batch 1), each sample gets the radius it gets in a batch: with the symbolic
    remainders, which need every element's sample, though the bound engine tracks no
    sample ids for one sample."""
    x, y = mnist[0][:3], mnist[1][:3]
    program = export_model(models["standard"])
    batched = margin_radii(program, x, y, steps=8)
    alone = margin_radii(program, x, y, steps=8, batch_size=1)
    fixed_one = margin_radii(torch.export.export(models["standard"], (x[:1],)), x, y, steps=8)
    wrapped = margin_radii(program, x, y, steps=8, batch_size=1, symbolic=False)
    torch.testing.assert_close(alone.radius, batched.radius, rtol=1e-9, atol=0.0)
    torch.testing.assert_close(fixed_one.radius, batched.radius, rtol=1e-9, atol=0.0)
    assert float(alone.radius.median()) > 2 * float(wrapped.radius.median())


# --------------------------------------------------------------------------- cost
# The forward-mode Jacobians (compressed passes, ``jacobian.py``) and the radius search
# (``search.py``) only change how fast the same numbers are found.


def _gains_both_ways(program: object, x: Tensor, y: Tensor) -> tuple[dict, dict, dict, dict]:
    """Centre input norms and symbolic-remainder gains from the compressed passes (as
    certification runs them) and from plain passes (one tangent per coordinate)."""
    cert = MarginCertifier(program)
    iv = cert.intervals
    assert iv.prepare_symbolic(x, y, cert.logits_name)
    sym = iv.symbolic_for(x, y)
    plain = ForwardJacobians(iv.graph, iv.consts, iv.prop.input_name, x)
    fast_gains = dict(sym.gains)
    plain_gains = {}
    for k in sym.sources:
        later = {t for (t, kk) in fast_gains if kk == k}
        if later:
            plain_gains.update({(t, k): g for t, g in plain.row_gains(k, later).items()})
    return iv._norms, plain.input_norms(), fast_gains, plain_gains


@pytest.mark.parametrize("family", ["standard", "lipschitz", "encoder"])
def test_compressed_jacobians_equal_plain_ones(models: dict[str, nn.Module],
                                               mnist: tuple[Tensor, Tensor],
                                               family: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Tangents shared by the units of one colour, split back at the mixing ops or
    narrowed at a cut, give the same centre Jacobian norms and gains as one tangent per
    coordinate (float64 rounding only), and the passes do share tangents."""
    x, y = mnist[0][:4], mnist[1][:4]
    program, y = _program(models, family, x, y)
    shared = []
    original = jacobian._Plan.__init__

    def record(plan: object, *args: object) -> None:
        original(plan, *args)
        shared.append(plan.colours < plan.units)

    monkeypatch.setattr(jacobian._Plan, "__init__", record)
    fast_norms, plain_norms, fast_gains, plain_gains = _gains_both_ways(program, x, y)
    monkeypatch.undo()
    assert any(shared), "no pass shared tangents"
    assert fast_norms.keys() == plain_norms.keys()
    for name, norm in plain_norms.items():
        torch.testing.assert_close(fast_norms[name], norm, rtol=1e-12, atol=1e-290)
    assert fast_gains and fast_gains.keys() == plain_gains.keys()
    for key, gain in plain_gains.items():
        torch.testing.assert_close(fast_gains[key], gain, rtol=1e-12, atol=1e-290)


def _evaluate_from(graph: torch.fx.Graph, consts: dict, input_name: str, x: Tensor,
                   start: str, value: Tensor, name: str) -> Tensor:
    """Node ``name`` as a function of node ``start`` set to ``value`` (float64, every op as
    the graph calls it, attention through torch's reference math)."""
    vals: dict[str, object] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            vals[node.name] = x if node.name == input_name else consts[node.name].double()
        elif node.op == "call_function":
            if node.name == start:
                vals[node.name] = value
                continue
            args = torch.fx.node.map_arg(node.args, lambda a: vals[a.name])
            kwargs = torch.fx.node.map_arg(dict(node.kwargs), lambda a: vals[a.name])
            if node.target is SDPA:
                y, scores, probs = attention_parts_exact(*args, **kwargs)
                vals.update({node.name: y, f"{node.name}.scores": scores,
                             f"{node.name}.probs": probs})
            else:
                vals[node.name] = node.target(*args, **kwargs)
        if name in vals:
            return vals[name]
    raise AssertionError(name)


def test_jacobian_norms_match_autograd(models: dict[str, nn.Module],
                                       mnist: tuple[Tensor, Tensor]) -> None:
    """Centre input norms of every kind of node and every gain against full Jacobians by
    reverse-mode autograd (of each sample's own rows: samples never mix)."""
    x, y = mnist[0][:2], mnist[1][:2]
    n = len(x)
    cert = MarginCertifier(export_model(models["standard"]))
    iv = cert.intervals
    assert iv.prepare_symbolic(x, y, cert.logits_name)
    sym = iv.symbolic_for(x, y)
    graph, consts, inp = iv.graph, iv.consts, iv.prop.input_name
    x64 = x.double()
    vals = ForwardJacobians(graph, consts, inp, x).vals

    def own_rows(jac: Tensor, out_shape: torch.Size, width: int) -> Tensor:
        """(rows, n, *out[1:]): per sample, the norms of ∂out/∂(row of that sample)."""
        per = jac.reshape(n, out_shape[1:].numel(), n, -1, width)
        norms = torch.stack([per[s, :, s].norm(dim=-1) for s in range(n)])  # (n, O, rows)
        return norms.permute(2, 0, 1).reshape(-1, *out_shape)

    kinds = {}
    for node in graph.nodes:
        kinds.setdefault(getattr(node.target, "overloadpacket", node.target), node.name)
    names = [kinds[op] for op in (torch.ops.aten.layer_norm, torch.ops.aten.gelu,
                                  torch.ops.aten.scaled_dot_product_attention)]
    for name in [*names, cert.logits_name]:
        jac = torch.autograd.functional.jacobian(
            lambda z, name=name: _evaluate_from(graph, consts, inp, z, "", z, name), x64)
        _upper_and_close(iv._norms[name], own_rows(jac, vals[name].shape, x64[0].numel())[0])
    assert len(sym.gains) >= 5
    assert {t.rsplit(".", 1)[-1] for t, _ in sym.gains} >= {"scores", "probs"}
    for (t, k), gain in sym.gains.items():
        jac = torch.autograd.functional.jacobian(
            lambda v, t=t, k=k: _evaluate_from(graph, consts, inp, x64, k, v, t),
            vals[k].clone())
        _upper_and_close(gain, own_rows(jac, torch.Size((n, *gain.shape[2:])),
                                        vals[k].shape[-1]))


def _row_jacobians(iv: Intervals, name: str, width: int, x: Tensor) -> Tensor:
    """(n, rows, width, input): each sample's Jacobian of node ``name``'s rows of ``width``
    entries by reverse-mode autograd (float64)."""
    graph, consts, inp = iv.graph, iv.consts, iv.prop.input_name
    x64 = x.double()
    n = len(x)
    jac = torch.autograd.functional.jacobian(
        lambda z: _evaluate_from(graph, consts, inp, z, "", z, name), x64)
    per = jac.reshape(n, -1, width, n, x64[0].numel())
    return torch.stack([per[s, :, :, s] for s in range(n)])


def _assert_gram(gram: Tensor, rows: Tensor) -> None:
    exact = (rows @ rows.transpose(-1, -2)).reshape(gram.shape)
    torch.testing.assert_close(gram, exact, rtol=1e-10, atol=1e-12 * float(exact.abs().max()))


def test_score_grams_match_autograd(models: dict[str, nn.Module],
                                    mnist: tuple[Tensor, Tensor]) -> None:
    """The Gram matrices A_iA_iᵀ of every attention score row's Jacobian A_i = ∂s_i/∂x
    (recorded by the input pass for the softmax's quadratic bound) against full Jacobians
    by reverse-mode autograd, for both ViT families."""
    x = mnist[0][:2]
    for family in ("standard", "lipschitz"):
        cert = MarginCertifier(export_model(models[family]))
        iv = cert.intervals
        iv.prepare(x)
        grams = iv._grams
        assert len(grams) == sum(nd.target is SDPA for nd in iv.graph.nodes), family
        for name, gram in grams.items():
            _assert_gram(gram, _row_jacobians(iv, name, gram.shape[-1], x))


def _prepared(model: nn.Module, x: Tensor) -> tuple[Intervals, torch.fx.Node]:
    """The margin certifier's forward intervals of ``model``, prepared for the centres x,
    and its first attention node."""
    iv = MarginCertifier(export_model(model)).intervals
    iv.prepare(x)
    return iv, next(nd for nd in iv.graph.nodes if nd.target is SDPA)


def test_row_grams_match_autograd(models: dict[str, nn.Module],
                                  mnist: tuple[Tensor, Tensor]) -> None:
    """The Gram matrices A_rowA_rowᵀ of the rows' Jacobians that the input pass records at
    the nodes its compressed stack reads (before the first token mixing) and after the
    mixing (the first attention's output among them) against full Jacobians by
    reverse-mode autograd, and the row norms the forward walk takes from them
    at least the exact ‖A_row‖₂ and within 1e-8 of it; the matrix norms (``Box.mdev``'s
    first-order part) at least the norm of each block's whole Jacobian, and equal to it at
    the first attention's inputs (each key depends on its own patch); both ViT families."""
    x = mnist[0][:2]
    for family in ("standard", "lipschitz"):
        iv, first = _prepared(models[family], x)
        assert iv.jacobians is not None
        grams = iv.jacobians.row_grams
        assert {"linear_1", "linear_2", "linear_3"} <= set(grams), (family, sorted(grams))
        attention_inputs = {a.name for a in first.all_input_nodes}
        assert attention_inputs <= set(iv._block_norms), (family, sorted(iv._block_norms))
        # after the first token mixing too, where the pass has one tangent per coordinate
        assert first.name in grams, (family, sorted(grams))
        for name, gram in grams.items():
            rows = _row_jacobians(iv, name, gram.shape[-1], x)
            _assert_gram(gram, rows)
            norms = iv._row_norms[name]
            op = torch.linalg.matrix_norm(rows, ord=2).reshape(norms.shape)
            assert bool((norms >= op).all()), name
            assert bool((norms <= op * (1 + 1e-8) + 1e-8 * float(op.max())).all()), name
            blocks = iv._block_norms.get(name)
            if blocks is None:
                continue
            # ‖ΔX‖_F over the last two dimensions ≤ r·blocks: blocks ≥ the whole block's
            # Jacobian norm, and equal to it where the rows depend on disjoint patches
            per_block = rows.reshape(*blocks.shape, -1, x[0].numel())
            whole = torch.linalg.matrix_norm(per_block, ord=2)
            assert bool((blocks >= whole * (1 - 1e-12)).all()), name
            if name in attention_inputs:
                assert bool((blocks <= whole * (1 + 1e-8)).all()), name


def test_first_attention_reads_match_the_jacobians(models: dict[str, nn.Module],
                                                  mnist: tuple[Tensor, Tensor]) -> None:
    """The input units that the forward walk says the first attention's query, key and
    value rows read (``FwdCtx.units``, from the dependency analysis) against the rows'
    Jacobians by reverse-mode autograd: the overlaps of the queries' units with the keys'
    and the values' (``key_overlap``: which rows meet or leave each query's units, and the
    most rows per unit) equal those of the exact nonzero columns on both ViTs, where each
    row reads its own patch (near: the identity; one row per unit outside), and the
    attention rule takes them up (``Reads``, with the rows' Gram matrices)."""
    x = mnist[0][:2]
    for family in ("standard", "lipschitz"):
        iv, first = _prepared(models[family], x)
        assert iv.jacobians is not None
        names = [a.name for a in first.args[:3]]
        exact = []
        for name in names:
            units = iv._units[name]
            assert units.shape[0] == x[0].numel(), (family, name)
            rows = _row_jacobians(iv, name, iv.jacobians.row_grams[name].shape[-1], x)
            reads = (rows != 0).any(-2).any(0)  # (rows, input)
            exact.append(reads.T.reshape(units.shape))
        for other in (1, 2):
            got = attention_rows.key_overlap(iv._units[names[0]], iv._units[names[other]])
            want = attention_rows.key_overlap(exact[0], exact[other])
            for field in ("near", "outside", "most"):
                assert torch.equal(getattr(got, field), getattr(want, field)), (family, field)
            heads, queries, keys = got.near.shape
            assert torch.equal(got.near, torch.eye(queries, keys, dtype=torch.bool).expand(
                heads, -1, -1)), family
            assert bool((got.most == 1).all()), family
        iv(x, torch.full((2,), 1e-3, dtype=torch.float64))
        assert f"{first.name}.reads" in iv._memo, family


def _upper_and_close(value: Tensor, exact: Tensor) -> None:
    """``value`` is the float64 ``exact`` raised by its padding (1e-9 relative, 1e-12 of
    the largest entry): never below it, and above it by no more."""
    top = float(exact.max())
    assert bool((value >= exact * (1 - 1e-12)).all())
    assert bool((value <= exact * (1 + 2e-9) + 2e-12 * top + 1e-290).all())


def _bisection(passes: Callable[[Tensor], Tensor], r_max: Tensor, steps: int) -> Tensor:
    """The geometric bisection of earlier versions, as reference."""
    lo, hi = r_max * SPAN, r_max.clone()
    best = torch.zeros_like(r_max)
    for _ in range(steps):
        mid = (lo * hi).sqrt()
        ok = passes(mid)
        best = torch.where(ok, mid, best)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return best


@pytest.mark.parametrize("curve", ["power", "wall", "noise", "unknown"])
def test_radius_search_finds_the_bisection_radius(curve: str) -> None:
    """On tests with a threshold, the search returns the radius the bisection returns
    (the largest passing grid radius), whatever the steering value does, within its step
    cap; with an informative value it needs far fewer evaluations."""
    g = torch.Generator().manual_seed(0)
    n, steps = 64, 12
    r_max = torch.rand(n, generator=g, dtype=F64) * 10 + 0.1
    threshold = r_max * 10 ** (-9 * torch.rand(n, generator=g, dtype=F64))
    threshold[:4] = r_max[:4] * 2  # every radius passes
    threshold[4:8] = r_max[4:8] * 1e-10  # none does
    active = torch.ones(n, dtype=torch.bool)
    active[8:10] = False

    def evaluate(radius: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = torch.log(radius / threshold)
        v = {"power": 2 * x, "wall": (15 * x).clamp(max=3.0) + 0.1 * x,
             "noise": torch.sign(x) * torch.rand(n, generator=g, dtype=F64) * 5,
             "unknown": torch.full((n,), math.nan, dtype=F64)}[curve]
        return radius < threshold, v, radius * 2

    best, kept, evaluations = grid_search(evaluate, r_max, active, steps, SPAN,
                                          torch.full((n,), -1.0, dtype=F64))
    expected = torch.where(active, _bisection(lambda r: r < threshold, r_max, steps), 0.0)
    torch.testing.assert_close(best, expected, rtol=1e-12, atol=0.0)
    assert bool((kept == torch.where(best > 0, 2 * best, -1.0)).all())
    assert bool((best < threshold).all())
    assert evaluations <= 2 * steps + 2
    if curve == "power":
        assert evaluations <= 8, evaluations


def test_search_returns_radii_where_the_test_passed(models: dict[str, nn.Module],
                                                   mnist: tuple[Tensor, Tensor]) -> None:
    """On a trained ViT: every returned radius was evaluated and passed the full test for
    its sample, and the radii are the bisection's (to its grid step) with fewer
    evaluations."""
    x, y = mnist
    cert = MarginCertifier(export_model(models["standard"]))
    seen: list[tuple[Tensor, Tensor]] = []
    bounds = cert.bounds

    def recorded(inputs: Tensor, labels: Tensor, radius: Tensor, first_order: Tensor | None = None
                 ) -> object:
        b = bounds(inputs, labels, radius, first_order)
        if first_order is not None:
            seen.append((radius.clone(), b.certified(radius)))
            recorded.first = first_order
        return b

    cert.bounds = recorded  # type: ignore[method-assign]
    res = cert.radii(x, y, steps=12)
    certified = res.radius > 0
    assert int(certified.sum()) >= 4
    for s in torch.nonzero(certified).flatten().tolist():
        assert any(float(r[s]) == float(res.radius[s]) and bool(ok[s]) for r, ok in seen)
    cert.bounds = bounds  # type: ignore[method-assign]
    first = recorded.first
    b0 = cert.bounds(x, y, torch.zeros(len(x), dtype=F64))
    r_max = torch.where(first > 0, b0.margin / first, math.inf).amin(1)
    old = _bisection(lambda r: cert.bounds(x, y, r, first).certified(r), r_max, 12)
    old = torch.where((res.pred == y) & (b0.margin > 0).all(1), old, 0.0)
    step = math.exp(math.log(1 / SPAN) / 2**12)
    assert bool((res.radius >= old / step * (1 - 1e-12)).all()), (res.radius, old)
    assert res.evaluations < 13

"""The certified family (lipcert.models.certified), GroupSort2, and the margin losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lipcert.certificate import certify
from lipcert.errors import LipcertError
from lipcert.losses import hkr_loss, lmt_cross_entropy, training_loss
from lipcert.lower import empirical_lipschitz
from lipcert.models import build_model, constrained_matrices, export_model
from lipcert.models.certified import sigma_upper
from lipcert.models.config import ModelConfig
from lipcert.models.ops import group_sort2
from lipcert.presets import preset
from lipcert.train import train


def _config(**kw) -> ModelConfig:
    base = dict(arch="vit", family="certified", d_model=16, n_layers=2, n_heads=1,
                mlp_ratio=2, patch_size=7, logit_bound=0.5, attn_alpha=0.3, mlp_alpha=0.7)
    return ModelConfig(**{**base, **kw})


def _random_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-orthogonal weights of varied norms, so that every factor of the bound matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def test_group_sort2_sorts_adjacent_pairs_and_is_non_expansive() -> None:
    x = torch.tensor([[3.0, -1.0, 0.5, 2.0]])
    assert torch.equal(group_sort2(x), torch.tensor([[-1.0, 3.0, 0.5, 2.0]]))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 8, generator=g), torch.randn(500, 8, generator=g)
    ratio = (group_sort2(a) - group_sort2(b)).norm(dim=1) / (a - b).norm(dim=1)
    assert ratio.max() <= 1 + 1e-6
    assert torch.allclose(group_sort2(a).norm(dim=1), a.norm(dim=1))
    with pytest.raises(LipcertError, match="even"):
        group_sort2(torch.zeros(2, 3))


@pytest.mark.parametrize(("pooling", "head_hidden"), [("flatten", 0), ("mean", 0),
                                                      ("flatten", 32)])
def test_engine_bound_matches_the_composed_bound(pooling: str, head_hidden: int) -> None:
    """The engine, reading only the exported graph, never exceeds the hand-composed bound of
    the module docstring; at the design point (orthogonal weights, σ = 1) it reaches it
    within 1%. With large random weights its interval bounds make it tighter."""
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(8, dtype=torch.long)
    designed = build_model(_config(pooling=pooling, head_hidden=head_hidden)).eval()
    formula = designed.lipschitz_bound().item()
    for subject in (designed, export_model(designed)):
        upper = certify(subject, images, labels).lipschitz_upper
        assert formula * 0.99 <= upper <= formula * (1 + 1e-6)
    loose = _random_weights(build_model(_config(pooling=pooling, head_hidden=head_hidden)), 1)
    formula = loose.lipschitz_bound().item()
    assert certify(loose, images, labels).lipschitz_upper <= formula * (1 + 1e-6)


def test_composed_bound_holds_against_measured_jacobians() -> None:
    """Jacobian norms found by power iteration and gradient ascent, and secant ratios, never
    exceed the engine's bound (κ < √N is active here: the engine stays below the composed
    bound, which already uses e^b), which never exceeds the composed one."""
    model = _random_weights(build_model(_config()), seed=3)
    images = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    engine = certify(model, images, torch.zeros(16, dtype=torch.long)).lipschitz_upper
    bound = model.lipschitz_bound().item()
    assert engine <= bound * (1 + 1e-6)
    lower = empirical_lipschitz(model, images, iters=20, ascent_steps=30)
    assert 0 < lower.value <= engine
    g = torch.Generator().manual_seed(5)
    x = torch.rand(256, 1, 28, 28, generator=g)
    y = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    with torch.no_grad():
        ratio = (model(x) - model(y)).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert ratio.max().item() <= engine


def test_composed_bound_is_differentiable() -> None:
    model = build_model(_config())
    model.lipschitz_bound().backward()
    assert model.head.layers[0].weight.grad is not None
    assert model.head.layers[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("pooling", "head_hidden"), [("flatten", 32), ("mean", 0)])
def test_reported_bound_composes_verified_sigmas(pooling: str, head_hidden: int) -> None:
    """With ``sigma_upper`` every factor is a verified upper value (float64, no gradient): the
    result is never below the formula evaluated with float64 SVD norms, and within 1e-6 of
    it (each σ is within about 5e-9, and the attention factor e^b amplifies that by b); the
    differentiable (float32) composition used in training agrees to float32 rounding, on
    either side."""
    model = _random_weights(build_model(_config(pooling=pooling, head_hidden=head_hidden)), 6)
    reported = model.lipschitz_bound(sigma_upper)
    assert reported.dtype == torch.float64 and not reported.requires_grad
    svd = model.lipschitz_bound(lambda w: torch.linalg.svdvals(w.detach().double())[0]).item()
    assert svd <= reported.item() <= svd * (1 + 1e-6)
    assert model.lipschitz_bound().item() == pytest.approx(svd, rel=1e-5)


def test_certified_config_is_validated() -> None:
    with pytest.raises(LipcertError, match="one attention head"):
        _config(n_heads=2)
    with pytest.raises(LipcertError, match="ViT"):
        ModelConfig(arch="gpt", family="certified", vocab_size=10, n_heads=1)
    with pytest.raises(LipcertError, match="pooling"):
        _config(pooling="max")


def test_lmt_shifts_every_non_target_logit() -> None:
    logits = torch.tensor([[2.0, 1.0, -1.0]])
    labels = torch.tensor([0])
    shift = math.sqrt(2) * 0.5 * 2.0
    expected = F.cross_entropy(3.0 * torch.tensor([[2.0, 1.0 + shift, -1.0 + shift]]), labels)
    assert torch.isclose(lmt_cross_entropy(logits, labels, 2.0, 0.5, 3.0), expected)
    same = training_loss("ce", logits, labels, lipschitz=2.0, eps=0.0, temperature=3.0,
                         alpha=0.98, min_margin=1.0)
    assert torch.isclose(same, lmt_cross_entropy(logits, labels, 2.0, 0.0, 3.0))


def test_hkr_loss_by_hand() -> None:
    logits = torch.tensor([[0.2, 0.4, -1.0]])
    labels = torch.tensor([0])
    # hinge (m/2 = 0.5): target relu(0.5 − 0.2)·2 = 0.6; others relu(0.5 + 0.4) = 0.9 and
    # relu(0.5 − 1.0) = 0; mean 0.5. KR: 0.2 − (0.4 − 1.0)/2 = 0.5.
    expected = 0.9 * 0.5 - 0.1 * 0.5
    assert math.isclose(hkr_loss(logits, labels, alpha=0.9, min_margin=1.0).item(), expected,
                        rel_tol=1e-6)
    with pytest.raises(LipcertError, match="unknown loss"):
        training_loss("nope", logits, labels, lipschitz=1.0, eps=0.0, temperature=1.0,
                      alpha=0.9, min_margin=1.0)


def test_tiny_certified_training_keeps_every_weight_within_one() -> None:
    result = train(preset("vit-mnist-certified-tiny"), progress=False)
    assert result.status == "finished"
    assert result.metrics["val_acc"] > 0.5
    for name, weight in constrained_matrices(result.model):
        sigma = torch.linalg.matrix_norm(weight.detach().double(), ord=2).item()
        assert sigma <= 1 + 1e-6, name
    bound = result.metrics["lipschitz_certified_formula"]
    assert bound <= 1 + 1e-5
    data = torch.rand(4, 1, 28, 28)
    upper = certify(result.model, data, torch.zeros(4, dtype=torch.long)).lipschitz_upper
    assert upper <= bound * (1 + 1e-6)


def test_lmt_needs_the_certified_family() -> None:
    config = preset("vit-mnist-standard-tiny", loss="lmt", margin_eps=0.5, steps=2)
    with pytest.raises(LipcertError, match="lmt needs the certified family"):
        train(config, progress=False)


def test_max_time_ends_training_early() -> None:
    result = train(preset("vit-mnist-certified-tiny", steps=100000, max_time_s=1.0),
                   progress=False)
    assert result.status == "finished"
    assert result.metrics["steps"] < 100000

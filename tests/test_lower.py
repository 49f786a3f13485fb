"""``lipcert.lower``: Jacobian norms by power iteration, and the empirical lower bound."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from lipcert.errors import LipcertError
from lipcert.lower import LowerBound, empirical_lipschitz, jacobian_norm, tightness_ratio
from lipcert.models import EmbeddingSpaceGPT, ModelConfig, build_model


def exact_jacobian_norm(f, point: torch.Tensor) -> float:
    """σ_max of the full Jacobian of one sample, from autograd and an SVD (float64)."""
    jac = torch.autograd.functional.jacobian(lambda z: f(z[None])[0], point)
    out = f(point[None])[0]
    return torch.linalg.svdvals(jac.reshape(out.numel(), point.numel()))[0].item()


def linear_map(sigmas: list[float], n_in: int, seed: int = 0) -> torch.Tensor:
    """A (len(sigmas), n_in) matrix with the given singular values."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(len(sigmas), len(sigmas), generator=gen,
                                       dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n_in, len(sigmas), generator=gen, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(sigmas, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("kind", ["designed", "gaussian"])
def test_linear_map_gives_sigma_max(kind: str) -> None:
    if kind == "designed":
        W = linear_map([3.0, 2.0, 1.0, 0.5, 0.1], 12)
    else:
        W = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigma = torch.linalg.svdvals(W)[0].item()

    def f(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ W.T

    x = torch.rand(4, 3, 4, dtype=torch.float64)
    norms = jacobian_norm(f, x)
    assert norms.shape == (4,) and norms.dtype == torch.float64
    assert torch.all(norms <= sigma * (1 + 1e-12))
    torch.testing.assert_close(norms, torch.full((4,), sigma, dtype=torch.float64), rtol=1e-4,
                               atol=0)
    bound = empirical_lipschitz(f, x, ascent_steps=5)
    assert bound.kind == "lower" and bound.value <= sigma * (1 + 1e-12)
    assert bound.value == pytest.approx(sigma, rel=1e-4)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 4)).double().eval()


def _vit(family: str) -> nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(arch="vit", family=family, d_model=16, n_layers=1, n_heads=2,
                         image_size=8, patch_size=4, softmax_scale=4.0)
    return build_model(config).double().eval()


def _gpt() -> nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(arch="gpt", family="lipschitz", d_model=16, n_layers=1, n_heads=2,
                         vocab_size=7, context=6, softmax_scale=4.0)
    return EmbeddingSpaceGPT(build_model(config)).double().eval()


MODELS = {
    "mlp": (_mlp, (12,), (0.0, 1.0)),
    "vit-lipschitz": (lambda: _vit("lipschitz"), (1, 8, 8), (0.0, 1.0)),  # token_ball op
    "vit-standard": (lambda: _vit("standard"), (1, 8, 8), (0.0, 1.0)),  # LayerNorm, SDPA
    "gpt-embeddings": (_gpt, (6, 16), None),  # causal attention, (B, T, vocab) logits
}


@pytest.mark.parametrize("name", list(MODELS))
def test_lower_bound_is_a_real_witness(name: str) -> None:
    make, shape, domain = MODELS[name]
    f = make()
    x = torch.rand(6, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bound = empirical_lipschitz(f, x, ascent_steps=15, top_k=3, domain=domain)
    assert isinstance(bound, LowerBound) and bound.kind == "lower"
    assert 0 <= bound.at_index < len(x) and bound.point.shape == shape
    exact = exact_jacobian_norm(f, bound.point)
    assert bound.value <= exact * (1 + 1e-9)  # a witness: measured at the reported point
    assert bound.value >= exact * (1 - 1e-2)  # and power iteration nearly converged there
    assert bound.value >= bound.initial  # gradient ascent never loses ground
    if domain is not None:
        assert domain[0] <= bound.point.min() and bound.point.max() <= domain[1]
    best_sample = max(exact_jacobian_norm(f, xi) for xi in x)
    assert best_sample * (1 - 2e-2) <= bound.initial <= best_sample * (1 + 1e-9)


def test_gradient_ascent_improves_on_the_data() -> None:
    f = _mlp()
    x = torch.rand(8, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    without = empirical_lipschitz(f, x, ascent_steps=0)
    assert without.value == without.initial
    assert torch.equal(without.point, x[without.at_index])
    with_ascent = empirical_lipschitz(f, x, ascent_steps=30)
    assert with_ascent.initial == without.initial
    assert with_ascent.value > 1.05 * without.value
    assert with_ascent.value <= exact_jacobian_norm(f, with_ascent.point) * (1 + 1e-9)


def test_batched_equals_per_sample() -> None:
    """Samples stay independent: the batch a sample is in does not change its result."""
    f = _vit("lipschitz")
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    batched = jacobian_norm(f, x)
    chunked = jacobian_norm(f, x, batch_size=2)  # same start vectors, other batches
    torch.testing.assert_close(batched, chunked, rtol=1e-12, atol=0)
    exact = torch.tensor([exact_jacobian_norm(f, xi) for xi in x], dtype=torch.float64)
    assert torch.all(batched <= exact * (1 + 1e-9))
    # One sample at a time, from other random starts: the same norms once converged.
    g = _mlp()
    x = torch.rand(5, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    batched = jacobian_norm(g, x, iters=200)
    single = torch.cat([jacobian_norm(g, x[i:i + 1], iters=200, seed=i + 1) for i in range(5)])
    exact = torch.tensor([exact_jacobian_norm(g, xi) for xi in x], dtype=torch.float64)
    torch.testing.assert_close(batched, single, rtol=1e-9, atol=0)
    torch.testing.assert_close(batched, exact, rtol=1e-9, atol=0)


def test_exported_program_gives_the_same_norms() -> None:
    """``.pt2`` models are certified through ``program.module()``: same Jacobians."""
    f = _vit("lipschitz")
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    program = torch.export.export(f, (x,))
    torch.testing.assert_close(jacobian_norm(program.module(), x), jacobian_norm(f, x),
                               rtol=1e-9, atol=0)


def test_zero_jacobians_give_zero() -> None:
    zero = nn.Linear(4, 3)
    nn.init.zeros_(zero.weight)
    x = torch.rand(3, 4)
    assert torch.equal(jacobian_norm(zero, x), torch.zeros(3, dtype=torch.float64))
    assert jacobian_norm(lambda z: torch.ones(len(z), 2), x).tolist() == [0.0] * 3
    assert empirical_lipschitz(zero, x, ascent_steps=3).value == 0.0


def test_bad_inputs() -> None:
    with pytest.raises(LipcertError, match="floating-point"):
        jacobian_norm(nn.Identity(), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(LipcertError, match="batch of 2"):
        jacobian_norm(lambda z: z.sum(0, keepdim=True), torch.rand(2, 3))
    with pytest.raises(LipcertError, match="top_k"):
        empirical_lipschitz(nn.Identity(), torch.rand(2, 3), top_k=0)


def test_tightness_ratio_and_json() -> None:
    assert tightness_ratio(10.0, 2.0) == 5.0
    assert tightness_ratio(10.0, None) is None and tightness_ratio(None, 2.0) is None
    assert tightness_ratio(math.inf, 2.0) is None and tightness_ratio(10.0, 0.0) is None
    bound = empirical_lipschitz(nn.Linear(3, 2), torch.rand(4, 3), ascent_steps=1)
    assert set(bound.to_dict()) == {"value", "kind", "at_index", "method"}
    assert bound.to_dict()["kind"] == "lower"


class _CountingClock:
    """A clock that reads the number of forward passes made so far: budgets in passes."""

    def __init__(self, f) -> None:
        self.f, self.passes = f, 0

    def model(self, x: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        return self.f(x)

    def __call__(self) -> float:
        return float(self.passes)


def test_a_budget_stops_the_search_and_leaves_a_witness() -> None:
    f = _mlp()
    x = torch.rand(40, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    clock = _CountingClock(f)
    seen = []
    bound = empirical_lipschitz(clock.model, x, ascent_steps=50, top_k=3, budget_s=12,
                                clock=clock, on_progress=seen.append)
    assert bound.stopped == "budget" and "stopped by its 12 s budget" in bound.method
    assert 0 < bound.samples_scanned < len(x) and 1 <= bound.ascent_steps_done < 50
    assert bound.elapsed_s <= 12 + 2  # overrun: at most the ascent step under way
    assert bound.value <= exact_jacobian_norm(f, bound.point) * (1 + 1e-9)
    scanned = jacobian_norm(f, x[:bound.samples_scanned])
    assert bound.initial == pytest.approx(float(scanned.max()), rel=1e-12)
    assert bound.value >= bound.initial
    assert [p.phase for p in seen] == sorted((p.phase for p in seen), reverse=True)
    assert seen[-1].phase == "ascent" and seen[-1].ascent_step == bound.ascent_steps_done
    assert all(a.elapsed_s <= b.elapsed_s for a, b in itertools.pairwise(seen))
    assert bound.search_dict() == {"budget_s": 12, "elapsed_s": bound.elapsed_s,
                                   "stopped": "budget", "samples_scanned": bound.samples_scanned,
                                   "ascent_steps": bound.ascent_steps_done}


def test_a_budget_spent_in_the_scan_still_measures_the_first_chunk() -> None:
    f = _mlp()
    x = torch.rand(40, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    clock = _CountingClock(f)
    bound = empirical_lipschitz(clock.model, x, ascent_steps=5, budget_s=0.5, clock=clock)
    assert bound.stopped == "budget" and bound.ascent_steps_done == 0
    assert bound.samples_scanned == 4  # the first chunk
    assert bound.value == bound.initial == pytest.approx(float(jacobian_norm(f, x[:4]).max()),
                                                        rel=1e-12)


def test_an_ample_or_infinite_budget_changes_nothing() -> None:
    f = _mlp()
    x = torch.rand(20, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    plain = empirical_lipschitz(f, x, ascent_steps=10, top_k=3)
    unlimited = empirical_lipschitz(f, x, ascent_steps=10, top_k=3, budget_s=math.inf)
    ample = empirical_lipschitz(f, x, ascent_steps=10, top_k=3, budget_s=1e6)
    assert plain.stopped == unlimited.stopped == ample.stopped == "finished"
    assert unlimited.value == plain.value and unlimited.method == plain.method
    assert torch.equal(unlimited.point, plain.point)
    assert unlimited.search_dict()["budget_s"] is None
    assert ample.value == pytest.approx(plain.value, rel=1e-9)  # other chunks, same math
    assert ample.samples_scanned == 20 and ample.ascent_steps_done == 10
    with pytest.raises(LipcertError, match="budget"):
        empirical_lipschitz(f, x, budget_s=0)


def test_ascent_stays_in_an_embedding_ball() -> None:
    """On an embedding domain the search projects each token onto the ball, so the witness
    point is a point the certificate covers."""
    from lipcert.bounds import EmbeddingDomain

    class Cubic(torch.nn.Module):  # ‖J(x)‖ grows with ‖x‖: the ascent pushes outwards
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1).pow(3)[:, :3]

    x = torch.randn(4, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = 0.5 * x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    bound = empirical_lipschitz(Cubic(), x, ascent_steps=10, top_k=2, step_size=5.0,
                                domain=EmbeddingDomain(1.0))
    norms = torch.linalg.vector_norm(bound.point, dim=-1)
    assert norms.max() <= 1.0 + 1e-12
    assert norms.max() > 0.5 + 1e-3  # the search did move outwards, up to the ball

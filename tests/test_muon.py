"""lipcert.muon.Muon: torch's Muon, with Newton–Schulz in float32 where bfloat16 is emulated."""

from __future__ import annotations

import pytest
import torch

import lipcert.muon as muon_module
from lipcert.muon import Muon, orthogonalize

SHAPES = [(48, 16), (16, 48), (32, 32)]


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in SHAPES]


def _run(optimizer_class: type[torch.optim.Optimizer], steps: int = 3,
         **kwargs: object) -> list[torch.Tensor]:
    """``steps`` updates of the same parameters with the same gradients (momentum included)."""
    params = _params(0)
    optimizer = optimizer_class(params, lr=0.05, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("kwargs", [
    {"weight_decay": 0.0, "adjust_lr_fn": "original"},
    {"weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw", "nesterov": False},
])
def test_float32_path_follows_torch_muon(monkeypatch: pytest.MonkeyPatch,
                                         kwargs: dict[str, object]) -> None:
    monkeypatch.setattr(muon_module, "native_bfloat16_matmul", lambda device: False)
    ours, torchs, start = _run(Muon, **kwargs), _run(torch.optim.Muon, **kwargs), _params(0)
    for a, b, p0 in zip(ours, torchs, start, strict=True):
        moved = (b - p0).norm()
        assert moved > 0.05  # the parameters really moved
        # The same algorithm; only torch's bfloat16 rounding (8 mantissa bits) separates them.
        assert (a - b).norm() <= 0.03 * moved


def test_native_bfloat16_delegates_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(muon_module, "native_bfloat16_matmul", lambda device: True)
    for a, b in zip(_run(Muon), _run(torch.optim.Muon), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", SHAPES)
def test_orthogonalize_is_torchs_iteration_in_float32(shape: tuple[int, int]) -> None:
    """The same iterate as torch's bfloat16 Newton–Schulz up to bfloat16 rounding, and an
    approximate polar factor: a spectrum spread over a factor 10 ends within [0.5, 1.2]."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    gen = torch.Generator().manual_seed(2)
    q1, _ = torch.linalg.qr(torch.randn(max(shape), min(shape), generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(min(shape), min(shape), generator=gen))
    m = q1 @ torch.diag(torch.logspace(-0.5, 0.5, min(shape))) @ q2
    m = m if shape[0] >= shape[1] else m.mT
    coefficients = (3.4445, -4.7750, 2.0315)
    ours = orthogonalize(m, coefficients, 5, 1e-7)
    torchs = _zeropower_via_newtonschulz(m, coefficients, 5, 1e-7).float()
    assert ours.dtype == m.dtype and ours.shape == m.shape
    assert (ours - torchs).norm() <= 0.03 * torchs.norm()
    sigma = torch.linalg.svdvals(ours.double())
    assert sigma.max() < 1.2 and sigma.min() > 0.5


@pytest.mark.parametrize("adjust", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("shape", [*SHAPES, (7, 3), (3, 7)])
def test_adjusted_lr_is_torchs_own(adjust: str | None, shape: tuple[int, int]) -> None:
    """lipcert restates the adjustment torch.optim.Muon documents; the tests hold it to
    torch's private implementation, so a change in torch shows here first."""
    from torch.optim._muon import _adjust_lr

    size = torch.Size(shape)
    assert muon_module.adjusted_lr(0.05, adjust, size) == _adjust_lr(0.05, adjust, size)


def test_tested_torch_range() -> None:
    assert muon_module.torch_is_tested()  # the torch these tests run on
    low, high = muon_module.TESTED_TORCH
    assert muon_module.torch_is_tested(f"{low[0]}.{low[1]}.0+cpu")
    assert not muon_module.torch_is_tested(f"{high[0]}.{high[1]}.0")
    assert not muon_module.torch_is_tested(f"{low[0]}.{low[1] - 1}.9")


def test_untested_torch_falls_back_to_torch_muon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the tested versions the float32 re-implementation is never used, even on a CPU
    that would need it: a warning, then torch's Muon bit for bit."""
    monkeypatch.setattr(muon_module, "native_bfloat16_matmul", lambda device: False)
    monkeypatch.setattr(muon_module, "TESTED_TORCH", ((1, 0), (1, 1)))
    with pytest.warns(RuntimeWarning, match="outside the versions"):
        ours = _run(Muon)
    for a, b in zip(ours, _run(torch.optim.Muon), strict=True):
        assert torch.equal(a, b)

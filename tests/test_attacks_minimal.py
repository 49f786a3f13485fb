"""attacks.minimal and attacks.deepfool: the empirical radius per sample."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import nn

from attacks.deepfool import BatchedDeepFool
from attacks.minimal import MINIMAL_COLUMNS, PerSamplePGDL2, minimal_perturbation
from lipcert.errors import LipcertError
from lipcert.models import ModelConfig, build_model


class _Affine(nn.Module):
    """Logits W·x + b: the distance to the nearest decision boundary is exact."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _exact_radius(model: _Affine, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w, b = model.fc.weight.double(), model.fc.bias.double()
    z = x.flatten(1).double() @ w.T + b
    out = []
    for i, label in enumerate(y.tolist()):
        out.append(min((z[i, label] - z[i, j]) / (w[label] - w[j]).norm()
                       for j in range(3) if j != label))
    return torch.stack(out).detach()


def test_radius_of_an_affine_model_is_close_to_the_exact_one_and_never_below() -> None:
    model = _Affine().eval()
    x = 0.25 + 0.5 * torch.rand(16, 1, 4, 4)  # far enough from the box's faces
    with torch.no_grad():
        y = model(x).argmax(1)
    df, adv = minimal_perturbation(model, x, y, batch_size=6, return_examples=True,
                                   bisection_steps=6)
    assert list(df.columns) == MINIMAL_COLUMNS
    exact = _exact_radius(model, x, y).numpy()
    radius = df["radius_l2"].to_numpy()
    assert (radius >= exact - 1e-9).all() and (radius <= 1.05 * exact).all()
    with torch.no_grad():
        assert (model(adv).argmax(1) != y).all()
    measured = (adv.double() - x.double()).flatten(1).norm(dim=1).numpy()
    assert measured == pytest.approx(radius, rel=1e-12)


def test_misclassified_samples_have_radius_zero_and_methods_can_be_chosen() -> None:
    model = _Affine().eval()
    x = torch.rand(6, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 3
    df = minimal_perturbation(model, x, y, methods=["pgdl2"], bisection_steps=3)
    assert df.loc[0, "radius_l2"] == 0 and df.loc[0, "method"] == "clean"
    assert df["deepfool_l2"].isna().all() and df["fab_l2"].isna().all()
    assert (df.loc[1:, "method"].isin(["pgdl2", "none"])).all()
    with pytest.raises(LipcertError, match="unknown minimal-attack"):
        minimal_perturbation(model, x, y, methods=["nope"])


def test_batched_deepfool_matches_torchattacks_deepfool() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="vit", family="standard", d_model=16, n_layers=1,
                                    n_heads=2, image_size=8, patch_size=4)).eval()
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 10
    reference = torchattacks.DeepFool(model, steps=10)(x, y)
    batched = BatchedDeepFool(model, steps=10)(x, y)
    assert torch.allclose(batched, reference, atol=1e-5)


def test_per_sample_pgdl2_respects_each_budget() -> None:
    model = _Affine().eval()
    x = torch.rand(5, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = torch.tensor([0.01, 0.1, 0.3, 1.0, 2.0])
    torch.manual_seed(0)
    adv = PerSamplePGDL2(model, steps=5)(x, y, eps)
    norms = (adv - x).double().flatten(1).norm(dim=1)
    assert (norms <= eps.double() * (1 + 1e-5)).all()
    assert adv.min() >= 0 and adv.max() <= 1

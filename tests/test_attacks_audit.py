"""attacks.audit: certificates checked against adversarial examples, on an ε grid and at
each sample's own certified radius."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from attacks import run_attacks
from attacks.audit import (
    RADIUS_AUDIT_COLUMNS,
    VIOLATION_COLUMNS,
    BallPGDL2,
    certified_vs_robust,
    find_violations,
    load_certificate,
    minimal_violations,
    print_violations,
    radius_audit,
    radius_violations,
)
from attacks.minimal import minimal_perturbation
from lipcert.certificate import Certificate, ModelIdentity, SampleCertificate
from lipcert.errors import LipcertError
from lipcert.models import ModelConfig, build_model


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="vit", family="standard", d_model=16, n_layers=1,
                                    n_heads=2, image_size=8, patch_size=4)).eval()
    x = torch.rand(20, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 10
    return model, x, y


def _document(y: torch.Tensor, radius: float, sha: str | None = "ab" * 32) -> dict:
    """A certificate document (``lipcert certify``'s schema) claiming ``radius`` for every
    sample, for the weights ``sha``."""
    samples = [SampleCertificate(index=i, label=int(label), pred=int(label), margin=1.0,
                                 radius_l2=radius, radius_linf=radius / 8, lipschitz=1.0)
               for i, label in enumerate(y)]
    return Certificate(mode="global", method="exact", lipschitz_upper=1.0, layers=[],
                       samples=samples, certified_accuracy=[], input_elements=64,
                       model=ModelIdentity("run", "run", sha)).to_json()


def _certificate(path: Path, y: torch.Tensor, radius: float, sha: str | None = "ab" * 32
                 ) -> Path:
    path.write_text(json.dumps(_document(y, radius, sha)))
    return path


def test_a_planted_wrong_certificate_is_caught(problem, tmp_path: Path) -> None:
    model, x, y = problem
    cert = load_certificate(_certificate(tmp_path / "cert.json", y, radius=1e6))
    r2, rinf = cert.radii(list(range(20)), y.tolist())
    assert (r2 == 1e6).all() and (rinf == 1e6 / 8).all()
    df = run_attacks(model, x, y, ["fgsm", "pgdl2"], eps_l2=[0.5], eps_linf=[0.05],
                     certified_radius_l2=r2)
    violations = find_violations(df, cert)
    assert list(violations.columns) == VIOLATION_COLUMNS
    assert len(violations) == int(df["success"].sum()) > 3  # every success, and the 3 clean
    assert {0, 1, 2} <= set(violations["index"])
    assert (violations["delta_l2"] < violations["certified_radius_l2"]).all()
    table = certified_vs_robust(df, cert)
    assert (table["certified_accuracy"] == 1.0).all() and not table["consistent"].any()
    console = Console(record=True, width=200)
    print_violations(violations, console)
    assert "CERTIFICATE VIOLATION" in console.export_text()


def test_a_sound_certificate_passes(problem, tmp_path: Path) -> None:
    model, x, y = problem
    cert = load_certificate(_certificate(tmp_path / "cert.json", y, radius=0.0))
    r2, _ = cert.radii(list(range(20)), y.tolist())
    df = run_attacks(model, x, y, ["pgdl2"], eps_l2=[0.5], certified_radius_l2=r2)
    assert find_violations(df, cert).empty
    assert certified_vs_robust(df, cert)["consistent"].all()
    no_cert = run_attacks(model, x, y, ["pgdl2"], eps_l2=[0.5])
    assert find_violations(no_cert).empty  # NaN radius: nothing to violate


def test_certificate_for_other_model_or_data_is_refused(problem, tmp_path: Path) -> None:
    _, _, y = problem
    cert = load_certificate(_certificate(tmp_path / "cert.json", y, radius=0.1, sha="cd" * 32))
    assert cert.weights_sha256 == "cd" * 32
    with pytest.raises(LipcertError, match="different model"):
        cert.check_model("ef" * 32, "run")
    cert.check_model("cd" * 32, "run")
    with pytest.raises(LipcertError, match="different data"):
        cert.radii([0, 1], [int(y[0]) + 1, int(y[1])])
    r2, _ = cert.radii([0, 99], [int(y[0]), 3])
    assert r2[0] == 0.1 and math.isnan(r2[1])  # silent about sample 99


def _set(doc: dict, *path_and_value) -> dict:
    """``doc`` with the entry at ``path`` (keys and list positions) replaced."""
    *path, key, value = path_and_value
    holder = doc
    for step in path:
        holder = holder[step]
    holder[key] = value
    return doc


@pytest.mark.parametrize("edit,message", [
    (lambda d: "{not json", "not valid JSON"),
    (lambda d: '{"norm": "l2", "samples": []}', "no 'lipschitz.upper'"),
    (lambda d: _set(d, "norm", "linf"), "not supported"),
    (lambda d: _set(d, "samples", 0, "radius_l2", None), "sample 0 radius_l2: expected a number"),
    (lambda d: _set(d, "samples", 0, "label", "cat"), "sample 0 is malformed"),
    (lambda d: _set(d, "samples", 1, "radius_l2", -1), "sample 1 has radius -1"),
    (lambda d: _set(d, "model", "weights_sha256", 7), "'model' must hold"),
    (lambda d: _set(d, "samples", {}), "'samples' must be a list"),
])
def test_bad_certificates_are_clear_errors(problem, tmp_path: Path, edit, message: str
                                           ) -> None:
    changed = edit(_document(problem[2], radius=0.1))
    path = tmp_path / "cert.json"
    path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(LipcertError, match=message):
        load_certificate(path)
    with pytest.raises(LipcertError, match="cannot read"):
        load_certificate(tmp_path / "missing.json")


def test_certificate_without_weights_hash_names_no_model(problem, tmp_path: Path) -> None:
    cert = load_certificate(_certificate(tmp_path / "cert.json", problem[2], 0.1, sha=None))
    assert cert.weights_sha256 is None
    cert.check_model("ef" * 32, "run")  # nothing to contradict


def test_violations_use_the_linf_radius_too(problem, tmp_path: Path) -> None:
    model, x, y = problem
    cert = load_certificate(_certificate(tmp_path / "cert.json", y, radius=0.0))
    cert.radius_linf.update({i: 1.0 for i in range(20)})  # a wrong L∞ claim only
    df = run_attacks(model, x, y, ["fgsm"], eps_linf=[0.05],
                     certified_radius_l2=np.zeros(20))
    violations = find_violations(df, cert)
    assert len(violations) == int(df["success"].sum()) and set(violations["violation"]) == {
        "linf"}


def test_minimal_perturbations_below_the_certified_radius_are_violations(problem) -> None:
    model, x, y = problem
    radii = np.full(20, 1e6)
    radii[5] = 0.0
    df = minimal_perturbation(model, x, y, methods=["deepfool"], certified_radius_l2=radii)
    violations = minimal_violations(df)
    found = df[df["radius_l2"].notna()]
    assert list(violations.columns) == VIOLATION_COLUMNS
    assert len(violations) == len(found) - int(5 in set(found["index"])) > 3
    assert violations["attack"].str.startswith("minimal:").all()
    console = Console(record=True, width=200)
    print_violations(violations, console)
    assert "minimal:" in console.export_text()


# ------------------------------------------------------------- the per-sample radius audit


def _certified(run: Path, mode: str, n: int = 20):
    from lipcert.certificate import certify
    from lipcert.loading import load_model
    from lipcert.samples import select_samples

    samples = select_samples(load_model(run), "mnist", n)
    cert = certify(samples.certifiable, samples.inputs, samples.labels, mode=mode)
    radii = np.array([s.radius_l2 for s in cert.samples])
    return samples, radii


@pytest.mark.parametrize("run", ["vit-mnist-lipschitz-tiny", "vit-mnist-standard-tiny"])
@pytest.mark.parametrize("mode", ["global", "local"])
def test_radius_audit_finds_nothing_inside_true_certified_balls(tiny_runs, run, mode) -> None:
    samples, radii = _certified(tiny_runs[run], mode)
    df = radius_audit(samples.classifier, samples.inputs, samples.labels, radii,
                      model_name=run, steps=100, restarts=5, batch_size=8)
    assert list(df.columns) == RADIUS_AUDIT_COLUMNS
    assert df["index"].tolist() == np.flatnonzero(radii > 0).tolist() and len(df) >= 10
    assert not df["violation"].any() and radius_violations(df).empty
    assert (df["steps"] == 100).all() and (df["restarts"] == 5).all()
    assert (df["pred_adv"] == df["label"]).all() and (df["margin_adv"] > 0).all()
    assert (df["delta_l2"] <= df["certified_radius_l2"]).all()
    assert (df["margin_adv"] <= df["margin_clean"]).all()
    if mode == "local":  # radii above float32 resolution: the attack ends on the sphere
        assert (df["delta_l2"] >= 0.99 * df["certified_radius_l2"]).all()
        assert (df["margin_adv"] < df["margin_clean"]).all()


def test_radius_audit_catches_inflated_and_misclassified_claims(tiny_runs) -> None:
    run = tiny_runs["vit-mnist-lipschitz-tiny"]
    samples, radii = _certified(run, "global")
    wrong = np.flatnonzero(radii == 0)
    assert len(wrong) > 0
    planted = radii * 1000  # ×100 still lies below these samples' empirical radii (~150×)
    planted[wrong[0]] = 0.01  # a claim for a sample the model gets wrong (or ties)
    x, y = samples.inputs, samples.labels
    df = radius_audit(samples.classifier, x, y, planted, model_name="tiny", batch_size=8)
    violations = radius_violations(df)
    assert list(violations.columns) == VIOLATION_COLUMNS
    assert len(violations) == int(df["violation"].sum())
    assert (violations["attack"] == "radius-audit:pgdl2").all()
    assert (violations["delta_l2"] <= violations["certified_radius_l2"]).all()
    assert (violations["eps"] == violations["certified_radius_l2"]).all()
    row = df.set_index("index").loc[wrong[0]]
    assert row["violation"] and row["delta_l2"] == 0 and row["margin_adv"] <= 0
    # every inflated claim that a minimal-norm attack refutes with room to spare is caught
    minimal = minimal_perturbation(samples.classifier, x, y, methods=["deepfool"])
    refuted = minimal.index[(minimal["radius_l2"] < planted / 2)].tolist()
    caught = df.loc[df["violation"], "index"].tolist()
    assert len(refuted) >= 5 and set(refuted) <= set(caught)
    with torch.no_grad():  # the clean samples behind the caught claims: one misclassified
        assert int((samples.classifier(x[caught]).argmax(1) != y[caught]).sum()) == 1


class _Affine(torch.nn.Module):
    """Logits W·(x − ½): the distance to the decision boundary is known exactly, and it is
    at most ‖x − ½‖."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc = torch.nn.Linear(16, 3)
        with torch.no_grad():
            self.fc.bias.copy_(-0.5 * self.fc.weight.sum(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_radius_audit_is_exact_on_an_affine_model() -> None:
    """Just inside the true radius nothing is found; just outside, every claim falls."""
    model = _Affine().eval()
    x = 0.45 + 0.1 * torch.rand(12, 1, 4, 4)  # ‖x − ½‖ ≤ 0.2: the box's faces lie further
    with torch.no_grad():
        y = model(x).argmax(1)
    w, b = model.fc.weight.double(), model.fc.bias.double()
    z = x.flatten(1).double() @ w.T + b
    exact = torch.stack([min((z[i, k] - z[i, j]) / (w[k] - w[j]).norm()
                             for j in range(3) if j != k)
                         for i, k in enumerate(y.tolist())]).detach()
    assert float(exact.max()) < 0.2
    inside = radius_audit(model, x, y, exact * 0.999, steps=100, restarts=5)
    assert not inside["violation"].any() and (inside["margin_adv"] > 0).all()
    outside = radius_audit(model, x, y, exact * 1.001, steps=100, restarts=5)
    assert outside["violation"].all()
    assert (outside["delta_l2"] <= outside["certified_radius_l2"]).all()


def test_ball_pgdl2_starts_uniformly_in_the_ball() -> None:
    """Uniform by volume in n dimensions: (‖δ‖/ε)^n is uniform on [0, 1]."""
    attack = BallPGDL2(_Affine().eval(), steps=1)
    x = torch.full((4000, 1, 4, 4), 0.5)
    eps = torch.full((4000, 1, 1, 1), 0.3)
    torch.manual_seed(0)
    start = attack._start(x, eps)
    u = ((start - x).double().flatten(1).norm(dim=1) / 0.3) ** 16
    assert float(u.max()) <= 1 + 1e-5
    quartiles = torch.quantile(u, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    assert torch.allclose(quartiles, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64),
                          atol=0.03)


def test_radius_audit_rejects_bad_settings(problem) -> None:
    model, x, y = problem
    with pytest.raises(LipcertError, match="steps, restarts"):
        radius_audit(model, x, y, np.zeros(20), steps=0)
    with pytest.raises(LipcertError, match=">= 0"):
        radius_audit(model, x, y, np.full(20, -1.0))
    with pytest.raises(LipcertError, match="one value per sample"):
        radius_audit(model, x, y, np.zeros(3))
    empty = radius_audit(model, x, y, np.full(20, np.nan))
    assert empty.empty and list(empty.columns) == RADIUS_AUDIT_COLUMNS

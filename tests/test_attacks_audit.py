"""attacks.audit: certificates checked against adversarial examples."""

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
    VIOLATION_COLUMNS,
    certified_vs_robust,
    find_violations,
    load_certificate,
    minimal_violations,
    print_violations,
)
from attacks.minimal import minimal_perturbation
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


def _certificate(path: Path, y: torch.Tensor, radius: float, sha: str = "ab" * 32) -> Path:
    samples = [{"index": i, "label": int(label), "pred": int(label), "margin": 1.0,
                "radius_l2": radius, "radius_linf": radius / 8} for i, label in enumerate(y)]
    path.write_text(json.dumps({"norm": "l2", "model": {"weights_sha256": sha},
                                "samples": samples}))
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


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ('{"norm": "l2"}', "no 'samples'"),
    ('{"norm": "linf", "samples": []}', "not supported"),
    ('{"samples": [{"index": 0}]}', "malformed"),
    ('{"samples": [{"index": 0, "label": 1, "radius_l2": -1}]}', "radius"),
])
def test_bad_certificates_are_clear_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "cert.json"
    path.write_text(content)
    with pytest.raises(LipcertError, match=message):
        load_certificate(path)
    with pytest.raises(LipcertError, match="cannot read"):
        load_certificate(tmp_path / "missing.json")


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

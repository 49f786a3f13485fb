"""Synthetic run directories for the report tests (written by hand, no training), and the
report built from them once per session (shared by test_reports.py and
test_reports_browser.py)."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports import make_report

N_INPUT = 784
EPS_L2 = [0.25, 0.5, 1.0]
EPS_LINF = [2 / 255, 8 / 255]
LAYERS = [("patch_embed", "Linear", 1568), ("blocks.0", "Block", 12288),
          ("blocks.0.attn", "Attention", 4096), ("blocks.0.mlp", "MLP", 8192),
          ("head", "Linear", 320)]
ALL_FILES = ("config", "log", "global", "local", "attacks", "minimal")
WHEN = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def _versions() -> dict[str, str]:
    return {"python": "3.11.7", "lipcert": "0.1.0", "torch": "2.13.0+cpu", "numpy": "2.4.6"}


def make_run(root: Path, name: str, *, family: str = "lipschitz", n: int = 60, seed: int = 0,
             files: tuple[str, ...] = ALL_FILES, violation: bool = False,
             upper: float | str = 12.0, minimal_format: str = "brief") -> Path:
    """Write a realistic run directory: a model whose smallest adversarial perturbations
    (log-normal, larger for the Lipschitz family) lie above its certified radii, except for
    sample 0 when ``violation``; ``files`` picks which files exist."""
    rng = np.random.default_rng(seed)
    run = root / name
    run.mkdir(parents=True)
    lipschitz = family == "lipschitz"
    sha = f"{seed:02d}" * 32
    labels = rng.integers(0, 10, n)
    correct = rng.random(n) < (0.9 if lipschitz else 0.96)
    correct[0] = True
    preds = np.where(correct, labels, (labels + 1) % 10)
    min_adv = np.where(correct, rng.lognormal(math.log(0.9 if lipschitz else 0.3), 0.5, n), 0.0)
    none_found = np.zeros(n, bool)
    none_found[[1, 2]] = lipschitz  # no adversarial example found for two samples
    r_local = np.where(correct, min_adv * rng.uniform(0.2 if lipschitz else 1e-4,
                                                       0.8 if lipschitz else 1e-3, n), 0.0)
    if violation:
        r_local[0] = min_adv[0] * 1.5
    r_global = r_local * 0.5
    up = float(upper)
    margin = np.where(correct, r_global * math.sqrt(2) * (up if math.isfinite(up) else 1e9), 0)
    if not math.isfinite(up):
        r_global = np.zeros(n)

    config = {
        "format_version": 1, "status": "finished",
        "model": {"arch": "vit", "family": family, "d_model": 32, "n_layers": 1},
        "training": {"preset": f"vit-mnist-{family}", "optimizer":
                     "muon" if lipschitz else "adamw", "constraint":
                     "spectral_cap" if lipschitz else "none", "w_max": 4.0 if lipschitz else 0,
                     "seed": seed, "steps": 100, "device": "cpu"},
        "dataset": "mnist", "seed": seed,
        "metrics": {"val_acc": 0.9, "val_loss": 0.3, "train_time_s": 12.5, "steps": 100,
                    **({"lipschitz_paper_formula": up * 1.5} if lipschitz and
                       math.isfinite(up) else {})},
        "constraint": {"method": "spectral_cap"}, "versions": _versions(),
        "weights_sha256": sha,
    }
    if "config" in files:
        (run / "config.json").write_text(json.dumps(config, indent=2))
    if "log" in files:
        steps = np.arange(1, 101)
        loss = 2.3 * np.exp(-steps / 40) + 0.2 + rng.normal(0, 0.05, 100)
        log = pd.DataFrame({"step": steps, "loss": loss,
                            "train_acc": np.clip(1 - loss / 2.5, 0, 1),
                            "lr": 0.05 * (1 - steps / 100), "val_loss": np.nan,
                            "val_acc": np.nan, "elapsed_s": steps * 0.07})
        at = log["step"] % 20 == 0
        log.loc[at, "val_loss"] = log.loc[at, "loss"] + 0.05
        log.loc[at, "val_acc"] = log.loc[at, "train_acc"] - 0.02
        log.to_csv(run / "train_log.csv", index=False)
    for mode, radii in (("global", r_global), ("local", r_local)):
        if mode not in files:
            continue
        lip = up if mode == "global" else up / 3
        scale = 1.0 if lipschitz else 50.0
        layers = [{"name": nm, "kind_of_layer": k, "upper": float(rng.uniform(1, 3)) * scale,
                   "kind": "upper", "params": p} for nm, k, p in LAYERS]
        if not math.isfinite(up):
            layers[1]["upper"] = "inf"
        cert = {
            "norm": "l2", "radius_convention": "r = (z_y - max_{j!=y} z_j) / (sqrt(2) * L)",
            "mode": mode, "method": "exact", "input_elements": N_INPUT,
            "lipschitz": {"upper": "inf" if not math.isfinite(up) else up,
                          "lower": 3.5 if lipschitz else 20.0,
                          "ratio": "inf" if not math.isfinite(up) else up / 3.5,
                          "lower_method": "gradient ascent"},
            "layers": layers,
            "samples": [{"index": i, "label": int(labels[i]), "pred": int(preds[i]),
                         "margin": float(margin[i]), "radius_l2": float(radii[i]),
                         "radius_linf": float(radii[i]) / math.sqrt(N_INPUT),
                         "lipschitz": lip} for i in range(n)],
            "certified_accuracy": [{"eps": e, "accuracy": float(np.mean(radii > e))}
                                   for e in EPS_L2],
            "timing_s": {"total": 1.0},
            "model": {"source": str(run), "kind": "run", "weights_sha256": sha},
            "data": {"dataset": "mnist", "n": n, "description": f"first {n} images"},
            "versions": _versions(),
        }
        (run / f"certificate-{mode}.json").write_text(json.dumps(cert, indent=1))
    if "attacks" in files:
        _write_attacks(run, name, rng, labels, preds, correct, min_adv, none_found, r_local)
    if "minimal" in files:
        d = np.where(none_found, np.nan, min_adv)
        if minimal_format == "brief":
            df = pd.DataFrame({"model": name, "index": range(n), "label": labels,
                               "min_delta_l2": d, "attack": "deepfool"})
            df.to_csv(run / "minimal.csv", index=False)
        else:  # as `lipcert attack --minimal` writes it
            df = pd.DataFrame({"model": name, "index": range(n), "label": labels,
                               "pred_clean": preds, "radius_l2": d, "method": "fab",
                               "certified_radius_l2": r_local})
            df.to_csv(run / "attacks.minimal.csv", index=False)
    return run


def _write_attacks(run: Path, name: str, rng: np.random.Generator, labels, preds, correct,
                   min_adv, none_found, radius) -> None:
    rows = []
    n = len(labels)
    reach = np.where(none_found, np.inf, min_adv)
    linf_reach = reach / rng.uniform(5, 15, n)
    for attack, norm, grid, strength in (("fgsm", "linf", EPS_LINF, 1.3),
                                         ("pgd", "linf", EPS_LINF, 1.0),
                                         ("pgdl2", "l2", EPS_L2, 1.0)):
        for eps in grid:
            for i in range(n):
                if not correct[i]:
                    ok, d2, dinf = True, 0.0, 0.0
                elif norm == "l2":
                    ok = reach[i] * strength <= eps
                    d2 = min(eps, reach[i] * rng.uniform(1.0, 1.1)) if ok else eps
                    dinf = d2 / rng.uniform(8, 20)
                else:
                    ok = linf_reach[i] * strength <= eps
                    dinf = eps
                    d2 = max(eps * rng.uniform(10, 28), reach[i] * rng.uniform(1.0, 1.1)) \
                        if ok else eps * rng.uniform(10, 28)
                rows.append({"model": name, "attack": attack, "norm": norm, "eps": eps,
                             "index": i, "label": int(labels[i]),
                             "pred_clean": int(preds[i]),
                             "pred_adv": int((labels[i] + 3) % 10 if ok else labels[i]),
                             "success": bool(ok), "delta_l2": d2, "delta_linf": dinf,
                             "certified_radius_l2": float(radius[i])})
    pd.DataFrame(rows).to_csv(run / "attacks.csv", index=False)


def standard_runs(root: Path) -> list[Path]:
    """Three models: a Lipschitz ViT and a standard ViT with every file, and a standard model
    with only its config and a global certificate whose bound is infinite."""
    return [
        make_run(root, "vit-mnist-lipschitz", family="lipschitz", seed=1, upper=12.0),
        make_run(root, "vit-mnist-standard", family="standard", seed=2, upper=3.0e9,
                 minimal_format="attack-cli"),
        make_run(root, "vit-standard-partial", family="standard", seed=3, upper="inf",
                 files=("config", "global")),
    ]


@pytest.fixture(scope="session")
def report_inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The run directories of ``standard_runs``."""
    return standard_runs(tmp_path_factory.mktemp("report-runs"))


@pytest.fixture(scope="session")
def built_report(report_inputs: list[Path], tmp_path_factory: pytest.TempPathFactory):
    """The report of ``report_inputs``, built once."""
    out = tmp_path_factory.mktemp("report-out") / "report"
    return make_report(report_inputs, out, now=WHEN)


def test_fixture_runs_are_sound_except_where_asked(tmp_path: Path) -> None:
    """The synthetic attacks never land inside the certified radii unless asked to."""
    from reports.runs import load_run
    from reports.stats import sample_table

    clean = sample_table(load_run(make_run(tmp_path, "a", seed=5)))
    bad = sample_table(load_run(make_run(tmp_path, "b", seed=5, violation=True)))
    assert not clean["violation"].any()
    assert bad["violation"].tolist() == [True] + [False] * (len(bad) - 1)

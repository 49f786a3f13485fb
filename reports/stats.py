"""The numbers behind the report: per-sample radii against found perturbations, certified and
robust accuracy with 95% Clopper–Pearson intervals, and soundness violations.

Conventions (docs/conventions.md):

* certified accuracy at ε is the fraction of samples whose certified radius r satisfies
  r > ε (misclassified samples have r = 0). Where a sample has several sound radii (global,
  local, or the radius given to the attack harness), the largest is used;
* robust accuracy of one attack at ε is the fraction of samples on which it failed; the
  worst case over attacks (as AutoAttack and RobustBench report it) counts a sample as
  robust only if no attack at that norm and ε succeeded;
* a *soundness violation* is a successful adversarial example strictly inside a certified
  radius: ‖δ‖₂ < r₂ or ‖δ‖∞ < r∞ (the test of ``attacks.audit``), or one flagged in an
  ``attacks.csv`` ``violation`` column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from reports.runs import RunData

__all__ = ["ModelAnalysis", "analyse", "clopper_pearson", "report_eps"]

CONFIDENCE = 0.95
BEST = "certified (best)"
SAMPLE_COLUMNS = ["model", "index", "label", "pred", "correct", "radius_l2_global",
                  "radius_l2_local", "radius_l2", "radius_linf", "min_adv_l2", "min_adv_by",
                  "violation"]
ROBUSTNESS_COLUMNS = ["model", "source", "kind", "norm", "eps", "n", "correct", "accuracy",
                      "ci_low", "ci_high"]


def clopper_pearson(k: np.ndarray | int, n: np.ndarray | int, level: float = CONFIDENCE
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper–Pearson) two-sided interval for a binomial proportion k/n, vectorised;
    NaN where n = 0. The same interval as ``scipy.stats.binomtest(k, n).proportion_ci()``."""
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    alpha = 1.0 - level
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(k > 0, stats.beta.ppf(alpha / 2, k, n - k + 1), 0.0)
        hi = np.where(k < n, stats.beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    bad = ~(n > 0)
    return np.where(bad, np.nan, lo), np.where(bad, np.nan, hi)


@dataclass
class ModelAnalysis:
    """The computed tables of one run: per sample, accuracies, clean accuracy, violations."""

    run: RunData
    samples: pd.DataFrame
    robustness: pd.DataFrame
    clean_correct: int | None
    clean_n: int | None
    clean_accuracy: float
    clean_source: str

    @property
    def name(self) -> str:
        """The model's name (its run directory's)."""
        return self.run.name

    @property
    def violations(self) -> int:
        """Samples with at least one adversarial example inside a certified radius."""
        return int(self.samples["violation"].sum()) if len(self.samples) else 0


def report_eps(runs: list[RunData]) -> tuple[list[float], list[float]]:
    """The report's ε values: L2 from the certificates' lists and the L2 attacks, L∞ from the
    L∞ attacks; sorted, without duplicates."""
    l2: set[float] = set()
    linf: set[float] = set()
    for run in runs:
        for cert in run.certificates.values():
            l2.update(e for e, _ in cert.certified_accuracy if math.isfinite(e))
        if run.attacks is not None:
            l2.update(run.attacks.loc[run.attacks["norm"] == "l2", "eps"].tolist())
            linf.update(run.attacks.loc[run.attacks["norm"] == "linf", "eps"].tolist())
    return sorted(l2), sorted(linf)


def analyse(run: RunData, eps_l2: list[float], eps_linf: list[float]) -> ModelAnalysis:
    """Per-sample table, accuracy table and clean accuracy of one run."""
    samples = sample_table(run)
    robustness = robustness_table(run, samples, eps_l2, eps_linf)
    k, n, acc, source = _clean_accuracy(run)
    return ModelAnalysis(run, samples, robustness, k, n, acc, source)


def sample_table(run: RunData) -> pd.DataFrame:
    """One row per sample index seen in any file (columns ``SAMPLE_COLUMNS``)."""
    attacks, minimal = run.attacks, run.minimal
    indices: set[int] = set()
    for cert in run.certificates.values():
        indices.update(cert.samples["index"].tolist())
    if attacks is not None:
        indices.update(attacks["index"].tolist())
    if minimal is not None:
        indices.update(minimal["index"].tolist())
    if not indices:
        return pd.DataFrame(columns=SAMPLE_COLUMNS)
    df = pd.DataFrame({"index": sorted(indices)}).set_index("index", drop=False)
    df.insert(0, "model", run.name)
    df["label"], df["pred"] = np.nan, np.nan
    for cert in reversed(list(run.certificates.values())):
        s = cert.samples.set_index("index")
        df.loc[s.index, "label"] = s["label"]
        df.loc[s.index, "pred"] = s["pred"]
    if attacks is not None and len(attacks):
        first = attacks.groupby("index")[["label", "pred_clean"]].first()
        unknown = df["label"].isna()
        df.loc[unknown, "label"] = first["label"].reindex(df.index[unknown])
        df.loc[unknown, "pred"] = first["pred_clean"].reindex(df.index[unknown])
    df["correct"] = (df["label"] == df["pred"]).where(df["pred"].notna())
    radii = []
    for mode in ("global", "local"):
        cert = run.certificates.get(mode)
        column = (cert.samples.set_index("index")["radius_l2"].reindex(df.index)
                  if cert is not None else pd.Series(np.nan, index=df.index))
        df[f"radius_l2_{mode}"] = column
        radii.append(column)
    for mode, cert in run.certificates.items():
        if mode not in ("global", "local"):
            radii.append(cert.samples.set_index("index")["radius_l2"].reindex(df.index))
    if attacks is not None and len(attacks):
        radii.append(attacks.groupby("index")["certified_radius_l2"].max().reindex(df.index))
    df["radius_l2"] = pd.concat(radii, axis=1).max(axis=1, skipna=True)
    linf = [c.samples.set_index("index")["radius_linf"].reindex(df.index)
            for c in run.certificates.values()]
    df["radius_linf"] = (pd.concat(linf, axis=1).max(axis=1, skipna=True) if linf
                         else np.nan)
    _smallest_perturbations(df, attacks, minimal)
    df["violation"] = _violations(df, attacks, minimal)
    for c in ("label", "pred"):
        df[c] = df[c].astype("Int64")
    df["correct"] = df["correct"].astype("boolean")
    return df[SAMPLE_COLUMNS].reset_index(drop=True)


def _smallest_perturbations(df: pd.DataFrame, attacks: pd.DataFrame | None,
                            minimal: pd.DataFrame | None) -> None:
    candidates = []
    if attacks is not None and len(attacks):
        hits = attacks[attacks["success"] & np.isfinite(attacks["delta_l2"])]
        by = hits["attack"] + " " + hits["norm"].map({"l2": "L2", "linf": "L∞"}) + " ε=" + \
            hits["eps"].map(lambda e: f"{e:.4g}")
        candidates.append(pd.DataFrame({"index": hits["index"], "d": hits["delta_l2"],
                                        "by": by}))
    if minimal is not None and len(minimal):
        found = minimal[np.isfinite(minimal["min_delta_l2"])]
        by = ("minimal (" + found["attack"] + ")").where(found["attack"] != "", "minimal")
        candidates.append(pd.DataFrame({"index": found["index"], "d": found["min_delta_l2"],
                                        "by": by}))
    if not candidates:
        df["min_adv_l2"], df["min_adv_by"] = np.nan, ""
        return
    all_ = pd.concat(candidates, ignore_index=True).sort_values(["index", "d", "by"],
                                                                 kind="stable")
    best = all_.groupby("index").first()
    df["min_adv_l2"] = best["d"].reindex(df.index)
    df["min_adv_by"] = best["by"].reindex(df.index).fillna("")


def _violations(df: pd.DataFrame, attacks: pd.DataFrame | None,
                minimal: pd.DataFrame | None) -> pd.Series:
    bad = pd.Series(False, index=df.index)
    if attacks is not None and len(attacks):
        r2 = attacks["index"].map(df["radius_l2"])
        r2 = np.fmax(r2, attacks["certified_radius_l2"])
        rinf = attacks["index"].map(df["radius_linf"])
        inside = attacks["success"] & ((attacks["delta_l2"] < r2)
                                       | (attacks["delta_linf"] < rinf))
        flagged = attacks.loc[inside | attacks["violation_flag"], "index"].unique()
        bad.loc[flagged] = True
    if minimal is not None and len(minimal):
        inside = minimal["min_delta_l2"] < minimal["index"].map(df["radius_l2"])
        bad.loc[minimal.loc[inside, "index"].unique()] = True
    return bad


def _accuracy_row(model: str, source: str, kind: str, norm: str, eps: float, n: int,
                  correct: int) -> dict:
    lo, hi = clopper_pearson(correct, n)
    return {"model": model, "source": source, "kind": kind, "norm": norm, "eps": float(eps),
            "n": int(n), "correct": int(correct),
            "accuracy": correct / n if n else math.nan,
            "ci_low": float(lo), "ci_high": float(hi)}


def certified_counts(radii: np.ndarray, eps: np.ndarray) -> tuple[np.ndarray, int]:
    """How many of ``radii`` (NaN: no certificate, ignored) exceed each ε; and n."""
    r = np.asarray(radii, dtype=float)
    r = r[~np.isnan(r)]
    return (r[:, None] > np.asarray(eps, dtype=float)[None, :]).sum(axis=0), len(r)


def certified_sources(run: RunData, samples: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The certified radii to show, by label: one set per certificate mode, and the per-sample
    best of all sources (``certified (best)``) when there are several; without certificates,
    the radii that ``attacks.csv`` was given."""
    sources = {f"certified ({mode})": cert.samples[["radius_l2", "radius_linf"]]
               for mode, cert in run.certificates.items() if len(cert.samples)}
    best = samples[["radius_l2", "radius_linf"]]
    if len(sources) > 1:
        sources[BEST] = best
    elif not sources and best["radius_l2"].count():
        sources["certified (attacks.csv)"] = best
    return sources


def headline_source(sources: list[str]) -> str | None:
    """The certified source that the summary reports: the best, else the only one."""
    certified = [s for s in sources if s.startswith("certified")]
    if BEST in certified:
        return BEST
    return certified[0] if certified else None


def robustness_table(run: RunData, samples: pd.DataFrame, eps_l2: list[float],
                     eps_linf: list[float]) -> pd.DataFrame:
    """Certified accuracy at the report's ε values and robust accuracy at every attacked ε,
    with Clopper–Pearson intervals (columns ``ROBUSTNESS_COLUMNS``)."""
    rows = []
    for source, radii in certified_sources(run, samples).items():
        for norm, grid in (("l2", eps_l2), ("linf", eps_linf)):
            column = radii[f"radius_{norm}"]
            if not grid or column.count() == 0:
                continue
            counts, n = certified_counts(column.to_numpy(), np.array(grid))
            rows += [_accuracy_row(run.name, source, "certified", norm, e, n, k)
                     for e, k in zip(grid, counts, strict=True)]
    if not rows:  # a certificate without samples: its own certified-accuracy list
        for mode, cert in run.certificates.items():
            n = int(cert.data.get("n") or 0)
            for e, acc in cert.certified_accuracy:
                row = _accuracy_row(run.name, f"certified ({mode})", "certified", "l2", e, n,
                                    round(acc * n))
                row["accuracy"] = acc
                rows.append(row)
    attacks = run.attacks
    if attacks is not None and len(attacks):
        per = attacks.groupby(["norm", "eps", "attack", "index"], sort=True)["success"].any()
        for (norm, eps, attack), hit in per.groupby(level=[0, 1, 2], sort=True):
            rows.append(_accuracy_row(run.name, attack, "attack", norm, eps, len(hit),
                                      int((~hit).sum())))
        worst = per.groupby(level=[0, 1, 3]).any()
        attacks_per = per.reset_index().groupby(["norm", "eps"])["attack"].nunique()
        for (norm, eps), hit in worst.groupby(level=[0, 1], sort=True):
            if attacks_per[(norm, eps)] > 1:
                rows.append(_accuracy_row(run.name, "worst case", "worst case", norm, eps,
                                          len(hit), int((~hit).sum())))
    df = pd.DataFrame(rows, columns=ROBUSTNESS_COLUMNS)
    order = {"certified (global)": 0, "certified (local)": 1, BEST: 3, "worst case": 9}
    df["_k"] = [order.get(s, 2 if k == "certified" else 5)
                for s, k in zip(df["source"], df["kind"], strict=True)]
    df["_n"] = df["norm"].map({"l2": 0, "linf": 1})
    df = df.sort_values(["_n", "_k", "source", "eps"], kind="stable")
    return df.drop(columns=["_k", "_n"]).reset_index(drop=True)


def _clean_accuracy(run: RunData) -> tuple[int | None, int | None, float, str]:
    cert = run.certificate
    if cert is not None and len(cert.samples):
        correct = int((cert.samples["pred"] == cert.samples["label"]).sum())
        return correct, len(cert.samples), correct / len(cert.samples), cert.path.name
    if run.attacks is not None and len(run.attacks):
        first = run.attacks.groupby("index")[["label", "pred_clean"]].first()
        correct = int((first["label"] == first["pred_clean"]).sum())
        return correct, len(first), correct / len(first), "attacks.csv"
    metrics = (run.config or {}).get("metrics") or {}
    if isinstance(metrics.get("val_acc"), int | float):
        return None, None, float(metrics["val_acc"]), "config.json (validation accuracy)"
    return None, None, math.nan, ""

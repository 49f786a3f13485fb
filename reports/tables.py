"""The report's tables as pandas DataFrames (written as CSV, Markdown and HTML by ``build``).

* ``summary_table``: one row per model, a RobustBench leaderboard row plus certification;
* ``robustness`` (long form, from ``reports.stats``) and ``accuracy_grid`` (one row per model
  and source, one column per ε);
* ``layers_table``: the per-layer Lipschitz upper bounds;
* ``metadata_table``: training settings, seeds, device, dates, versions, weights sha256;
* ``inputs_table``: which files each run directory had.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone

import pandas as pd

from reports.fmt import NORM_LABEL, eps_text, pct
from reports.runs import CONFIG, RECOGNISED, RunData
from reports.stats import ModelAnalysis, headline_source

__all__ = ["accuracy_grid", "inputs_table", "layers_table", "metadata_table",
           "summary_groups", "summary_table"]

BASE_COLUMNS = ["model", "family", "arch", "dataset", "params", "n", "clean acc",
                "Lipschitz upper", "Lipschitz lower", "ratio"]
_GROUPED = re.compile(r"^(?P<what>.+) (?P<norm>L2|L∞) ε=(?P<eps>\S+)$")


def accuracy_column(what: str, norm: str, eps: float) -> str:
    """The summary's column name for an accuracy: ``"pgd L∞ ε=8/255"``."""
    return f"{what} {NORM_LABEL[norm]} ε={eps_text(eps)}"


def summary_groups(columns: list[str]) -> list[tuple[str, str]]:
    """(group, sub-header) for each summary column: accuracy columns are grouped by threat
    model and ε (``"L2 ε=0.5"``, ``"pgdl2"``); others have an empty group."""
    out = []
    for c in columns:
        m = _GROUPED.match(c)
        out.append((f"{m['norm']} ε={m['eps']}", m["what"]) if m else ("", c))
    return out


def _model_info(run: RunData) -> dict[str, str]:
    config = run.config or {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    cert = run.certificate
    dataset = config.get("dataset") or (cert.data.get("dataset") if cert else None) or ""
    return {"family": str(model.get("family", "")), "arch": str(model.get("arch", "")),
            "dataset": str(dataset)}


def _params(run: RunData) -> int | None:
    if run.weights_params is not None:
        return run.weights_params
    metrics = (run.config or {}).get("metrics") or {}
    for key in ("params", "n_params", "parameters"):
        if isinstance(metrics.get(key), int):
            return int(metrics[key])
    cert = run.certificate
    if cert is not None and len(cert.layers):
        names = list(cert.layers["layer"])
        top = [not any(n.startswith(p + ".") for p in names if p != n) for n in names]
        return int(cert.layers.loc[top, "params"].sum())
    return None


def summary_table(analyses: list[ModelAnalysis], eps_l2: list[float],
                  eps_linf: list[float]) -> pd.DataFrame:
    """One row per model: parameters, clean accuracy, the global Lipschitz bounds, certified
    and robust accuracy at the report's ε values (per attack, and the per-sample worst case
    over attacks), and the number of samples with a soundness violation."""
    rows = []
    accuracy_columns: list[str] = []
    for norm, grid in (("l2", eps_l2), ("linf", eps_linf)):
        present = pd.concat([a.robustness[a.robustness["norm"] == norm] for a in analyses])
        attacks = sorted(set(present.loc[present["kind"] == "attack", "source"]))
        has_worst = bool((present["kind"] == "worst case").any())
        has_cert = bool((present["kind"] == "certified").any())
        for eps in grid:
            whats = (["certified"] if has_cert else []) + attacks + \
                (["worst case"] if has_worst else [])
            accuracy_columns += [accuracy_column(w, norm, eps) for w in whats]
    for a in analyses:
        cert = a.run.certificate
        upper = cert.upper if cert else math.nan
        lower = cert.lower if cert else math.nan
        row = {"model": a.name, **_model_info(a.run), "params": _params(a.run),
               "n": a.clean_n, "clean acc": a.clean_accuracy, "Lipschitz upper": upper,
               "Lipschitz lower": lower,
               "ratio": upper / lower if lower and lower > 0 else math.nan}
        row.update(dict.fromkeys(accuracy_columns, math.nan))
        r = a.robustness
        headline = headline_source(list(r["source"].unique()))
        for rec in r.itertuples():
            what = "certified" if rec.source == headline else rec.source
            name = accuracy_column(what, rec.norm, rec.eps)
            if name in row and (rec.kind != "certified" or rec.source == headline):
                row[name] = rec.accuracy
        tested = a.run.attacks is not None or a.run.minimal is not None
        row["violations"] = a.violations if tested else None
        rows.append(row)
    df = pd.DataFrame(rows, columns=[*BASE_COLUMNS, *accuracy_columns, "violations"])
    df["params"] = df["params"].astype("Int64")
    df["n"] = df["n"].astype("Int64")
    df["violations"] = df["violations"].astype("Int64")
    return df


def accuracy_grid(robustness: pd.DataFrame, norm: str) -> pd.DataFrame:
    """Accuracy (%) with its 95% interval, one row per (model, source), one column per ε."""
    r = robustness[robustness["norm"] == norm]
    if r.empty:
        return pd.DataFrame()
    keys = ["model", "source"]
    text = r.assign(text=[f"{pct(a)} [{pct(lo)}, {pct(hi)}]" for a, lo, hi in
                          zip(r["accuracy"], r["ci_low"], r["ci_high"], strict=True)])
    grid = text.pivot_table(index=keys, columns="eps", values="text", aggfunc="first",
                            sort=False)
    grid = grid.reindex(columns=sorted(r["eps"].unique())).fillna("")
    grid.columns = [f"ε={eps_text(e)}" for e in grid.columns]
    n = r.groupby(keys, sort=False)["n"].max().astype(int)
    return pd.concat([n, grid], axis=1).reset_index()


def layers_table(runs: list[RunData]) -> pd.DataFrame:
    """The per-layer table of each model's certificate (global preferred)."""
    frames = []
    for run in runs:
        cert = run.certificate
        if cert is None or cert.layers.empty:
            continue
        f = cert.layers.copy()
        f.insert(0, "model", run.name)
        f["certificate"] = cert.path.name
        frames.append(f)
    columns = ["model", "layer", "kind_of_layer", "params", "upper", "kind", "certificate"]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


def _run_date(run: RunData) -> str:
    config = run.path / CONFIG
    files = [config] if config.is_file() else [run.path / f for f in run.files]
    times = [p.stat().st_mtime for p in files if p.is_file()]
    if not times:
        return ""
    return datetime.fromtimestamp(min(times), tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def metadata_table(runs: list[RunData]) -> pd.DataFrame:
    """Run metadata, one row per model: training settings and seeds, the device, the run's
    date (when ``config.json`` was written), certificate settings, package versions and the
    weights' sha256."""
    rows = []
    version_keys: list[str] = []
    for run in runs:
        config = run.config or {}
        training = config.get("training") if isinstance(config.get("training"), dict) else {}
        metrics = config.get("metrics") if isinstance(config.get("metrics"), dict) else {}
        cert = run.certificate
        versions = dict(cert.versions) if cert else {}
        versions.update({str(k): str(v) for k, v in (config.get("versions") or {}).items()})
        version_keys += [k for k in versions if k not in version_keys]
        sha = config.get("weights_sha256") or (cert.weights_sha256 if cert else None) or ""
        rows.append({
            "model": run.name, "run directory": str(run.path),
            "status": config.get("status", ""), "preset": training.get("preset", ""),
            "optimizer": training.get("optimizer", ""),
            "constraint": training.get("constraint", ""), "w_max": training.get("w_max"),
            "steps": metrics.get("steps", training.get("steps")),
            "seed": config.get("seed", training.get("seed")),
            "device": training.get("device", ""),
            "train time (s)": metrics.get("train_time_s"),
            "val acc": metrics.get("val_acc"),
            "Lipschitz (paper formula)": metrics.get("lipschitz_paper_formula"),
            "certificates": ", ".join(f"{m}: {c.path.name} ({c.method})"
                                      for m, c in run.certificates.items()),
            "certified data": cert.data.get("description", "") if cert else "",
            "date (UTC)": _run_date(run),
            "weights sha256": sha,
            **{f"version {k}": v for k, v in versions.items()},
        })
    columns = list(rows[0]) if rows else []
    for row in rows:
        columns += [k for k in row if k not in columns]
    df = pd.DataFrame(rows, columns=columns)
    return df.astype({c: object for c in df.columns})


def inputs_table(runs: list[RunData]) -> pd.DataFrame:
    """Which of the recognised files each run directory holds (``✓`` or empty), and what
    the report lacks because of the missing ones."""
    rows = []
    for run in runs:
        row = {"model": run.name}
        row.update({f: "✓" if f in run.files else "" for f in RECOGNISED})
        row["missing"] = "; ".join(run.missing)
        rows.append(row)
    df = pd.DataFrame(rows)
    empty = [f for f in RECOGNISED if not (df[f] == "✓").any()] if len(df) else []
    return df.drop(columns=[f for f in empty if f not in ("config.json", "attacks.csv")])

"""Certificates set against attacks: any adversarial example inside a certified ball is a
soundness violation.

A certificate JSON (``lipcert certify``) holds ``norm`` (``"l2"``) and ``samples``, a list
of ``{"index", "label", "pred", "margin", "radius_l2", "radius_linf"}`` where ``index`` is
the sample's position in the dataset's split; it names the model by the sha256 of its
weights. It claims that every input within ``radius_l2`` (L2) of sample ``index``, or
within ``radius_linf`` (L∞), is classified as ``label``.

A violation is a result row with ``success`` (the prediction differs from the label) and
‖δ‖₂ < ``certified_radius_l2``, or ‖δ‖∞ < the certified L∞ radius. A sample misclassified
clean is a success with δ = 0, so a certificate that gives it a positive radius is caught
too. With no violation, certified accuracy at ε can never exceed robust accuracy at ε.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console

from lipcert.errors import LipcertError

__all__ = ["VIOLATION_COLUMNS", "Certificate", "certified_vs_robust", "find_violations",
           "load_certificate", "minimal_violations", "print_violations"]

VIOLATION_COLUMNS = ["model", "attack", "norm", "eps", "index", "label", "pred_adv",
                     "delta_l2", "delta_linf", "certified_radius_l2", "certified_radius_linf",
                     "violation"]


@dataclass
class Certificate:
    """The per-sample radii of a certificate, keyed by dataset index."""

    path: str
    weights_sha256: str | None
    radius_l2: dict[int, float]
    radius_linf: dict[int, float]
    label: dict[int, int]
    raw: dict[str, Any] = field(repr=False)

    def check_model(self, sha256: str | None, model: str) -> None:
        """Raise ``LipcertError`` if the certificate names other weights than ``model``'s."""
        if self.weights_sha256 and sha256 and self.weights_sha256 != sha256:
            raise LipcertError(
                f"certificate {self.path} is for the weights with sha256 "
                f"{self.weights_sha256[:12]}…, but {model} has {sha256[:12]}…: it certifies "
                "a different model"
            )

    def radii(self, indices: list[int], labels: list[int]
              ) -> tuple[np.ndarray, np.ndarray]:
        """L2 and L∞ radii for the samples ``indices`` (NaN where the certificate is silent),
        after checking that the certificate's labels are the data's."""
        for index, label in zip(indices, labels, strict=True):
            if index in self.label and self.label[index] != label:
                raise LipcertError(
                    f"certificate {self.path}: sample {index} has label {self.label[index]} "
                    f"there but {label} in the data: it was made on different data"
                )
        nan = math.nan
        return (np.array([self.radius_l2.get(i, nan) for i in indices], dtype=np.float64),
                np.array([self.radius_linf.get(i, nan) for i in indices], dtype=np.float64))


def _sha256(raw: dict[str, Any]) -> str | None:
    for holder in (raw, raw.get("model") if isinstance(raw.get("model"), dict) else {}):
        for key in ("weights_sha256", "sha256", "model_sha256"):
            if isinstance(holder.get(key), str):
                return holder[key]
    return None


def load_certificate(path: str | Path) -> Certificate:
    """Read and validate a certificate JSON; errors are ``LipcertError``s naming the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as err:
        raise LipcertError(f"cannot read certificate {path}: {err.strerror or err}") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise LipcertError(f"certificate {path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("samples"), list):
        raise LipcertError(f"certificate {path} has no 'samples' list")
    if raw.get("norm", "l2") != "l2":
        raise LipcertError(f"certificate {path}: norm {raw.get('norm')!r} is not supported; "
                           "certificates are in the L2 norm")
    r2: dict[int, float] = {}
    rinf: dict[int, float] = {}
    labels: dict[int, int] = {}
    for k, sample in enumerate(raw["samples"]):
        try:
            index = int(sample["index"])
            r2[index] = float(sample["radius_l2"])
            value = sample.get("radius_linf")
            rinf[index] = math.nan if value is None else float(value)
            labels[index] = int(sample["label"])
        except (KeyError, TypeError, ValueError) as err:
            raise LipcertError(f"certificate {path}: sample {k} is malformed "
                               f"(needs index, label, radius_l2): {err!r}") from err
        if not r2[index] >= 0:
            raise LipcertError(f"certificate {path}: sample {index} has radius {r2[index]}")
    return Certificate(str(path), _sha256(raw), r2, rinf, labels, raw)


def find_violations(df: pd.DataFrame, certificate: Certificate | None = None) -> pd.DataFrame:
    """The rows of a results table that contradict their certified radii.

    Uses ``certified_radius_l2`` from the table and, when ``certificate`` is given, its L∞
    radii too. Returns ``VIOLATION_COLUMNS``; ``violation`` says which radius was broken.
    """
    linf = (df["index"].map(certificate.radius_linf).astype("float64")
            if certificate is not None else pd.Series(np.nan, index=df.index))
    out = df.assign(certified_radius_linf=linf)
    in_l2 = out["success"] & (out["delta_l2"] < out["certified_radius_l2"])
    in_linf = out["success"] & (out["delta_linf"] < out["certified_radius_linf"])
    out = out[in_l2 | in_linf].copy()
    out["violation"] = np.where(in_l2[out.index] & in_linf[out.index], "l2,linf",
                                np.where(in_l2[out.index], "l2", "linf"))
    return out[VIOLATION_COLUMNS].reset_index(drop=True)


def minimal_violations(minimal: pd.DataFrame) -> pd.DataFrame:
    """Violations among minimal perturbations (``attacks.minimal``): an empirical radius
    below the certified one. Returned with ``VIOLATION_COLUMNS`` (attack
    ``minimal:<method>``, norm ``l2``, no ε)."""
    bad = minimal[minimal["radius_l2"] < minimal["certified_radius_l2"]]
    return pd.DataFrame({
        "model": bad["model"], "attack": "minimal:" + bad["method"].astype(str),
        "norm": "l2", "eps": np.nan, "index": bad["index"], "label": bad["label"],
        "pred_adv": -1, "delta_l2": bad["radius_l2"], "delta_linf": np.nan,
        "certified_radius_l2": bad["certified_radius_l2"], "certified_radius_linf": np.nan,
        "violation": "l2",
    }, columns=VIOLATION_COLUMNS).reset_index(drop=True)


def print_violations(violations: pd.DataFrame, console: Console | None = None,
                     limit: int = 20) -> None:
    """Print violations loudly (to stderr); nothing when there are none."""
    if violations.empty:
        return
    console = console or Console(stderr=True, soft_wrap=True)
    console.print(f"[bold red]CERTIFICATE VIOLATION: {len(violations)} adversarial example(s) "
                  "lie inside their certified radius. The certificate is unsound (or was "
                  "made for another model or data).[/bold red]")
    for row in violations.head(limit).itertuples():
        eps = "" if pd.isna(row.eps) else f" {row.norm} ε={row.eps:.4g}"
        pred = f" → {row.pred_adv}" if row.pred_adv >= 0 else ""
        size = (f"‖δ‖₂ = {row.delta_l2:.6g} < certified {row.certified_radius_l2:.6g}"
                if "l2" in row.violation else
                f"‖δ‖∞ = {row.delta_linf:.6g} < certified {row.certified_radius_linf:.6g}")
        console.print(f"[red]  {row.model} {row.attack}{eps} sample {row.index}: label "
                      f"{row.label}{pred}, {size}[/red]")
    if len(violations) > limit:
        console.print(f"[red]  … and {len(violations) - limit} more[/red]")


def certified_vs_robust(df: pd.DataFrame, certificate: Certificate | None = None
                        ) -> pd.DataFrame:
    """Per (model, norm, ε): certified accuracy (radius > ε; L∞ rows use the certificate's
    L∞ radii) next to robust accuracy (worst case over attacks). Samples without a
    certified radius are left out of both. ``consistent`` is certified ≤ robust."""
    per_sample = df.groupby(["model", "norm", "eps", "index"], sort=False).agg(
        broken=("success", "any"), r2=("certified_radius_l2", "first")).reset_index()
    if certificate is not None:
        per_sample["rinf"] = per_sample["index"].map(certificate.radius_linf).astype(float)
    else:
        per_sample["rinf"] = np.nan
    per_sample["radius"] = np.where(per_sample["norm"] == "l2", per_sample["r2"],
                                    per_sample["rinf"])
    per_sample = per_sample[per_sample["radius"].notna()]
    per_sample = per_sample.assign(certified=per_sample["radius"] > per_sample["eps"],
                                   robust=~per_sample["broken"])
    table = per_sample.groupby(["model", "norm", "eps"], sort=False).agg(
        n=("index", "size"), certified_accuracy=("certified", "mean"),
        robust_accuracy=("robust", "mean")).reset_index()
    table["consistent"] = table["certified_accuracy"] <= table["robust_accuracy"]
    return table

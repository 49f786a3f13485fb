"""Reading run directories: whatever exists of ``config.json``, ``train_log.csv``, the
certificates, ``attacks.csv`` and the minimal-perturbation table.

Every file is validated as it is read; a malformed file raises ``LipcertError`` naming the
file and what is wrong with it. A missing file is not an error: it is recorded in
``RunData.missing`` so that the report can say what it could not show.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from safetensors import SafetensorError, safe_open

from lipcert.certificate import Certificate
from lipcert.errors import LipcertError

__all__ = ["ATTACK_COLUMNS", "CertificateData", "RunData", "load_run", "load_runs"]

CONFIG = "config.json"
TRAIN_LOG = "train_log.csv"
WEIGHTS = "model.safetensors"
CERTIFICATE_FILES = {"global": "certificate-global.json", "local": "certificate-local.json",
                     "margin": "certificate-margin.json"}
GENERIC_CERTIFICATE = "certificate.json"
ATTACKS = "attacks.csv"
MINIMAL_FILES = ("minimal.csv", "attacks.minimal.csv")
RECOGNISED = (CONFIG, TRAIN_LOG, GENERIC_CERTIFICATE, *CERTIFICATE_FILES.values(), ATTACKS,
              *MINIMAL_FILES)

ATTACK_COLUMNS = ["model", "attack", "norm", "eps", "index", "label", "pred_clean", "pred_adv",
                  "success", "delta_l2", "delta_linf"]
LOG_COLUMNS = ["step", "loss"]
_LOG_OPTIONAL = ["train_acc", "lr", "val_loss", "val_acc", "elapsed_s"]
_NORMS = {"l2": "l2", "linf": "linf", "l_inf": "linf", "inf": "linf", "l∞": "linf"}
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f", ""}
_SAMPLE_COLUMNS = ["index", "label", "pred", "margin", "radius_l2", "radius_linf", "lipschitz"]


@dataclass
class CertificateData:
    """One certificate JSON (``lipcert certify``), with its numbers parsed (``"inf"`` → ∞)."""

    path: Path
    mode: str
    method: str
    upper: float
    lower: float
    lower_method: str
    input_elements: int | None
    layers: pd.DataFrame
    samples: pd.DataFrame
    certified_accuracy: list[tuple[float, float]]
    radius_convention: str
    weights_sha256: str | None
    versions: dict[str, str]
    data: dict[str, Any]


@dataclass
class RunData:
    """Everything found in one run directory. ``name`` identifies the model in the report."""

    name: str
    path: Path
    config: dict[str, Any] | None = None
    train_log: pd.DataFrame | None = None
    certificates: dict[str, CertificateData] = field(default_factory=dict)
    attacks: pd.DataFrame | None = None
    minimal: pd.DataFrame | None = None
    weights_params: int | None = None
    files: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def certificate(self) -> CertificateData | None:
        """The global certificate if there is one, else any (for layers and clean accuracy)."""
        return self.certificates.get("global") or next(iter(self.certificates.values()), None)


def load_runs(run_dirs: list[str | Path]) -> list[RunData]:
    """Read every run directory; model names are the directory names, made unique."""
    if not run_dirs:
        raise LipcertError("no run directories given")
    paths = [Path(p) for p in run_dirs]
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise LipcertError("the same run directory is given twice")
    names = [p.name for p in resolved]
    for i, p in enumerate(resolved):
        if names.count(p.name) > 1:
            names[i] = f"{p.parent.name}/{p.name}"
    if len(set(names)) != len(names):
        names = [str(p) for p in resolved]
    return [load_run(p, name) for p, name in zip(paths, names, strict=True)]


def load_run(run_dir: str | Path, name: str | None = None) -> RunData:
    """Read one run directory (see the module docstring)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise LipcertError(f"{path} is not a directory")
    present = [f for f in RECOGNISED if (path / f).is_file()]
    if not present:
        raise LipcertError(
            f"{path} holds nothing lipcert can report on: expected at least one of "
            f"{', '.join(RECOGNISED)}"
        )
    run = RunData(name=name or path.resolve().name, path=path)
    run.files = {f: f for f in present}
    if (path / CONFIG).is_file():
        run.config = _read_json(path / CONFIG)
    else:
        run.missing.append(f"{CONFIG} (no model details, seeds or training metrics)")
    if (path / TRAIN_LOG).is_file():
        run.train_log = read_train_log(path / TRAIN_LOG)
    else:
        run.missing.append(f"{TRAIN_LOG} (no training curves)")
    _load_certificates(run)
    if (path / ATTACKS).is_file():
        run.attacks = _own_rows(read_attacks(path / ATTACKS), run, path / ATTACKS)
        if run.attacks.empty:
            run.missing.append(f"rows in {ATTACKS} (it has only its header)")
    else:
        run.missing.append(f"{ATTACKS} (no robust accuracy under attack)")
    minimal = next((path / f for f in MINIMAL_FILES if (path / f).is_file()), None)
    if minimal is not None:
        run.minimal = _own_rows(read_minimal(minimal), run, minimal)
    elif run.attacks is not None:
        run.missing.append(f"{MINIMAL_FILES[0]} (smallest perturbations taken from attacks.csv)")
    run.weights_params = _safetensors_params(path / WEIGHTS)
    _check_identity(run)
    return run


def _load_certificates(run: RunData) -> None:
    for mode, filename in CERTIFICATE_FILES.items():
        if (run.path / filename).is_file():
            cert = read_certificate(run.path / filename)
            if cert.mode != mode:
                run.warnings.append(f"{filename} says its mode is {cert.mode!r}")
            run.certificates.setdefault(cert.mode, cert)
    generic = run.path / GENERIC_CERTIFICATE
    if generic.is_file():
        cert = read_certificate(generic)
        if cert.mode in run.certificates:
            run.warnings.append(f"{GENERIC_CERTIFICATE} ignored: "
                                f"{CERTIFICATE_FILES.get(cert.mode, cert.mode)} is used instead")
        else:
            run.certificates[cert.mode] = cert
    run.certificates = {m: run.certificates[m] for m in sorted(run.certificates,
                                                                key=_mode_order)}
    if not run.certificates:
        run.missing.append("certificate-global.json / certificate-local.json / "
                           "certificate.json (no certified bounds or radii)")
    elif not {"local", "margin"} & set(run.certificates):
        run.missing.append(f"{CERTIFICATE_FILES['local']} (no local certificate)")
    elif "global" not in run.certificates:
        run.missing.append(f"{CERTIFICATE_FILES['global']} (no global certificate)")


def _mode_order(mode: str) -> tuple[int, str]:
    return ({"global": 0, "local": 1, "margin": 2}.get(mode, 3), mode)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LipcertError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(document, dict):
        raise LipcertError(f"{path} must hold a JSON object, not {type(document).__name__}")
    return document


def read_certificate(path: Path) -> CertificateData:
    """Read and validate a certificate JSON (``lipcert.certificate.Certificate.load``) and
    tabulate it."""
    cert = Certificate.load(path)
    layers = pd.DataFrame([(r.name, r.kind_of_layer, r.upper, r.kind, r.params)
                           for r in cert.layers],
                          columns=["layer", "kind_of_layer", "upper", "kind", "params"])
    samples = pd.DataFrame([[getattr(s, c) for c in _SAMPLE_COLUMNS] for s in cert.samples],
                           columns=_SAMPLE_COLUMNS)
    return CertificateData(
        path=path, mode=cert.mode, method=cert.method, upper=cert.lipschitz_upper,
        lower=math.nan if cert.lipschitz_lower is None else cert.lipschitz_lower,
        lower_method=cert.lower_method or "", input_elements=cert.input_elements,
        layers=layers, samples=samples,
        certified_accuracy=[(row["eps"], row["accuracy"]) for row in cert.certified_accuracy],
        radius_convention=cert.radius_convention, weights_sha256=cert.weights_sha256,
        versions=dict(cert.versions or {}), data=dict(cert.data or {}),
    )


def _read_csv(path: Path, required: list[str], what: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError as err:
        raise LipcertError(f"{path} is empty: expected a {what} with the columns "
                           f"{', '.join(required)}") from err
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise LipcertError(f"cannot read {path}: {err}") from err
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise LipcertError(f"{path} is not a valid {what}: it lacks the column(s) "
                           f"{', '.join(missing)} (found: {', '.join(df.columns)})")
    return df


def _numeric(df: pd.DataFrame, columns: list[str], path: Path) -> None:
    for c in columns:
        try:
            df[c] = pd.to_numeric(df[c].replace({"inf": math.inf, "-inf": -math.inf}))
        except (ValueError, TypeError) as err:
            raise LipcertError(f"{path}: column {c} holds non-numbers: {err}") from err


def _bools(series: pd.Series, path: Path, column: str) -> pd.Series:
    if series.dtype == bool:
        return series
    text = series.fillna("").astype(str).str.strip().str.lower()
    bad = sorted(set(text) - _TRUE - _FALSE)
    if bad:
        raise LipcertError(f"{path}: column {column} must be true/false, found {bad[0]!r}")
    return text.isin(_TRUE)


def read_train_log(path: Path) -> pd.DataFrame:
    """``train_log.csv``: ``step`` and ``loss`` are required, the other columns optional."""
    df = _read_csv(path, LOG_COLUMNS, "training log")
    for c in _LOG_OPTIONAL:
        if c not in df.columns:
            df[c] = math.nan
    _numeric(df, LOG_COLUMNS + _LOG_OPTIONAL, path)
    return df[LOG_COLUMNS + _LOG_OPTIONAL].sort_values("step", kind="stable").reset_index(
        drop=True)


def read_attacks(path: Path) -> pd.DataFrame:
    """``attacks.csv``; adds ``violation_flag`` (from an optional ``violation`` column)."""
    df = _read_csv(path, ATTACK_COLUMNS, "attack results table")
    df["model"] = df["model"].astype(str)
    df["attack"] = df["attack"].astype(str)
    norms = df["norm"].astype(str).str.strip().str.lower()
    unknown = sorted(set(norms) - set(_NORMS))
    if unknown:
        raise LipcertError(f"{path}: unknown norm {unknown[0]!r} (expected l2 or linf)")
    df["norm"] = norms.map(_NORMS)
    if "certified_radius_l2" not in df.columns:
        df["certified_radius_l2"] = math.nan
    _numeric(df, ["eps", "index", "label", "pred_clean", "pred_adv", "delta_l2", "delta_linf",
                  "certified_radius_l2"], path)
    df["success"] = _bools(df["success"], path, "success")
    if "violation" in df.columns:
        flag = df["violation"].fillna("").astype(str).str.strip().str.lower()
        df["violation_flag"] = ~flag.isin(_FALSE | {"none", "nan"})
    else:
        df["violation_flag"] = False
    df["index"] = df["index"].astype("int64")
    return df


def read_minimal(path: Path) -> pd.DataFrame:
    """The per-sample smallest adversarial L2 perturbation: columns ``index`` and
    ``min_delta_l2`` (or ``radius_l2`` as ``lipcert attack --minimal`` writes), optionally
    ``model``, ``label`` and ``attack`` (or ``method``). Returned with the columns
    model, index, min_delta_l2, attack (empty distance: none found)."""
    df = _read_csv(path, ["index"], "minimal-perturbation table")
    distance = next((c for c in ("min_delta_l2", "radius_l2") if c in df.columns), None)
    if distance is None:
        raise LipcertError(f"{path} is not a valid minimal-perturbation table: it lacks the "
                           f"column min_delta_l2 (found: {', '.join(df.columns)})")
    method = next((c for c in ("attack", "method") if c in df.columns), None)
    out = pd.DataFrame({
        "model": df["model"].astype(str) if "model" in df.columns else "",
        "index": df["index"],
        "min_delta_l2": df[distance],
        "attack": df[method].fillna("").astype(str) if method else "",
    })
    _numeric(out, ["index", "min_delta_l2"], path)
    out["index"] = out["index"].astype("int64")
    return out


def _own_rows(df: pd.DataFrame, run: RunData, path: Path) -> pd.DataFrame:
    """The rows of a table that belong to this run's model (a file may hold several)."""
    models = sorted(set(df["model"])) if len(df) else []
    if len(models) <= 1:
        return df.reset_index(drop=True)
    own = {run.name, run.path.resolve().name, str(run.path)}
    rows = df[df["model"].isin(own)]
    if rows.empty:
        raise LipcertError(f"{path} holds results for {', '.join(models)}, none of which is "
                           f"this run ({run.name})")
    return rows.reset_index(drop=True)


def _safetensors_params(path: Path) -> int | None:
    """The number of parameters listed in a safetensors file's header (only the header is
    read: safe, and cheap for any file size); None for a missing or unreadable file."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            names = f.keys()  # safe_open is not iterable
            return sum(math.prod(f.get_slice(name).get_shape()) for name in names)
    except (OSError, SafetensorError):
        return None


def _check_identity(run: RunData) -> None:
    recorded = (run.config or {}).get("weights_sha256")
    for cert in run.certificates.values():
        if recorded and cert.weights_sha256 and cert.weights_sha256 != recorded:
            run.warnings.append(
                f"{cert.path.name} certifies weights with sha256 {cert.weights_sha256[:12]}…, "
                f"but {CONFIG} records {recorded[:12]}…: it may be for another model")

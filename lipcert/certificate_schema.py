"""What a certificate holds, and its JSON document: :meth:`Certificate.to_json` writes it,
:meth:`Certificate.from_json` reads and validates it (its inverse), :meth:`Certificate.load`
reads a file. Everything that reads certificate JSON goes through ``from_json``.

The document, in this key order::

    norm                "l2" (the only norm)
    radius_convention   RADIUS_CONVENTION
    mode                "global", "local" or "margin"
    method              how weight norms were certified ("exact" or "gram")
    input_elements      n, the number of input elements of one sample
    lipschitz           {upper, lower, ratio[, local_upper {min, median, max}]
                         [, lower_method][, lower_search {how the lower bound's search went}]}
    layers              [{name, kind_of_layer, upper, kind, params}]
    samples             [{index, label, pred, margin, radius_l2, radius_linf, lipschitz,
                         radius_method}]
    certified_accuracy  [{eps, accuracy}]
    timing_s            {stage: seconds}
    kinds               what "upper" and "lower" mean (KINDS)
    model               {source, kind, weights_sha256}      (when known)
    data                {dataset, n, description}            (when known)
    versions            {package: version}                   (when known)

Non-finite numbers (Lipschitz bounds, margins, radii) are written as the strings "inf" /
"-inf" (JSON has no infinity); ``lower``, ``ratio`` and ``weights_sha256`` may be null.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lipcert.bounds import LayerBound
from lipcert.errors import LipcertError

RADIUS_CONVENTION = "r = (z_y - max_{j!=y} z_j) / (sqrt(2) * L)"
KINDS = {"upper": "certified upper bound",
         "lower": "empirical witness (a Jacobian norm measured at some input)"}
MODES = ("global", "local", "margin")

__all__ = ["KINDS", "MODES", "RADIUS_CONVENTION", "Certificate", "LayerBound", "ModelIdentity",
           "SampleCertificate"]


@dataclass
class SampleCertificate:
    """Per-sample result; ``lipschitz`` is the (upper) bound L that certified ``radius_l2``
    and ``radius_method`` the certificate that gave the radius: "global" (r = m/(√2·L)),
    "local" (the largest r with m ≥ √2·L(x, r)·r) or "margin" (margin-gradient bounds,
    ``lipcert.bounds.backward``). Every method is sound; the largest radius is kept."""

    index: int
    label: int
    pred: int
    margin: float
    radius_l2: float
    radius_linf: float
    lipschitz: float
    radius_method: str = "global"


@dataclass
class ModelIdentity:
    """Which model a certificate is for: where it was loaded from, its form ("run", "pt2"
    or "factory") and the sha256 of its weights (None when unknown)."""

    source: str
    kind: str
    weights_sha256: str | None


@dataclass
class Certificate:
    """A certificate for one model and data set (see the module docstring)."""

    mode: str
    method: str
    lipschitz_upper: float
    layers: list[LayerBound]
    samples: list[SampleCertificate]
    certified_accuracy: list[dict[str, float]]
    input_elements: int
    timing_s: dict[str, float] = field(default_factory=dict)
    lipschitz_lower: float | None = None
    norm: str = "l2"
    radius_convention: str = RADIUS_CONVENTION
    lower_method: str | None = None
    lower_search: dict[str, Any] | None = None
    model: ModelIdentity | None = None
    data: dict[str, Any] | None = None
    versions: dict[str, str] | None = None

    @property
    def ratio(self) -> float | None:
        if self.lipschitz_lower is None or self.lipschitz_lower <= 0:
            return None
        return self.lipschitz_upper / self.lipschitz_lower

    @property
    def weights_sha256(self) -> str | None:
        """The sha256 of the certified weights, when the certificate names them."""
        return None if self.model is None else self.model.weights_sha256

    def with_lower(self, lower: float | None) -> Certificate:
        """The same certificate with an empirical lower bound (kind ``lower``) attached."""
        return replace(self, lipschitz_lower=None if lower is None else float(lower))

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        """The JSON document (module docstring)."""
        lipschitz: dict[str, Any] = {
            "upper": _num(self.lipschitz_upper),
            "lower": _num(self.lipschitz_lower),
            "ratio": _num(self.ratio),
        }
        out: dict[str, Any] = {
            "norm": self.norm,
            "radius_convention": self.radius_convention,
            "mode": self.mode,
            "method": self.method,
            "input_elements": self.input_elements,
            "lipschitz": lipschitz,
            "layers": [{**asdict(r), "upper": _num(r.upper)} for r in self.layers],
            "samples": [
                {**asdict(s), "margin": _num(s.margin), "radius_l2": _num(s.radius_l2),
                 "radius_linf": _num(s.radius_linf), "lipschitz": _num(s.lipschitz)}
                for s in self.samples
            ],
            "certified_accuracy": self.certified_accuracy,
            "timing_s": self.timing_s,
            "kinds": dict(KINDS),
        }
        local = [s.lipschitz for s in self.samples]
        if self.mode != "global" and local:
            lipschitz["local_upper"] = {
                "min": _num(min(local)),
                "median": _num(statistics.median_low(local)),
                "max": _num(max(local)),
            }
        if self.lower_method is not None:
            lipschitz["lower_method"] = self.lower_method
        if self.lower_search is not None:
            lipschitz["lower_search"] = self.lower_search
        if self.model is not None:
            out["model"] = asdict(self.model)
        if self.data is not None:
            out["data"] = self.data
        if self.versions is not None:
            out["versions"] = self.versions
        return out

    @classmethod
    def from_json(cls, doc: Any, source: str = "certificate") -> Certificate:
        """Read and validate a document written by :meth:`to_json` (``source`` names it in
        errors). Every error is a one-line ``LipcertError``."""
        if not isinstance(doc, dict):
            raise LipcertError(f"{source} must hold a JSON object, not {type(doc).__name__}")
        lip = doc.get("lipschitz")
        if not isinstance(lip, dict) or "upper" not in lip:
            raise LipcertError(f"{source} is not a lipcert certificate: no 'lipschitz.upper'")
        upper = _number(lip["upper"], f"{source}: lipschitz.upper")
        lower = lip.get("lower")
        lower = None if lower is None else _number(lower, f"{source}: lipschitz.lower")
        r = _Reader(doc, source)
        norm = r.get("norm", str)
        if norm != "l2":
            raise LipcertError(f"{source}: norm {norm!r} is not supported; certificates are "
                               "in the L2 norm")
        mode = r.get("mode", str)
        if mode not in MODES:
            raise LipcertError(f"{source}: unknown mode {mode!r} (expected global or local)")
        lower_method = lip.get("lower_method")
        if lower_method is not None and not isinstance(lower_method, str):
            raise LipcertError(f"{source}: lipschitz.lower_method must be a string")
        lower_search = lip.get("lower_search")
        if lower_search is not None and not isinstance(lower_search, dict):
            raise LipcertError(f"{source}: lipschitz.lower_search must be an object")
        return cls(
            mode=mode,
            method=r.get("method", str),
            lipschitz_upper=upper,
            layers=[_layer(x, k, source) for k, x in enumerate(r.get("layers", list))],
            samples=[_sample(x, k, source) for k, x in enumerate(r.get("samples", list))],
            certified_accuracy=[_accuracy(x, source)
                                for x in r.get("certified_accuracy", list)],
            input_elements=r.get("input_elements", int),
            timing_s={str(k): _number(v, f"{source}: timing_s.{k}")
                      for k, v in r.get("timing_s", dict, {}).items()},
            lipschitz_lower=lower,
            norm=norm,
            radius_convention=r.get("radius_convention", str),
            lower_method=lower_method,
            lower_search=lower_search,
            model=_model(r.get("model", dict, None), source),
            data=r.get("data", dict, None),
            versions=_versions(r.get("versions", dict, None), source),
        )

    @classmethod
    def load(cls, path: str | Path) -> Certificate:
        """:meth:`from_json` of a JSON file; errors are ``LipcertError``s naming the file."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise LipcertError(f"cannot read certificate {path}: {err.strerror or err}") from err
        except (ValueError, UnicodeDecodeError) as err:
            raise LipcertError(f"certificate {path} is not valid JSON: {err}") from err
        return cls.from_json(doc, f"certificate {path}")

    # ------------------------------------------------------------------ text

    def format_table(self) -> str:
        """The per-layer table and the summary as plain text (for the terminal)."""
        w = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{w}}  {'kind_of_layer':<16} {'upper':>12}  {'params':>10}"]
        for r in self.layers:
            lines.append(f"{r.name:<{w}}  {r.kind_of_layer:<16} {r.upper:>12.5g}  {r.params:>10}")
        lines.append(f"Lipschitz upper bound of the logits (L2, {self.mode}): "
                     f"{self.lipschitz_upper:.6g}")
        if self.lipschitz_lower is not None:
            ratio = "n/a" if self.ratio is None else f"{self.ratio:.3g}"
            lines.append(f"empirical lower bound: {self.lipschitz_lower:.6g}  (ratio {ratio})")
        for row in self.certified_accuracy:
            lines.append(f"certified accuracy at eps={row['eps']:g}: {row['accuracy']:.4f}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- numbers


def _num(x: float | None) -> float | str | None:
    """A number for the document: ±inf as a string (JSON has no infinity)."""
    if x is None:
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(x)


def _number(value: Any, where: str) -> float:
    """A JSON number, or "inf" / "-inf" / "nan" as :func:`_num` writes non-finite values."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("inf", "-inf", "nan"):
        return float(value.strip().lower())
    raise LipcertError(f"{where}: expected a number, found {value!r}")


# --------------------------------------------------------------------------- fields


class _Reader:
    """Typed access to the top-level keys of a document, with one-line errors."""

    def __init__(self, doc: dict[str, Any], source: str) -> None:
        self.doc, self.source = doc, source

    def get(self, key: str, kind: type, *default: Any) -> Any:
        if key not in self.doc:
            if default:
                return default[0]
            raise LipcertError(f"{self.source} is not a lipcert certificate: no '{key}'")
        value = self.doc[key]
        if value is None and default:
            return default[0]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise LipcertError(f"{self.source}: '{key}' must be a {kind.__name__}, "
                               f"found {value!r:.60}")
        return value


def _layer(x: Any, k: int, source: str) -> LayerBound:
    try:
        return LayerBound(name=str(x["name"]), kind_of_layer=str(x["kind_of_layer"]),
                          upper=_number(x["upper"], f"{source}: layer {k} upper"),
                          kind=str(x["kind"]), params=int(x["params"]))
    except (KeyError, TypeError, ValueError) as err:
        raise LipcertError(f"{source}: layer {k} is malformed (needs name, kind_of_layer, "
                           f"upper, kind, params): {err!r}") from err


def _sample(x: Any, k: int, source: str) -> SampleCertificate:
    try:
        s = SampleCertificate(
            index=int(x["index"]), label=int(x["label"]), pred=int(x["pred"]),
            **{c: _number(x[c], f"{source}: sample {k} {c}")
               for c in ("margin", "radius_l2", "radius_linf", "lipschitz")},
            radius_method=str(x.get("radius_method", "global")))
    except (KeyError, TypeError, ValueError) as err:
        raise LipcertError(f"{source}: sample {k} is malformed (needs index, label, pred, "
                           f"margin, radius_l2, radius_linf, lipschitz): {err!r}") from err
    if not (s.radius_l2 >= 0 and s.radius_linf >= 0):
        raise LipcertError(f"{source}: sample {s.index} has radius {s.radius_l2} "
                           f"(L∞ {s.radius_linf}); radii are ≥ 0")
    return s


def _accuracy(x: Any, source: str) -> dict[str, float]:
    try:
        return {"eps": _number(x["eps"], f"{source}: certified_accuracy eps"),
                "accuracy": _number(x["accuracy"], f"{source}: certified_accuracy")}
    except (KeyError, TypeError) as err:
        raise LipcertError(f"{source}: malformed certified_accuracy row {x!r:.80}") from err


def _model(x: dict[str, Any] | None, source: str) -> ModelIdentity | None:
    if x is None:
        return None
    sha = x.get("weights_sha256")
    if not (isinstance(x.get("source"), str) and isinstance(x.get("kind"), str)
            and (sha is None or isinstance(sha, str))):
        raise LipcertError(f"{source}: 'model' must hold source, kind and weights_sha256 "
                           f"(strings; the sha256 may be null), found {x!r:.120}")
    return ModelIdentity(x["source"], x["kind"], sha)


def _versions(x: dict[str, Any] | None, source: str) -> dict[str, str] | None:
    if x is not None and not all(isinstance(v, str) for v in x.values()):
        raise LipcertError(f"{source}: 'versions' must map package names to strings")
    return x

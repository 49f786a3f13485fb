"""The user's own samples and input domain: ``--inputs``, ``--domain``, ``--embedding-table``.

* ``--inputs FILE.safetensors`` holds exactly two tensors: ``x`` (N, ...) floating point,
  finite, the model's inputs, and ``y`` (N,) integer class labels. For a text model exported
  on ``inputs_embeds``, x holds embedded sequences (N, T, d) and y the next-token labels.
* ``--domain`` is the input set the global bound holds on (and the set attacks and local
  balls stay in): ``box:LO,HI`` (every element in [LO, HI]), ``embedding-ball:R`` (every
  token, the vectors along the last dimension, of L2 norm ≤ R) or ``none`` (unbounded).
* ``--embedding-table FILE.safetensors`` (one 2-D tensor, a vocabulary's embedding rows) is
  ``embedding-ball:R`` with R the table's largest row norm, rounded up: every sequence of
  table rows lies in that set.

Every check raises a one-line ``LipcertError`` naming the file and what is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lipcert.bounds import BoxDomain, EmbeddingDomain
from lipcert.errors import LipcertError

__all__ = ["DOMAIN_FORMS", "UserInputs", "check_in_domain", "check_labels", "describe_domain",
           "domain_from_table", "load_inputs", "parse_domain", "resolve_domain"]

DOMAIN_FORMS = "box:LO,HI, embedding-ball:R or none"
# The float64 row norms of a float32 table are exact up to a relative 2⁻⁵² or so; rounding
# the largest up by 1e-12 keeps every row inside the ball.
_NORM_SLACK = 1e-12


@dataclass
class UserInputs:
    """Validated samples from ``--inputs``: ``x`` float32 (N, ...), ``y`` int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor
    path: Path


def _read(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise LipcertError(f"{what} file {path} does not exist")
    if path.suffix.lower() != ".safetensors":
        raise LipcertError(f"{what} file {path}: expected a .safetensors file")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LipcertError(f"{path} is not a readable safetensors file: {first}") from err


def load_inputs(path: str | Path) -> UserInputs:
    """Read and validate ``--inputs`` (module docstring): exactly the tensors ``x`` and
    ``y``; x floating point, finite, with a batch dimension; y integer, one label ≥ 0 per
    sample. The label range against the model's classes is checked by the caller."""
    tensors = _read(path, "--inputs")
    if set(tensors) != {"x", "y"}:
        raise LipcertError(f"{path}: expected exactly the tensors 'x' and 'y', found "
                           f"{sorted(tensors) or 'none'}")
    x, y = tensors["x"], tensors["y"]
    if not x.is_floating_point():
        raise LipcertError(f"{path}: x must be floating point, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise LipcertError(f"{path}: x must have shape (N, ...) with N ≥ 1 samples and at "
                           f"least one more dimension, got {tuple(x.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise LipcertError(f"{path}: y must hold integer class labels, got {y.dtype}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise LipcertError(f"{path}: y must have shape ({x.shape[0]},), one label per sample "
                           f"of x, got {tuple(y.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise LipcertError(f"{path}: x contains NaN or Inf values")
    if bool((y < 0).any()):
        raise LipcertError(f"{path}: y contains negative labels (min {int(y.min())})")
    return UserInputs(x.to(torch.float32), y.to(torch.int64), Path(path))


def check_labels(inputs: UserInputs, num_classes: int) -> None:
    """Every label indexes one of the model's ``num_classes`` logits."""
    top = int(inputs.y.max())
    if top >= num_classes:
        raise LipcertError(f"{inputs.path}: label {top} is out of range for a model with "
                           f"{num_classes} classes (labels must be 0..{num_classes - 1})")


def check_in_domain(inputs: UserInputs, x: torch.Tensor,
                    domain: BoxDomain | EmbeddingDomain) -> None:
    """Every sample of ``x`` (the inputs in the model's shape) lies in ``domain``: each
    element in [lo, hi] for a box, each token (last dimension) of norm ≤ R for a ball."""
    if isinstance(domain, EmbeddingDomain):
        largest = float(torch.linalg.vector_norm(x.to(torch.float64), dim=-1).max())
        if largest > domain.max_norm:
            raise LipcertError(f"{inputs.path}: tokens of norm up to {largest:.6g} lie outside "
                               f"the input domain {describe_domain(domain)}")
        return
    lo, hi = float(x.min()), float(x.max())
    if lo < domain.lo or hi > domain.hi:
        raise LipcertError(f"{inputs.path}: x has values in [{lo:.6g}, {hi:.6g}], outside the "
                           f"input domain {describe_domain(domain)}")


def parse_domain(text: str) -> BoxDomain | EmbeddingDomain:
    """``box:LO,HI`` → BoxDomain(LO, HI) (finite, LO < HI); ``embedding-ball:R`` →
    EmbeddingDomain(R) (finite, R > 0); ``none`` → the unbounded box."""
    kind, _, rest = text.strip().partition(":")
    kind = kind.strip().lower()
    try:
        if kind == "none" and not rest:
            return BoxDomain(-math.inf, math.inf)
        if kind == "box":
            lo_text, hi_text = rest.split(",")
            lo, hi = float(lo_text), float(hi_text)
            if math.isfinite(lo) and math.isfinite(hi) and lo < hi:
                return BoxDomain(lo, hi)
        elif kind == "embedding-ball":
            radius = float(rest)
            if math.isfinite(radius) and radius > 0:
                return EmbeddingDomain(radius)
    except ValueError:
        pass
    raise LipcertError(f"--domain {text!r}: expected {DOMAIN_FORMS} (finite LO < HI, R > 0)")


def domain_from_table(path: str | Path) -> EmbeddingDomain:
    """The ball of the largest row norm of the embedding table in ``path`` (its one 2-D
    tensor), rounded up so that every row lies inside."""
    tensors = _read(path, "--embedding-table")
    tables = {k: v for k, v in tensors.items() if v.dim() == 2 and v.is_floating_point()}
    if len(tables) != 1:
        raise LipcertError(f"{path}: expected one 2-D floating-point tensor (the embedding "
                           f"table), found {sorted(tables) or 'none'}")
    (name, table), = tables.items()
    if table.shape[0] == 0 or not bool(torch.isfinite(table).all()):
        raise LipcertError(f"{path}: the embedding table {name!r} is empty or not finite")
    largest = float(torch.linalg.vector_norm(table.to(torch.float64), dim=1).max())
    return EmbeddingDomain(largest * (1 + _NORM_SLACK))


def resolve_domain(domain: str | None, embedding_table: str | Path | None
                   ) -> BoxDomain | EmbeddingDomain | None:
    """The domain of ``--domain`` or ``--embedding-table`` (at most one), or ``None``."""
    if domain is not None and embedding_table is not None:
        raise LipcertError("give either --domain or --embedding-table, not both")
    if embedding_table is not None:
        return domain_from_table(embedding_table)
    return None if domain is None else parse_domain(domain)


def describe_domain(domain: BoxDomain | EmbeddingDomain) -> str:
    """The domain as ``--domain`` writes it (the radius to full precision)."""
    if isinstance(domain, EmbeddingDomain):
        return f"embedding-ball:{domain.max_norm!r}"
    if math.isinf(domain.lo) and math.isinf(domain.hi):
        return "none"
    return f"box:{domain.lo!r},{domain.hi!r}"

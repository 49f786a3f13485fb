"""What a graph node carries during bound propagation, and the per-sample bookkeeping.

Notation: the model input is a batch of ``n`` samples; every per-sample scalar is a float64
tensor of shape ``(n,)``. For one sample s the *input set* S_s is the whole input domain
(global mode) or the L2 ball of radius r_s around the sample, intersected with the domain
(local mode). For a node with output Y (a tensor function of the input):

* ``lip[s]``      ≥ sup ‖Y(x) − Y(x')‖₂ / ‖x − x'‖₂ over x, x' ∈ S_s (sample s perturbed,
                    whole-tensor L2 norms restricted to sample s's part of Y);
* ``lip_tok[s]``  the same with Y measured in the max-token norm ‖Y‖_{2,∞} = max over rows of
                    the L2 norm along the LAST dimension (≤ ``lip``);
* ``lo``, ``hi``  elementwise bounds of Y over S (same shape as Y, float64);
* ``norm[s]``, ``tok_norm[s]``  upper bounds of ‖Y‖₂ and ‖Y‖_{2,∞} over S_s;
* ``value``       Y at the centre inputs (local mode only);
* ``sid``         which sample each element belongs to (int64, same shape as Y, possibly an
                    expanded view), ``-1`` for elements that depend on no sample (constants
                    mixed in by ``cat`` and the like), or ``None`` when n = 1.

Rules never mix samples: an operation that would combine elements of different samples
raises :class:`~lipcert.bounds.errors.BatchMixingError`. Because ``sid`` is moved by shape
operations exactly like the data, the batch may travel to any dimension (``nn.MultiheadAttention``
moves it to dim 1 and merges it with the heads) and bounds stay per sample.

Floating point: bounds are computed in float64. Interval endpoints are widened outwards by a
few ulps after every rule (``finalize`` in ``propagate.py``), dot products by γ_k·Σ|a||b|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from lipcert import spectral
from lipcert.bounds.errors import BatchMixingError
from lipcert.errors import LipcertError

U = 2.0**-53  # float64 unit roundoff
_BIG = torch.iinfo(torch.int64).max
F64 = torch.float64


def gamma(k: int) -> float:
    """γ_k = k·u/(1 − k·u): relative error bound of a float64 sum of k terms (Higham §3.1)."""
    ku = (k + 2) * U
    return ku / (1.0 - ku)


# --------------------------------------------------------------------------- node values


@dataclass
class Bound:
    """Bounds of one node that depends on the model input (see the module docstring)."""

    lo: Tensor
    hi: Tensor
    lip: Tensor
    lip_tok: Tensor
    norm: Tensor
    tok_norm: Tensor
    sid: Tensor | None = None
    value: Tensor | None = None
    tok_l1: Tensor | None = None  # optional: bound of the largest row L1 norm (softmax: 1)

    @property
    def shape(self) -> torch.Size:
        return self.lo.shape

    def dim(self) -> int:
        return self.lo.dim()

    def replace(self, **changes: Any) -> Bound:
        return replace(self, **changes)


@dataclass(frozen=True)
class Const:
    """A node that does not depend on the model input (a parameter, buffer or constant, or
    anything computed from them only); ``name`` is its graph node name (cache key)."""

    t: Tensor
    name: str | None = None

    @property
    def shape(self) -> torch.Size:
        return self.t.shape

    def dim(self) -> int:
        return self.t.dim()


@dataclass(frozen=True)
class Opaque:
    """An auxiliary output with no bounds (for example the saved mean of native_layer_norm);
    using it in a later node is an error."""

    reason: str


# --------------------------------------------------------------------------- domains


@dataclass(frozen=True)
class BoxDomain:
    """Every input element lies in [lo, hi] (images: [0, 1])."""

    lo: float = 0.0
    hi: float = 1.0

    def project(self, x: Tensor) -> Tensor:
        """The nearest point of the domain (elementwise clamp)."""
        return x.clamp(self.lo, self.hi)


@dataclass(frozen=True)
class EmbeddingDomain:
    """Every token (vector along the last dimension) has L2 norm at most ``max_norm`` (for
    embedded sequences: the embedding table's largest row norm)."""

    max_norm: float

    def project(self, x: Tensor) -> Tensor:
        """The nearest point of the domain: each token scaled onto the ball if outside it."""
        norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        return x * (self.max_norm / norms.clamp_min(self.max_norm))


Domain = BoxDomain | EmbeddingDomain


def as_domain(domain: Any) -> Domain:
    """``(lo, hi)`` → BoxDomain, a domain → itself, ``None`` → the unbounded box."""
    if isinstance(domain, BoxDomain | EmbeddingDomain):
        return domain
    if domain is None:
        return BoxDomain(-math.inf, math.inf)
    if isinstance(domain, tuple | list) and len(domain) == 2:
        lo, hi = float(domain[0]), float(domain[1])
        if not lo <= hi:
            raise LipcertError(f"input domain ({lo}, {hi}) is empty")
        return BoxDomain(lo, hi)
    raise LipcertError(
        f"unknown input domain {domain!r}: give (lo, hi) or lipcert.bounds.EmbeddingDomain(r)"
    )


# --------------------------------------------------------------------------- context


@dataclass
class Ctx:
    """Per-propagation settings and caches shared by all rules.

    ``n``: number of samples; ``radius``: (n,) ball radii in local mode, else ``None``;
    ``method``: "exact" or "gram" for weight matrix norms; ``ibp``: compute interval bounds
    through matrix products (off: ±inf, which is cheaper and only loses tightness);
    ``ibp_max_flops``: skip the midpoint–radius products of a single op above this cost (the
    cheap row-norm intervals remain), so a GPT-2-sized unembedding stays fast.
    """

    n: int
    radius: Tensor | None = None
    method: str = "exact"
    ibp: bool = True
    ibp_max_flops: float = 2e9
    lip_only: bool = False  # per-layer passes: activation bounds are the model pass's
    norm_cache: dict[Any, Any] = field(default_factory=dict)
    shape_cache: dict[Any, Any] = field(default_factory=dict)
    node: Any = None

    def use_ibp(self, flops: float, *tensors: Tensor) -> bool:
        """Whether to run interval arithmetic through a product of ``flops`` on these
        interval endpoints (on, finite, and not too expensive)."""
        if not self.ibp or flops > self.ibp_max_flops:
            return False
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    @property
    def local(self) -> bool:
        return self.radius is not None

    def full(self, v: float) -> Tensor:
        return torch.full((self.n,), float(v), dtype=F64)

    def key(self, *parts: Any) -> tuple[Any, ...]:
        return (getattr(self.node, "name", None), *parts)

    def cached(self, cache: dict[Any, Any], key: tuple[Any, ...], make: Any) -> Any:
        if key[0] is None:
            return make()
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def opnorm(self, w: Const) -> float:
        """Certified σ_max of a constant matrix (``spectral.exact`` or ``spectral.gram``);
        a stack of matrices gives the largest. Cached per graph node."""

        def make() -> float:
            t = w.t.detach()
            mats = t.reshape(-1, *t.shape[-2:]) if t.dim() > 2 else t.reshape(1, *t.shape[-2:])
            fn = spectral.gram if self.method == "gram" else spectral.exact
            best = 0.0
            for m in mats:
                res = fn(m)
                if res.kind != "upper":
                    raise LipcertError(f"spectral norm of kind {res.kind!r} is not a certificate")
                best = max(best, float(res.value))
            return best

        if w.t.dim() < 2:
            raise LipcertError("opnorm needs a matrix")
        return self.cached(self.norm_cache, (w.name, "opnorm", self.method), make)

    def to_bound(self, x: Any) -> Bound:
        """A Bound for a constant (lip = 0) or a Python number; Bounds pass through."""
        if isinstance(x, Bound):
            return x
        # A Python number goes to float64 directly: through float32 it would lose digits.
        t = x.t if isinstance(x, Const) else torch.as_tensor(x, dtype=F64)
        t = t.detach().to(F64)
        zero = self.full(0.0)
        nrm = torch.linalg.vector_norm(t) * (1 + gamma(t.numel()))
        rows = (t.reshape(math.prod(t.shape[:-1]), t.shape[-1]) if t.dim() > 0
                else t.reshape(1, 1))
        tok = torch.linalg.vector_norm(rows, dim=-1).max() if rows.numel() else torch.zeros(())
        tok = tok * (1 + gamma(rows.shape[-1]))
        return Bound(
            lo=t,
            hi=t,
            lip=zero,
            lip_tok=zero.clone(),
            norm=nrm.expand(self.n).clone(),
            tok_norm=tok.expand(self.n).clone(),
            sid=None,
            value=t if self.local else None,
        )


# --------------------------------------------------------------------------- sample ids


def wild(shape: torch.Size | tuple[int, ...]) -> Tensor:
    """A sample-id tensor of the given shape that belongs to no sample (-1)."""
    return torch.full((), -1, dtype=torch.int64).expand(shape)


def sid_or_wild(b: Bound) -> Tensor:
    return b.sid if b.sid is not None else wild(b.shape)


def reduce_sid(sid: Tensor | None, dims: tuple[int, ...], what: str) -> Tensor | None:
    """Sample ids after reducing ``dims`` (keepdim=False); raises if a reduced group holds
    elements of two different samples."""
    if sid is None:
        return None
    if sid.dim() == 0:
        return sid
    dims = tuple(d % sid.dim() for d in dims)
    if not dims:
        return sid
    if sid.numel() == 0:
        shape = [s for i, s in enumerate(sid.shape) if i not in dims]
        return torch.empty(shape, dtype=torch.int64)
    hi = sid.amax(dim=dims)
    lo = torch.where(sid < 0, _BIG, sid).amin(dim=dims)
    if bool(((lo != _BIG) & (lo != hi)).any()):
        raise BatchMixingError(
            f"{what} combines elements of different samples (it reduces over the batch "
            "dimension); per-sample bounds do not exist for such a model"
        )
    return hi


def unify_sid(shape: torch.Size, *sids: Tensor | None) -> Tensor | None:
    """Elementwise combination of several operands' sample ids (broadcast to ``shape``)."""
    present = [s.expand(shape) for s in sids if s is not None]
    if not present:
        return None
    out = present[0]
    for s in present[1:]:
        if bool(((out >= 0) & (s >= 0) & (out != s)).any()):
            raise BatchMixingError("an elementwise operation combines different samples")
        out = torch.where(out >= 0, out, s)
    return out


def compact(t: Tensor) -> Tensor:
    """The distinct part of an expanded tensor: every dimension of stride 0 (and size > 1)
    cut to size 1, so ``compact(t).expand(t.shape)`` equals ``t`` (a view, no copy)."""
    if all(st or sz <= 1 for st, sz in zip(t.stride(), t.shape, strict=True)):
        return t
    idx = tuple(
        slice(0, 1) if st == 0 and sz > 1 else slice(None)
        for st, sz in zip(t.stride(), t.shape, strict=True)
    )
    return t[idx]


def row_sid(sid: Tensor) -> tuple[Tensor, bool]:
    """Per-row (last dimension) sample id and whether every row holds one sample only.

    The rows are read off the distinct part of ``sid`` (:func:`compact`; rows of an expanded
    id tensor repeat), and a row of one repeated id needs no reduction at all."""
    s = sid.reshape(1) if sid.dim() == 0 else sid
    if s.shape[-1] == 0:
        return torch.full(s.shape[:-1], -1, dtype=torch.int64), True
    base = compact(s)
    if base.shape[-1] == 1:
        return base[..., 0].expand(s.shape[:-1]), True
    lo, hi = torch.aminmax(base, dim=-1)
    if bool((lo >= 0).all()):  # no element outside a sample: the plain minimum decides
        pure = bool((lo == hi).all())
    else:
        lo = torch.where(base < 0, _BIG, base).amin(-1)
        pure = bool(((lo == _BIG) | (lo == hi)).all())
    return hi.expand(s.shape[:-1]), pure


# --------------------------------------------------------------------------- per-sample sums


def sample_sum(vals: Tensor, sid: Tensor | None, n: int) -> Tensor:
    """Σ over each sample's elements (elements of no sample count for every sample)."""
    v = vals.reshape(-1).to(F64)
    if sid is None:
        return v.sum().expand(n).clone()
    s = sid.expand(vals.shape).reshape(-1)
    own = torch.zeros(n, dtype=F64).index_add_(0, s.clamp(min=0), torch.where(s >= 0, v, 0.0))
    return own + torch.where(s < 0, v, 0.0).sum()


def sample_max(vals: Tensor, sid: Tensor | None, n: int) -> Tensor:
    """max over each sample's elements (0 for a sample with none)."""
    v = vals.reshape(-1).to(F64)
    if v.numel() == 0:
        return torch.zeros(n, dtype=F64)
    if sid is None:
        return v.max().clamp(min=0).expand(n).clone()
    s = sid.expand(vals.shape).reshape(-1)
    neg = torch.tensor(-math.inf, dtype=F64)
    own = torch.full((n,), -math.inf, dtype=F64).scatter_reduce(
        0, s.clamp(min=0), torch.where(s >= 0, v, neg), "amax"
    )
    out = torch.maximum(own, torch.where(s < 0, v, neg).max())
    return out.clamp(min=0.0)


def per_elem(v: Tensor, sid: Tensor | None, shape: torch.Size) -> Tensor:
    """A per-sample quantity (n,) spread over the elements of a node (max for no-sample)."""
    if sid is None:
        return v.max().expand(shape)
    s = sid.expand(shape)
    return torch.where(s >= 0, v[s.clamp(min=0)], v.max())


def rows_per_sample(
    shape: torch.Size,
    sid: Tensor | None,
    n: int,
    with_constant_rows: bool = False,
    rows: tuple[Tensor, bool] | None = None,
) -> Tensor:
    """Number of rows (vectors along the last dimension) that hold elements of each sample;
    with ``with_constant_rows`` also the rows of no sample (constants, which have no
    perturbation but do have a norm). ``rows``: ``row_sid(sid.expand(shape))`` if known."""
    own, constant = row_counts(shape, sid, n, rows)
    return own + constant if with_constant_rows else own


def row_counts(
    shape: torch.Size, sid: Tensor | None, n: int, rows: tuple[Tensor, bool] | None = None
) -> tuple[Tensor, float]:
    """(rows holding elements of each sample, rows of no sample) of a node (see
    :func:`rows_per_sample`; when a row mixes samples, every row counts for each sample)."""
    last = shape[-1] if len(shape) else 1
    total = math.prod(shape) // max(last, 1) if last else math.prod(shape[:-1])
    if sid is None:
        return torch.full((n,), float(total), dtype=F64), 0.0
    rs, pure = rows if rows is not None else row_sid(sid.expand(shape))
    if not pure:
        return torch.full((n,), float(total), dtype=F64), 0.0
    base = compact(rs)
    copies = rs.numel() // max(base.numel(), 1)
    flat = base.reshape(-1)
    own = torch.bincount(flat[flat >= 0], minlength=n)[:n].to(F64) * copies
    return own, float((flat < 0).sum()) * copies


def norms_from_sq(
    sq: Tensor, sid: Tensor | None, n: int, rows: tuple[Tensor, bool] | None = None
) -> tuple[Tensor, Tensor]:
    """(norm, tok_norm) per sample from the squares of the elements (rounded up);
    ``rows``: ``row_sid(sid.expand(sq.shape))`` if known."""
    slack = 1.0 + gamma(sq.numel())
    norm = (sample_sum(sq, sid, n) * slack).sqrt()
    rows_sq = sq.reshape(1, 1) if sq.dim() == 0 else sq
    row_sq = rows_sq.sum(-1) * slack
    if sid is None:
        tok = sample_max(row_sq, None, n).sqrt()
    else:
        rs, pure = rows if rows is not None else row_sid(sid.expand(sq.shape))
        tok = sample_max(row_sq, rs, n).sqrt() if pure else norm
    return norm, tok


def interval_norms(
    lo: Tensor, hi: Tensor, sid: Tensor | None, n: int, rows: tuple[Tensor, bool] | None = None
) -> tuple[Tensor, Tensor]:
    """(norm, tok_norm) bounds implied by elementwise bounds: |y_e| ≤ max(|lo_e|, |hi_e|)."""
    return norms_from_sq(torch.maximum(lo.square(), hi.square()), sid, n, rows)


def value_norms(
    value: Tensor, sid: Tensor | None, n: int, rows: tuple[Tensor, bool] | None = None
) -> tuple[Tensor, Tensor]:
    """(norm, tok_norm) of the centre value itself (rounded up)."""
    return norms_from_sq(value.square(), sid, n, rows)


def max_abs(b: Bound) -> Tensor:
    """Per-sample bound of the largest |element| of a node over the input set."""
    return sample_max(torch.maximum(b.lo.abs(), b.hi.abs()), b.sid, b.lip.shape[0])

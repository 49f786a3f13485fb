"""Certificates: the per-layer table, the global Lipschitz bound of the logits, and per-sample
certified radii in the global or local mode (:func:`certify`). What a certificate holds and
its JSON document are in ``certificate_schema.py``.

For logits z and label y, the margin is m = z_y − max_{j≠y} z_j. If ‖z(x') − z(x)‖₂ ≤ L‖x' − x‖₂
on a set containing x and x', then z_y − z_j changes by at most √2·L·‖x' − x‖ (the vector
e_y − e_j has norm √2), so the prediction cannot change within the radius
r = m / (√2·L) (correctly classified inputs; otherwise r = 0). In L∞, ‖δ‖₂ ≤ √n‖δ‖_∞ gives
r_∞ = r / √n with n the number of input elements of one sample.

* ``global``: L is the bound over the whole input domain (one number).
* ``local``: L(x, r) is the bound over the ball of radius r around x (∩ the domain). It grows
  with r, so the largest r with m ≥ √2·L(x, r)·r is found by bisection, vectorised over all
  samples; the reported radius is the largest iterate that satisfied the inequality (never
  one that did not), or the global radius when that is larger (both are sound).
* ``margin``: as ``local``, plus margin-gradient certificates (``lipcert.bounds.backward``,
  docs/local-margin.md): an enclosure of each margin's gradient over the ball gives
  m_j(x') ≥ m_j(x) − r·L_j(x, r) with no √2. Each sample keeps the largest of the three
  sound radii and records which one it is (``radius_method``).

Every Lipschitz number is an ``upper`` bound from certified spectral norms; it is multiplied
by (1 + 1e-9) for the float64 rounding of the propagation (a few thousand roundings of
relative size 2⁻⁵³ at most).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from lipcert.bounds import (
    BoxDomain,
    EmbeddingDomain,
    Propagator,
    as_domain,
    as_program,
    layer_table,
)
from lipcert.bounds.backward import margin_radii
from lipcert.certificate_schema import (
    MODES,
    RADIUS_CONVENTION,
    Certificate,
    LayerBound,
    ModelIdentity,
    SampleCertificate,
)
from lipcert.errors import LipcertError
from lipcert.norm_shards import share_norms

FP_MARGIN = 1e-9
__all__ = [
    "RADIUS_CONVENTION",
    "Certificate",
    "LayerBound",
    "ModelIdentity",
    "SampleCertificate",
    "certify",
]


def _check_domain(inputs: Tensor, domain: Any) -> None:
    """Every input lies in the domain the bounds hold on (NaN does not)."""
    if isinstance(domain, BoxDomain):
        lo, hi = torch.aminmax(inputs.detach()) if inputs.numel() else (domain.lo, domain.hi)
        if not (float(lo) >= domain.lo and float(hi) <= domain.hi):
            raise LipcertError(
                f"inputs lie outside the input domain [{domain.lo}, {domain.hi}]"
            )
    elif isinstance(domain, EmbeddingDomain):
        norms = torch.linalg.vector_norm(inputs.to(torch.float64), dim=-1)
        if not bool((norms <= domain.max_norm).all()):
            raise LipcertError(
                f"input tokens have norms above the domain's bound {domain.max_norm:.6g}"
            )


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def _padded(x: Tensor, size: int) -> Tensor:
    if x.shape[0] == size:
        return x
    extra = x[-1:].expand(size - x.shape[0], *x.shape[1:])
    return torch.cat([x, extra])


def _margins(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    z = logits.detach().to(torch.float64)
    y = labels.long().reshape(-1)
    zy = z.gather(1, y[:, None]).squeeze(1)
    other = z.clone()
    other.scatter_(1, y[:, None], -math.inf)
    return zy - other.amax(1), z.argmax(1)


def _forward(prop: Propagator, inputs: Tensor, size: int) -> Tensor:
    """The logits of ``inputs``, ``size`` samples per call (padded to the program's fixed
    batch if it has one), from the program's own graph module with the parameters, buffers
    and constants passed in as its lifted inputs: the same graph and values as
    ``program.module()``, without building that module, a fixed 10–20 ms (for the demo ViT,
    whose forward pass on 1,000 MNIST images takes about 60 ms)."""
    program = prop.program
    signature = program.graph_signature
    shape = prop.input_shape
    if shape is not None and (len(shape) != inputs.dim() or any(
            isinstance(want, int) and want != got
            for want, got in zip(shape[1:], inputs.shape[1:], strict=True))):
        raise LipcertError(f"inputs of shape {tuple(inputs.shape)} do not fit the program's "
                           f"input shape {tuple(shape)}")
    # Propagator has checked the kinds: one user input, the rest parameters, buffers and
    # constant tensors, each with a value in the state dict or the constants.
    lifted = [None if spec.kind == InputKind.USER_INPUT
              else program.state_dict.get(spec.target, program.constants.get(spec.target))
              for spec in signature.input_specs]
    user = [k for k, spec in enumerate(signature.output_specs)
            if spec.kind == OutputKind.USER_OUTPUT]
    if len(user) != 1:
        raise LipcertError(f"the model has {len(user)} outputs; certify needs one: (batch, "
                           "classes) logits")
    outs = []
    with torch.no_grad():
        for a, b in _chunks(inputs.shape[0], size):
            chunk = _padded(inputs[a:b], size) if prop.static_batch else inputs[a:b]
            args = [chunk if v is None else v for v in lifted]
            outs.append(program.graph_module(*args)[user[0]][: b - a])
    logits = torch.cat(outs)
    if logits.dim() != 2:
        raise LipcertError(
            f"the model's output has shape {tuple(logits.shape)}; certify needs (batch, classes)"
            " logits (wrap a sequence model with lipcert.models.adapters.LastPosition)"
        )
    return logits


def certify(
    model: nn.Module | ExportedProgram,
    inputs: Tensor,
    labels: Tensor,
    *,
    domain: Any = (0.0, 1.0),
    mode: str = "global",
    method: str = "exact",
    eps: Sequence[float] = (0.25, 0.5, 1.0),
    indices: Sequence[int] | None = None,
    batch_size: int = 256,
    bisection_steps: int = 20,
    device: str | torch.device = "cpu",
) -> Certificate:
    """Certify ``model`` (an ``nn.Module`` or ``ExportedProgram`` whose output is (B, C)
    logits) on ``inputs`` (B, ...) with ``labels`` (B,).

    ``domain``: ``(lo, hi)`` for images, or ``lipcert.models.adapters.embedding_domain``
    for embedded sequences (wrap a GPT as ``LastPosition(EmbeddingSpaceGPT(gpt))``, with
    ``LastPosition`` from the same module); ``mode``: "global" or
    "local"; ``method``: "exact" or "gram" for weight norms; ``indices``: the samples'
    positions in their data set (default 0..B−1); ``device``: where the certified weight
    norms are computed (float64 on a GPU; ``lipcert.norm_shards``).
    """
    if mode not in MODES:
        raise LipcertError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if inputs.shape[0] != labels.reshape(-1).shape[0]:
        raise LipcertError("inputs and labels have different lengths")
    if inputs.shape[0] == 0:
        raise LipcertError("no samples to certify")
    if indices is not None and len(indices) != inputs.shape[0]:
        raise LipcertError(f"{len(indices)} indices for {inputs.shape[0]} samples")
    dom = as_domain(domain)
    _check_domain(inputs, dom)
    timing: dict[str, float] = {}
    t_all = time.perf_counter()

    t = time.perf_counter()
    program = as_program(model, inputs[:2])
    prop = Propagator(program, method=method)
    timing["export"] = time.perf_counter() - t

    t = time.perf_counter()
    size = prop.static_batch or batch_size
    logits = _forward(prop, inputs, size)
    timing["forward"] = time.perf_counter() - t

    t = time.perf_counter()
    share_norms(prop, dom, inputs.shape[1:], torch.device(device))
    glob = prop.run(dom, sample_shape=tuple(inputs.shape[1:]))
    L = float(glob.lip.max()) * (1 + FP_MARGIN)
    timing["global_bound"] = time.perf_counter() - t
    t = time.perf_counter()
    layers = [replace(r, upper=r.upper * (1 + FP_MARGIN)) for r in layer_table(prop, glob)]
    timing["layers"] = time.perf_counter() - t

    margin, pred = _margins(logits, labels)
    correct = (pred == labels.reshape(-1).long()) & (margin > 0)
    sqrt2 = math.sqrt(2.0)
    zero = torch.zeros_like(margin)
    r_glob = torch.where(correct, margin / (sqrt2 * L), zero) if L > 0 else torch.where(
        correct, torch.full_like(margin, math.inf), zero
    )
    radius = r_glob
    lip_used = torch.full_like(margin, L)
    method_used = ["global"] * len(radius)

    def keep_larger(r_new: Tensor, l_new: Tensor, name: str) -> None:
        nonlocal radius, lip_used
        better = r_new > radius
        radius = torch.where(better, r_new, radius)
        lip_used = torch.where(better, l_new, lip_used)
        for k in torch.nonzero(better).flatten().tolist():
            method_used[k] = name

    if mode in ("local", "margin"):
        t = time.perf_counter()
        keep_larger(*_local_radii(prop, dom, inputs, margin, correct, size, bisection_steps),
                    "local")
        timing["local_bisection"] = time.perf_counter() - t
    if mode == "margin":
        t = time.perf_counter()
        found = margin_radii(prop, inputs, labels, domain=dom)
        keep_larger(found.radius.to(radius.dtype) * correct, found.lipschitz.to(radius.dtype),
                    "margin")
        timing["margin_bisection"] = time.perf_counter() - t
    n_el = math.prod(inputs.shape[1:])
    idx = list(range(inputs.shape[0])) if indices is None else [int(i) for i in indices]
    root_n = math.sqrt(n_el)
    samples = [
        SampleCertificate(index=i, label=y, pred=p, margin=m, radius_l2=r,
                          radius_linf=r / root_n, lipschitz=lip, radius_method=how)
        for i, y, p, m, r, lip, how in zip(idx, labels.reshape(-1).long().tolist(),
                                           pred.tolist(), margin.tolist(), radius.tolist(),
                                           lip_used.tolist(), method_used, strict=True)
    ]
    acc = [{"eps": float(e), "accuracy": float((radius > e).double().mean())} for e in eps]
    timing["total"] = time.perf_counter() - t_all
    return Certificate(
        mode=mode,
        method=method,
        lipschitz_upper=L,
        layers=layers,
        samples=samples,
        certified_accuracy=acc,
        input_elements=n_el,
        timing_s=timing,
    )


def _local_radii(
    prop: Propagator,
    domain: Any,
    inputs: Tensor,
    margin: Tensor,
    correct: Tensor,
    size: int,
    steps: int,
) -> tuple[Tensor, Tensor]:
    """Vectorised bisection on r for m ≥ √2·L(x, r)·r (module docstring). Returns the
    certified radii and the L(x, r) that certified them (L(x, 0) where r = 0)."""
    sqrt2 = math.sqrt(2.0)
    radii = torch.zeros_like(margin)
    lips = torch.zeros_like(margin)
    for a, b in _chunks(inputs.shape[0], size):
        k = b - a
        x = inputs[a:b]
        m = margin[a:b]
        ok0 = correct[a:b]

        def local_lip(r: Tensor, x: Tensor = x, k: int = k) -> Tensor:
            xp = _padded(x, size) if prop.static_batch else x
            rp = _padded(r, size) if prop.static_batch else r
            res = prop.run(domain, center=xp, radius=rp)
            return res.lip[:k] * (1 + FP_MARGIN)

        l0 = local_lip(torch.zeros(k, dtype=torch.float64))
        hi = torch.where(ok0 & (l0 > 0), m / (sqrt2 * l0), torch.zeros_like(m))
        hi = torch.where(ok0 & (l0 == 0), torch.full_like(m, 1e6), hi)
        lo = torch.zeros_like(m)
        best = torch.zeros_like(m)
        best_l = l0.clone()
        for _ in range(steps):
            mid = (lo + hi) / 2
            lip = local_lip(mid)
            ok = ok0 & (m >= sqrt2 * lip * mid)
            best = torch.where(ok, mid, best)
            best_l = torch.where(ok, lip, best_l)
            lo = torch.where(ok, mid, lo)
            hi = torch.where(ok, hi, mid)
        radii[a:b] = best
        lips[a:b] = best_l
    return radii, lips

"""Certify a model given by name: load it and its samples, certify, measure a lower bound,
and write the certificate JSON (what ``lipcert certify`` does, as one function call).

The empirical lower bound (``lipcert.lower``) is a witness, never part of the certificate,
and it is by far the slowest part: by default its search gets a wall-clock budget of
max(5 s, the time the certificate took), and the JSON records how long it ran and why it
stopped (``lipschitz.lower_search``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lipcert.atomic import check_output_writable, write_json_atomic
from lipcert.certificate import Certificate
from lipcert.certify_shards import certify_shared
from lipcert.checkpoint import sha256_file
from lipcert.distributed import on_main, resolve_device, world
from lipcert.errors import LipcertError
from lipcert.loading import load_model
from lipcert.lower import LowerBound, SearchProgress, empirical_lipschitz
from lipcert.samples import select_samples
from lipcert.user_inputs import resolve_domain
from lipcert.versions import package_versions

__all__ = ["MIN_LOWER_BUDGET_S", "CertifyResult", "certify_model", "lower_budget"]

MIN_LOWER_BUDGET_S = 5.0


@dataclass
class CertifyResult:
    """The certificate, its JSON document, where it was written, the lower bound's search
    (``None`` when it was not run), and notes for the user (a reshape of the samples)."""

    certificate: Certificate
    document: dict[str, Any]
    output: Path | None
    lower: LowerBound | None
    notes: list[str] = field(default_factory=list)


def lower_budget(certify_s: float, requested_s: float | None = None) -> float:
    """The lower-bound search's wall-clock budget: ``requested_s`` if given, else
    max(``MIN_LOWER_BUDGET_S``, the certification time ``certify_s``)."""
    if requested_s is not None:
        if not requested_s > 0:
            raise LipcertError(f"the lower-bound budget must be > 0 seconds, got {requested_s}")
        return requested_s
    return max(MIN_LOWER_BUDGET_S, certify_s)


def certify_model(
    model: str | Path,
    *,
    data: str | None = None,
    data_dir: str | None = None,
    n: int = 1000,
    eps: Sequence[float] = (0.25, 0.5, 1.0),
    mode: str = "global",
    method: str = "exact",
    lower: bool = True,
    lower_budget_s: float | None = None,
    weights: str | None = None,
    trust_pickle: bool = False,
    output: str | Path | None = None,
    on_lower_progress: Callable[[SearchProgress], None] | None = None,
    device: str = "cpu",
    inputs: str | Path | None = None,
    domain: str | None = None,
    embedding_table: str | Path | None = None,
) -> CertifyResult:
    """Certify ``model`` (a run directory, a ``.pt2`` file, or ``package.module:factory``
    with ``weights``) on the first ``n`` test samples of ``data`` (default: the run's), or
    on the first ``n`` samples of the ``inputs`` file (tensors ``x``, ``y``) with the input
    domain ``domain`` (``box:LO,HI``, ``embedding-ball:R``, ``none``) or that of the
    ``embedding_table`` file (``lipcert.user_inputs``).

    ``mode``/``method``/``eps``: as ``lipcert.certify``. With ``lower``, the empirical
    lower bound is searched for ``lower_budget_s`` seconds (default: ``lower_budget``;
    ``math.inf``: the whole search) and a measured value above the certified bound is a
    soundness violation (``LipcertError``). ``output``: the JSON path, checked before any
    work and written atomically at the end (nothing is written on error). ``device``:
    where the certified weight norms are computed (cpu, cuda or auto).

    Under torchrun the ranks share the samples and the weight norms
    (``lipcert.certify_shards``); rank 0 alone searches the lower bound and writes the
    JSON, the other ranks return the certificate without either.
    """
    norms_on = resolve_device(device)
    if output is not None:
        on_main(lambda: check_output_writable(output))
    start = time.perf_counter()
    loaded = load_model(str(model), weights=weights, trust_pickle=trust_pickle)
    load_s = time.perf_counter() - start
    samples = select_samples(loaded, data, n, data_dir, inputs=inputs,
                             domain=resolve_domain(domain, embedding_table))
    certificate = certify_shared(samples.certifiable, samples.inputs, samples.labels,
                                 domain=samples.domain, mode=mode, method=method, eps=eps,
                                 indices=samples.indices, device=norms_on)
    found = None
    if not world().main:  # under torchrun, rank 0 alone searches the lower bound and writes
        return CertifyResult(certificate, certificate.to_json(), None, None)
    if lower:
        budget = lower_budget(certificate.timing_s["total"], lower_budget_s)
        found = empirical_lipschitz(samples.classifier, samples.inputs, domain=samples.domain,
                                    budget_s=budget, on_progress=on_lower_progress)
        certificate = certificate.with_lower(found.value)
        if found.value > certificate.lipschitz_upper:
            raise LipcertError(
                f"soundness violation: measured Jacobian norm {found.value:.6g} exceeds the "
                f"certified bound {certificate.lipschitz_upper:.6g}; please report this"
            )
    document = certificate.to_json()
    if found is not None:
        document["lipschitz"]["lower_method"] = found.method
        document["lipschitz"]["lower_search"] = found.search_dict()
        document["timing_s"]["lower_search"] = found.elapsed_s
    document["timing_s"]["load"] = load_s
    document["timing_s"]["command"] = time.perf_counter() - start
    document["kinds"] = {"upper": "certified upper bound", "lower": "empirical witness "
                         "(a Jacobian norm measured at some input)"}
    document["model"] = {"source": loaded.source, "kind": loaded.kind,
                         "weights_sha256": loaded.weights_sha256}
    document["data"] = {"dataset": samples.dataset, "n": len(samples.indices),
                        "description": samples.description, **samples.metadata}
    if inputs is not None:
        document["data"]["inputs"] = str(inputs)
        document["data"]["inputs_sha256"] = sha256_file(Path(inputs))
    document["versions"] = package_versions()
    path = None if output is None else write_json_atomic(output, document)
    return CertifyResult(certificate, document, path, found, samples.notes)

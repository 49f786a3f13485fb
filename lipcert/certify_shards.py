"""Certification with the samples and the weight norms shared among torchrun's processes.

Each rank certifies a contiguous block of whole chunks of ``CHUNK`` samples, the chunks
``certify`` forms in one process, so every sample's logits and local radius come from the
same computation as in one process; rank 0 joins the samples in order and recomputes
certified accuracy from all of them. The weight norms are shared (``lipcert.norm_shards``,
called by ``certify``): a rank without samples (every rank but 0 when there are at most
``CHUNK`` samples) only helps with them and propagates nothing. An error on any rank
reaches every rank as the same one-line ``LipcertError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram

from lipcert.certificate import Certificate, certify
from lipcert.distributed import World, block, gather, on_main, world
from lipcert.errors import LipcertError
from lipcert.norm_shards import lend_norms, sharing

__all__ = ["CHUNK", "certify_shared"]

CHUNK = 256  # certify's batch: samples per forward call and per local bisection


def certify_shared(model: nn.Module | ExportedProgram, inputs: Tensor, labels: Tensor, *,
                   indices: Sequence[int], eps: Sequence[float], domain: Any = (0.0, 1.0),
                   method: str = "exact", device: str | torch.device = "cpu",
                   **options: Any) -> Certificate:
    """``lipcert.certificate.certify`` with the samples and the weight norms shared among
    torchrun's ranks (module docstring); the certificate of all of them on every rank.
    ``options``: the rest of ``certify``'s keywords."""
    w = world()
    settings = {"domain": domain, "method": method, "device": device}
    if w.size == 1 or len(inputs) == 0:  # (no samples: certify's own refusal, everywhere)
        return certify(model, inputs, labels, indices=indices, eps=eps, **settings, **options)
    n_chunks = math.ceil(len(inputs) / CHUNK)
    holders = [r for r in range(w.size) if block(n_chunks, World(r, w.size))]
    chunks = block(n_chunks, w)
    a, b = chunks.start * CHUNK, min(chunks.stop * CHUNK, len(inputs))
    own: Certificate | None = None
    error = None
    with sharing(holders):
        try:
            if b > a:
                own = certify(model, inputs[a:b], labels[a:b], indices=list(indices[a:b]),
                              eps=eps, batch_size=CHUNK, **settings, **options)
            else:
                lend_norms(model, inputs, domain=domain, method=method,
                           device=torch.device(device))
        except LipcertError as err:
            error = str(err)
    shards = gather((None if own is None else own.samples, error))

    def join() -> Certificate:
        assert shards is not None
        for _, failed in shards:
            if failed is not None:
                raise LipcertError(failed)
        assert own is not None  # rank 0 holds the first chunk
        samples = [s for part, _ in shards if part for s in part]
        radius = torch.tensor([s.radius_l2 for s in samples], dtype=torch.float64)
        accuracy = [{"eps": float(e), "accuracy": float((radius > e).double().mean())}
                    for e in eps]
        return replace(own, samples=samples, certified_accuracy=accuracy)

    return on_main(join)

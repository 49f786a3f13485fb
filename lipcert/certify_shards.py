"""Certification with the samples shared among torchrun's processes.

Each rank certifies a contiguous block of whole chunks of ``CHUNK`` samples, the chunks
``certify`` forms in one process, so every sample's logits and local radius come from the
same computation as in one process; rank 0 joins the samples in order and recomputes
certified accuracy from all of them. The weight norms are shared too
(``lipcert.norm_shards``, called by ``certify``).
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
from lipcert.distributed import block, gather, on_main, world

__all__ = ["CHUNK", "certify_shared"]

CHUNK = 256  # certify's batch: samples per forward call and per local bisection


def certify_shared(model: nn.Module | ExportedProgram, inputs: Tensor, labels: Tensor, *,
                   indices: Sequence[int], eps: Sequence[float], **options: Any
                   ) -> Certificate:
    """``lipcert.certificate.certify`` with the samples shared among torchrun's ranks
    (module docstring); the certificate of all of them on every rank. ``options``: the
    rest of ``certify``'s keywords."""
    w = world()
    if w.size == 1:
        return certify(model, inputs, labels, indices=indices, eps=eps, **options)
    chunks = block(math.ceil(len(inputs) / CHUNK), w)
    a, b = chunks.start * CHUNK, min(chunks.stop * CHUNK, len(inputs))
    # A rank without samples still takes its share of the weight norms, on one sample.
    lo, hi = (a, b) if b > a else (0, 1)
    own = certify(model, inputs[lo:hi], labels[lo:hi], indices=list(indices[lo:hi]), eps=eps,
                  batch_size=CHUNK, **options)
    shards = gather(own.samples if b > a else [])

    def join() -> Certificate:
        assert shards is not None
        samples = [s for shard in shards for s in shard]
        radius = torch.tensor([s.radius_l2 for s in samples], dtype=torch.float64)
        accuracy = [{"eps": float(e), "accuracy": float((radius > e).double().mean())}
                    for e in eps]
        return replace(own, samples=samples, certified_accuracy=accuracy)

    return on_main(join)

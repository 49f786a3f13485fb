"""Certified weight norms computed ahead of the bound propagation: by torchrun's processes
in shares, and on a GPU when one is asked for.

A first walk of the graph, in which every certified matrix norm the rules ask for
(``Ctx.opnorm``) is recorded instead of computed, lists the matrices: the walk goes on with
a stand-in of 1, and nothing it makes is kept (it has its own shape cache, and the norm
cache it shares holds only functions of one weight each, none of a norm's value). The
matrices are split among the ranks by estimated cost (``lipcert.distributed.balance``),
each rank computes its share exactly as one process would (``Ctx.opnorm``, on one thread),
and every rank puts all of them into the propagator's norm cache, keyed as the rules look
them up. A norm the first walk missed is computed where it is needed, as without
torchrun: never a wrong value, only less speed-up. Convolution norms are computed during
the first walk, by every rank, on the CPU.

On a GPU the matrices are copied there and ``Ctx.opnorm`` runs on the copies in float64
(``lipcert.spectral`` works on any device with float64; the derivations it relies on hold
for any order of summation and for cuSOLVER's Cholesky as for LAPACK's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lipcert.bounds import Propagator
from lipcert.bounds.state import Const, Ctx
from lipcert.distributed import all_gather, balance, world
from lipcert.threads import one_thread

__all__ = ["share_norms"]


@dataclass
class _Recorder(Ctx):
    """A context whose ``opnorm`` records the matrix it is asked about and answers 1."""

    wanted: dict[tuple[Any, ...], Const] = field(default_factory=dict)

    def opnorm(self, w: Const) -> float:
        if w.name is not None and w.t.dim() >= 2:
            self.wanted[(w.name, "opnorm", self.method)] = w
        return 1.0


def _norm_cost(t: Tensor) -> float:
    """Flops of the Gram matrix of each k×n matrix in ``t`` (n the shorter side): k·n²."""
    k, n = sorted(t.shape[-2:], reverse=True)
    return math.prod(t.shape[:-2]) * k * n * n


def share_norms(prop: Propagator, domain: Any, sample_shape: Sequence[int],
                device: torch.device | None = None) -> None:
    """Fill ``prop``'s norm cache with every certified matrix norm its global pass needs,
    computed on ``device``, by the ranks in shares (module docstring); nothing in one
    process on the CPU."""
    w = world()
    device = device or torch.device("cpu")
    if w.size == 1 and device.type == "cpu":
        return
    recorder = _Recorder(prop.static_batch or 1, method=prop.method, ibp=False,
                         norm_cache=prop.norm_cache)
    walker = Propagator.__new__(Propagator)
    walker.__dict__.update(prop.__dict__)
    walker.context = lambda n, radius, ibp=True: recorder  # type: ignore[method-assign]
    walker.run(domain, sample_shape=tuple(sample_shape))
    keys = sorted(k for k in recorder.wanted if k not in prop.norm_cache)
    mine = balance([_norm_cost(recorder.wanted[k].t) for k in keys], w)
    found = {}
    with one_thread(device):
        for k in mine:
            wanted = recorder.wanted[keys[k]]
            on_device = Const(wanted.t.to(device), wanted.name)
            found[keys[k]] = Ctx(1, method=prop.method).opnorm(on_device)
    for part in all_gather(found):
        prop.norm_cache.update(part)

"""Several processes, started by ``torchrun``, sharing one command's work.

``torchrun --nproc-per-node N lipcert attack|certify|train ...`` starts N copies of the
command with the environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` set. :func:`world` reads them and joins the process
group on first use (gloo for CPU tensors; on a machine with CUDA, ``cpu:gloo,cuda:nccl``,
so that DistributedDataParallel runs on NCCL and the small Python-object exchanges below
on gloo). Without those variables there is no process group: every function here then acts
as the identity on a world of one process, and the commands run exactly as before.

What the commands do with it: each rank takes a contiguous block of whole work units
(:func:`block`: attack batches, certify's chunks of samples, training rows), rank 0
gathers what the others found (:func:`gather`) and writes the outputs, and a decision made
on rank 0 (:func:`on_main`), a refusal included, reaches every rank, so no rank waits for a
partner that has stopped. Work that is claimed one unit at a time rather than split in
advance (certify's weight norms) goes through the process group's key-value store
(:func:`store`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lipcert.errors import LipcertError

__all__ = ["World", "block", "broadcast", "gather", "is_main", "on_main", "resolve_device",
           "store", "world"]

T = TypeVar("T")
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# A rank may wait at a collective while rank 0 alone writes outputs or runs an unsharded
# stage (the empirical lower bound, minimal perturbations, the radius audit): generous.
_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one command: ``rank`` of ``size``, and
    ``local_rank`` on its machine (its GPU's number)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's :class:`World`; joins torchrun's process group on first use (a world
    of one process when torchrun's environment variables are absent)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", 0)))
    if not all(os.environ.get(k) for k in _ENV) or int(os.environ["WORLD_SIZE"]) == 1:
        return World()
    if not dist.is_available():
        raise LipcertError("torchrun started several processes, but this torch build has "
                           "no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend, timeout=_TIMEOUT)
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def is_main() -> bool:
    """Whether this process writes outputs and prints (rank 0, or the only process)."""
    return world().main


def block(n_units: int, w: World | None = None) -> range:
    """This rank's contiguous block of ``range(n_units)``: the first ``n_units mod size``
    ranks get one unit more than the others (a rank may get none)."""
    w = w or world()
    base, extra = divmod(n_units, w.size)
    start = w.rank * base + min(w.rank, extra)
    return range(start, start + base + (w.rank < extra))


def gather(obj: T) -> list[T] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (``None`` elsewhere)."""
    w = world()
    if w.size == 1:
        return [obj]
    out: list[Any] | None = [None] * w.size if w.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if world().size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 only, its result on every rank; a ``LipcertError`` it raises
    is raised on every rank (the same one-line message)."""
    result: Any = None
    error = None
    if is_main():
        try:
            result = fn()
        except LipcertError as err:
            error = str(err)
    result, error = broadcast((result, error))
    if error is not None:
        raise LipcertError(error)
    return result


def store() -> dist.Store:
    """A client of the key-value store that torchrun's agent (or rank 0's
    ``init_process_group``) serves at ``MASTER_ADDR:MASTER_PORT``: atomic counters
    (``add``) and values any rank can wait for (``get``), with the process group's timeout.
    Only under torchrun (a world of several processes)."""
    if world().size == 1:
        raise LipcertError("a key-value store exists only under torchrun")
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=False, timeout=_TIMEOUT)


def resolve_device(text: str) -> torch.device:
    """``cpu``, ``cuda`` (this rank's GPU under torchrun), ``cuda:K`` or ``auto`` (CUDA
    when available, else CPU) as a device; CUDA requested without CUDA is an error."""
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text != "cuda" and not (text.startswith("cuda:") and text[5:].isdigit()):
        raise LipcertError(f"unknown device {text!r}; expected cpu, cuda, cuda:K or auto")
    if not torch.cuda.is_available():
        raise LipcertError(f"--device {text} was requested but no CUDA device is available")
    if text == "cuda":
        return torch.device("cuda", world().local_rank % torch.cuda.device_count())
    index = int(text[5:])
    if index >= torch.cuda.device_count():
        raise LipcertError(f"--device {text}: this machine has "
                           f"{torch.cuda.device_count()} CUDA device(s)")
    return torch.device(text)

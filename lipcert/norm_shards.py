"""Certified weight norms shared by torchrun's processes, and computed on a GPU when one is
asked for.

The costly entries of a propagator's norm cache (:data:`SHARED_KINDS`: each matrix's
certified σ_max, each linear layer's row norms, each convolution's operator norm) are
functions of one weight each. Within :func:`sharing` (``lipcert.certify_shards`` opens it),
:func:`share_norms` turns the cache into a :class:`SharedNorms`: each such entry is computed
by exactly one rank, the first to claim it in the process group's key-value store (an
atomic counter per entry), which then publishes the value there (exactly: the float's 8
bytes, the tensor's safetensors bytes); any other rank that needs the entry waits for it.
Each value is computed by the function that computes it in one process, on one thread, so
every rank's cache holds one process's numbers bit for bit. Outside :func:`sharing`, and in
one process, each rank computes its own entries as before.

Who computes what, with no cost model:

* a rank that propagates nothing (it holds no samples) lists the entries, then claims them
  from the back of the graph to the front, computing each one it wins;
* when rank 0 is the only rank that propagates, it starts its propagation at once and
  claims each entry when the propagation needs it (computing it there, or waiting for the
  rank that claimed it first), so the ranks meet where their work is equal, rank 0's
  propagation included;
* when several ranks propagate, each lists and claims before propagating, rank 0 from the
  front and the others from the back (claims during the propagations would leave every
  rank waiting for the others' entries, one after another, in graph order).

The list comes from a first walk of the graph with a context that records each entry and
answers a stand-in (1 for a norm, ones for row norms), without the interval refinements
(``lip_only``, as the per-layer passes run: the rules ask for the same norms, and the walk
costs a quarter less). Nothing the walk makes is kept but the norm cache's other entries
(float64 copies of weights and the like: functions of one weight each, never of a
stand-in); it has its own shape cache. An entry the walk missed is computed by the rank
that needs it, as in one process: never a wrong value, only less speed-up; a walk that
stops at an error (the propagation meets it and reports it) lists fewer entries. A rank
whose entry fails publishes the error, and every rank waiting for that entry raises it.

On a GPU the matrices' σ_max are computed on copies there in float64 (``lipcert.spectral``
works on any device with float64; the derivations it relies on hold for any order of
summation and for cuSOLVER's Cholesky as for LAPACK's), so rank 0 lists the entries too;
row norms and convolution norms stay on the CPU.
"""

from __future__ import annotations

import copy
import secrets
import struct
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor, nn
from torch.export import ExportedProgram

from lipcert.bounds import Propagator, as_program
from lipcert.bounds.state import F64, Const, Ctx
from lipcert.distributed import broadcast, store, world
from lipcert.errors import LipcertError
from lipcert.threads import one_thread

__all__ = ["SHARED_KINDS", "SharedNorms", "lend_norms", "share_norms", "sharing"]

SHARED_KINDS = ("opnorm", "rownorms", "conv")
Key = tuple[Any, ...]
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class _Plan:
    """What :func:`sharing` agreed on: this block's part of the key-value store (a fresh
    namespace, connected while every rank is there), and the ranks that propagate bounds
    (the others only help with the norms)."""

    kv: torch.distributed.Store
    propagating: frozenset[int]


_PLAN: ContextVar[_Plan | None] = ContextVar("lipcert_norm_plan", default=None)


@contextmanager
def sharing(propagating: Collection[int]) -> Iterator[None]:
    """Within the block, :func:`share_norms` shares the norm cache among the ranks; the
    ranks in ``propagating`` propagate bounds afterwards. A collective: every rank enters
    it together, and no rank may leave the process group before the others are done with
    the block (outside it, each rank computes its own norms, as one process does)."""
    namespace = broadcast(secrets.token_hex(8))
    plan = _Plan(torch.distributed.PrefixStore(f"lipcert/norms/{namespace}/", store()),
                 frozenset(propagating))
    token = _PLAN.set(plan)
    try:
        yield
    finally:
        _PLAN.reset(token)


# --------------------------------------------------------------------------- the exchange


def _encode(value: float | Tensor) -> bytes:
    if isinstance(value, Tensor):
        return b"t" + save_tensors({"v": value.detach().cpu().contiguous()})
    return b"f" + struct.pack("<d", float(value))


def _decode(data: bytes) -> float | Tensor:
    kind, body = data[:1], data[1:]
    if kind == b"t":
        return load_tensors(body)["v"]
    if kind == b"f":
        return struct.unpack("<d", body)[0]
    raise LipcertError(body.decode())


class _Exchange:
    """Claims and values of one :func:`sharing` block in the key-value store; in a world
    of one process (or outside :func:`sharing`) every claim is won and nothing is sent."""

    def __init__(self, kv: torch.distributed.Store | None) -> None:
        self._store = kv

    def claim(self, key: Key) -> bool:
        """Whether this rank is the first to claim ``key`` (it must then publish it)."""
        return self._store is None or self._store.add(f"claim {key!r}", 1) == 1

    def publish(self, key: Key, data: bytes) -> None:
        if self._store is not None:
            self._store.set(f"value {key!r}", data)

    def fetch(self, key: Key) -> float | Tensor:
        """The value another rank claimed and published (waits for it); that rank's
        error, raised here, if it failed."""
        assert self._store is not None
        return _decode(self._store.get(f"value {key!r}"))


# --------------------------------------------------------------------------- the cache


def _is_shared(key: Any) -> bool:
    return (isinstance(key, tuple) and len(key) > 1 and key[0] is not None
            and key[1] in SHARED_KINDS)


class SharedNorms(dict):
    """A propagator's norm cache whose missing shared entries (module docstring) are
    claimed when looked up (``key in cache``, as ``Ctx.cached`` does): computed here if
    this rank wins the claim, else fetched from the rank that did, waiting for it if need
    be. ``jobs``: the function that computes each listed entry (``None``: no list, so an
    entry this rank wins is computed by the caller, as in one process, and nobody waits
    for it). ``computed``: the shared entries this rank computed, in order."""

    def __init__(self, entries: dict[Key, Any], jobs: dict[Key, Callable[[], Any]] | None,
                 exchange: _Exchange) -> None:
        super().__init__(entries)
        self.jobs = jobs
        self.exchange = exchange
        self.computed: list[Key] = []

    def __contains__(self, key: object) -> bool:
        if super().__contains__(key):
            return True
        if not _is_shared(key):
            return False
        assert isinstance(key, tuple)
        job = None if self.jobs is None else self.jobs.get(key)
        if self.jobs is not None and job is None:
            return False  # not listed: computed here by the caller, as in one process
        if not self.exchange.claim(key):
            super().__setitem__(key, self.exchange.fetch(key))
            return True
        if job is None:
            self.computed.append(key)
            return False  # claimed: the caller computes it (and nobody waits for it)
        self._run(key, job)
        return True

    def _run(self, key: Key, job: Callable[[], Any]) -> None:
        try:
            value = job()
        except Exception as err:
            self.exchange.publish(key, b"e" + str(err).encode())
            raise
        self.exchange.publish(key, _encode(value))
        self.computed.append(key)
        super().__setitem__(key, value)

    def lend(self, keys: Iterable[Key], device: torch.device) -> None:
        """Claim each of ``keys`` in turn and compute the ones won (on one thread)."""
        assert self.jobs is not None
        with one_thread(device):
            for key in keys:
                if not super().__contains__(key) and self.exchange.claim(key):
                    self._run(key, self.jobs[key])


# --------------------------------------------------------------------------- the walk


def _opnorm_on(w: Const, method: str, device: torch.device) -> float:
    """``Ctx.opnorm`` of ``w`` computed on ``device``."""
    return Ctx(1, method=method).opnorm(Const(w.t.to(device), w.name))


@dataclass
class _Recorder(Ctx):
    """A walk's context: each shared norm-cache entry it is asked for is listed in
    ``jobs`` (with the function that computes it) and answered by a stand-in."""

    device: torch.device = _CPU
    jobs: dict[Key, Callable[[], Any]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)  # a listed matrix's number of rows

    def opnorm(self, w: Const) -> float:
        key = (w.name, "opnorm", self.method)
        if w.name is not None and w.t.dim() >= 2 and key not in self.norm_cache:
            self.jobs.setdefault(key, lambda: _opnorm_on(w, self.method, self.device))
            if w.t.dim() == 2:
                self.rows[w.name] = w.t.shape[0]
        return 1.0

    def cached(self, cache: dict[Any, Any], key: Key, make: Any) -> Any:
        if cache is self.norm_cache and _is_shared(key) and key not in cache:
            if key[1] == "conv":
                self.jobs.setdefault(key, make)
                return 1.0
            if key[1] == "rownorms" and key[0] in self.rows:
                self.jobs.setdefault(key, make)
                return torch.ones(self.rows[key[0]], dtype=F64)
        return super().cached(cache, key, make)


def _walk(prop: Propagator, domain: Any, sample_shape: Sequence[int],
          device: torch.device) -> dict[Key, Callable[[], Any]]:
    """The shared entries ``prop``'s global pass asks for, in graph order (module
    docstring)."""
    recorder = _Recorder(prop.static_batch or 1, method=prop.method, ibp=False,
                         lip_only=True, norm_cache=prop.norm_cache, device=device)
    walker = copy.copy(prop)
    walker.context = lambda n, radius, ibp=True: recorder  # type: ignore[method-assign]
    # The list only saves time: a walk that stops at an error (a rule's failure on a
    # stand-in, or one the propagation meets and reports: each is a LipcertError) lists
    # fewer entries, each then computed by the rank that needs it.
    with suppress(LipcertError):
        walker.run(domain, sample_shape=tuple(sample_shape))
    return recorder.jobs


# --------------------------------------------------------------------------- entry points


def share_norms(prop: Propagator, domain: Any, sample_shape: Sequence[int],
                device: torch.device | None = None) -> None:
    """Make ``prop``'s norm cache a :class:`SharedNorms` (module docstring) for its
    propagations on ``domain`` with samples of ``sample_shape``: within :func:`sharing`
    shared with the other ranks, else this rank's own, computed on ``device`` (nothing
    changes in one process on the CPU). Returns when the entries this rank claims before
    propagating are computed (none when rank 0 alone propagates)."""
    w = world()
    device = device or _CPU
    plan = _PLAN.get() if w.size > 1 else None
    if plan is None:  # this rank alone: its own norms, on the device
        if device.type != "cpu":
            prop.norm_cache = SharedNorms(prop.norm_cache,
                                          _walk(prop, domain, sample_shape, device),
                                          _Exchange(None))
        return
    when_needed = w.main and plan.propagating == {0}
    jobs = None if when_needed and device.type == "cpu" else _walk(
        prop, domain, sample_shape, device)
    cache = SharedNorms(prop.norm_cache, jobs, _Exchange(plan.kv))
    prop.norm_cache = cache
    if not when_needed:
        order = list(cache.jobs or {})
        cache.lend(order if w.main else reversed(order), device)


def lend_norms(model: nn.Module | ExportedProgram, example: Tensor, *, domain: Any,
               method: str, device: torch.device) -> SharedNorms | None:
    """This rank's part of the norms of ``model`` (as ``certify`` prepares it, with
    ``example`` inputs) within :func:`sharing`, for a rank that propagates nothing. Returns
    the cache (``None`` when there was nothing to share)."""
    prop = Propagator(as_program(model, example[:2]), method=method)
    share_norms(prop, domain, example.shape[1:], device)
    return prop.norm_cache if isinstance(prop.norm_cache, SharedNorms) else None

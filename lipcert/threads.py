"""Running small tensor work on one CPU thread.

Bound propagation and certified norms do many small kernels (Gram eigensolvers, interval
products of a few thousand elements). With torch's multithreaded kernels on busy cores they
were measured 10–1000× slower here (a 768×768 ``eigvalsh``: 11 s instead of 0.04 s next to a
training run), dominated by thread synchronisation. :func:`one_thread` runs a region on one
thread; :func:`big_work` gives the threads back inside it for large products. The setting
is process-wide while it lasts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_ONE_THREAD_BELOW = 5e7  # flops; smaller products stay on one thread
_saved_threads: list[int] = []


@contextmanager
def one_thread(device: torch.device | None = None) -> Iterator[None]:
    """Run the block on one CPU thread (nothing changes for a non-CPU ``device``)."""
    if device is not None and device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    _saved_threads.append(before)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _saved_threads.pop()
        torch.set_num_threads(before)


@contextmanager
def big_work(flops: float) -> Iterator[None]:
    """Inside :func:`one_thread`, all the threads it saved for a product of ≥ 5e7 flops."""
    if flops < _ONE_THREAD_BELOW or not _saved_threads:
        yield
        return
    now = torch.get_num_threads()
    torch.set_num_threads(_saved_threads[-1])
    try:
        yield
    finally:
        torch.set_num_threads(now)

"""Errors of the bound propagation engine (both are ``LipcertError``s: one clear line, exit 2)."""

from __future__ import annotations

from lipcert.errors import LipcertError


class UnsupportedOpError(LipcertError):
    """A graph node whose operator has no bound rule; the message says how to add one."""


class BatchMixingError(LipcertError):
    """An operation combines different samples of the batch, so per-sample bounds do not
    exist (for example a reduction over the batch dimension, or batch norm in train mode)."""

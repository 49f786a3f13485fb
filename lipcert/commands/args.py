"""Argument types shared by the subcommands: each turns a flag's text into a value, and a
bad value into an argparse usage error (exit status 2, one line)."""

from __future__ import annotations

import argparse
import math

from attacks.registry import parse_eps
from lipcert.errors import LipcertError

__all__ = ["add_input_arguments", "bool_argument", "eps_argument", "seconds_argument"]


def eps_argument(text: str) -> list[float]:
    """An ε grid such as ``0.25,0.5`` or ``8/255,0.1`` (``attacks.registry.parse_eps``)."""
    try:
        return parse_eps(text)
    except LipcertError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def bool_argument(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no, on/off), case-insensitive."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def seconds_argument(text: str) -> float:
    """A duration in seconds: a number > 0, or ``inf`` for no limit."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """``--inputs``, ``--domain`` and ``--embedding-table`` (``lipcert.user_inputs``)."""
    p.add_argument("--inputs", default=None, metavar="FILE.safetensors",
                   help="the user's own samples instead of --data: a safetensors file with "
                   "tensors x (N, ...) and y (N,) integer labels (a text model exported on "
                   "inputs_embeds: x = embedded sequences (N, T, d), y = next tokens); "
                   "needs --domain or --embedding-table")
    p.add_argument("--domain", default=None, metavar="DOMAIN",
                   help="with --inputs, the input set the bounds hold on: box:LO,HI (every "
                   "element in [LO, HI]), embedding-ball:R (every token, along the last "
                   "dimension, of L2 norm <= R) or none (unbounded)")
    p.add_argument("--embedding-table", default=None, metavar="FILE.safetensors",
                   help="with --inputs, the domain is the ball of the largest row norm of "
                   "this file's one 2-D tensor (the model's embedding table)")

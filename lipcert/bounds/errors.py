"""Errors of the bound propagation engine and their messages. All are ``LipcertError``s: the
CLI prints the message and exits with status 2, never a traceback."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lipcert.errors import LipcertError


class UnsupportedOpError(LipcertError):
    """A graph node whose operator has no bound rule; the message says how to add one."""


class BatchMixingError(LipcertError):
    """An operation combines different samples of the batch, so per-sample bounds do not
    exist (for example a reduction over the batch dimension, or batch norm in train mode)."""


class RuleError(LipcertError):
    """A bound rule (or the exact evaluation of an input-independent node) raised an
    unexpected exception; the one-line message names the graph node, its operator and
    module, and the original message."""


_RULE_FILES = [
    ("norm.py", ("norm",)),
    ("pool.py", ("pool",)),
    ("attention.py", ("attention",)),
    ("linear.py", ("conv", "mm", "linear", "matmul", "einsum", "bilinear")),
    ("shape.py", ("view", "reshape", "permute", "index", "gather", "scatter", "pad", "roll",
                  "flip", "select", "slice", "cat", "stack", "split", "squeeze", "expand",
                  "repeat", "transpose", "unfold", "narrow", "chunk")),
    ("order.py", ("max", "min", "sort", "topk")),
    ("arithmetic.py", ("add", "sub", "mul", "div", "sum", "mean", "prod",
                       "cumsum", "where", "fill")),
]
_SHOWN_NODES = 5  # graph nodes listed per unsupported operator


def op_names(target: Any) -> tuple[str, str]:
    """(display name, Python expression for registering a rule) of a graph target."""
    if hasattr(target, "overloadpacket"):
        ns = getattr(target, "namespace", "aten")
        packet = target.overloadpacket.__name__
        return str(target), f"torch.ops.{ns}.{packet}"
    name = getattr(target, "__name__", repr(target))
    mod = getattr(target, "__module__", "")
    return f"{mod}.{name}" if mod else name, f"{mod}.{name}" if mod else name


def rule_file(target: Any) -> str:
    """The file of ``lipcert/bounds/rules/`` where a rule for ``target`` belongs."""
    if hasattr(target, "overloadpacket") and getattr(target, "namespace", "aten") != "aten":
        return "custom.py"
    name = getattr(getattr(target, "overloadpacket", target), "__name__", str(target)).lower()
    for file, keys in _RULE_FILES:
        if any(k in name for k in keys):
            return file
    return "activation.py"


def module_of(node: Any) -> tuple[str, str]:
    """(path, class) of the innermost module a node came from; ('', '') if unknown."""
    stack = getattr(node, "meta", {}).get("nn_module_stack") or {}
    entries = [v for v in stack.values() if isinstance(v, tuple) and len(v) == 2]
    if not entries:
        return "", ""
    path, cls = entries[-1]
    return str(path), cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))


def where(node: Any) -> str:
    """"graph node 'x', from module 'path' (Class)" for a message (``node`` may be None)."""
    path, cls = module_of(node)
    origin = f"module '{path}' ({cls})" if path else "the model's top level"
    return f"graph node '{getattr(node, 'name', '?')}', from {origin}"


def unsupported_message(nodes: Sequence[tuple[Any, Any]]) -> str:
    """The message for ``(target, graph node or None)`` pairs whose operators have no bound
    rule: every operator with the nodes it appears at (and their modules), the file its rule
    belongs in, and how a rule is registered."""
    by_op: dict[Any, list[Any]] = {}
    for target, node in nodes:
        by_op.setdefault(target, []).append(node)
    entries = []
    for target, at in by_op.items():
        shown, expr = op_names(target)
        places = "; ".join(where(n) for n in at[:_SHOWN_NODES])
        more = f"; and {len(at) - _SHOWN_NODES} more nodes" if len(at) > _SHOWN_NODES else ""
        entries.append((shown, expr, f"{places}{more}", rule_file(target)))
    tail = ('        """<the derivation of the bound>"""\n'
            "        return Bound(...)\n"
            "(see lipcert/bounds/state.py for what a Bound holds).")
    if len(entries) == 1:
        shown, expr, places, file = entries[0]
        return (f"no bound rule for operator {shown} ({places}). Add one in "
                f"lipcert/bounds/rules/{file}:\n"
                f"    @lipcert.bounds.rule({expr})\n"
                f"    def {expr.rsplit('.', 1)[-1]}(ctx, x, *args):\n" + tail)
    lines = [f"no bound rule for {len(entries)} operators:"]
    lines += [f"- {shown} ({places}): add @lipcert.bounds.rule({expr}) in "
              f"lipcert/bounds/rules/{file}" for shown, expr, places, file in entries]
    lines += ["A rule looks like:", "    @lipcert.bounds.rule(torch.ops.aten.<op>)",
              "    def <op>(ctx, x, *args):"]
    return "\n".join(lines) + "\n" + tail


def rule_failure_message(node: Any, err: BaseException) -> str:
    """One line: the failing node, its operator and module, and the original error."""
    text = " ".join(str(err).split()) or "(no message)"
    return (f"the bound rule of {op_names(getattr(node, 'target', None))[0]} failed at "
            f"{where(node)}: {type(err).__name__}: {text}")

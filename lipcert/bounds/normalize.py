"""Getting a program into the form the rules expect, once per program, before propagation.

* :func:`as_program` exports a module with ``torch.export`` (eval mode, dynamic batch).
* :func:`normalize_program` functionalises in-place operators (``relu_``, ``add_``, ``mul_``,
  … as a ResNet's graph holds them) and decomposes operators that have no bound rule into
  operators that may have one, with ``ExportedProgram.run_decompositions`` and a table
  restricted to those operators, so an operator with a rule is not decomposed (its own rule
  is usually tighter than the composition of its parts' rules). A program with neither is
  returned as it is. Retracing also lowers the few composite operators that torch cannot
  keep (``reshape``/``flatten`` to ``view``, ``batch_norm`` to
  ``_native_batch_norm_legit_no_training``, eval-mode ``dropout`` and ``contiguous``
  removed), all of which have rules giving the same bounds (checked on the test models).
* :func:`unsupported_nodes` lists every node that will need a rule and has none, so that one
  error can name them all before any bound is computed.
* :func:`copy_graph` and :func:`push_selections` rewrite a copy of the graph:
  ``select(f(x))`` becomes ``f(select(x))`` for row-wise maps f, so rows that are thrown
  away are never bounded.

A node needs a rule when it depends on the model input through tensors: the input itself,
or a call whose tensor-valued arguments include such a node. Nodes that depend on it only
through sizes (``sym_size`` and what is computed from it, and the outputs of rules annotated
to return a ``Const``, such as ``zeros_like``) are evaluated exactly, like every
input-independent node.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from lipcert.bounds.registry import lookup
from lipcert.bounds.state import Const
from lipcert.errors import LipcertError

_MAX_ROUNDS = 4  # decomposition rounds: a decomposition may emit ops that decompose further


def as_program(model: nn.Module | ExportedProgram, example: Tensor) -> ExportedProgram:
    """``torch.export`` a module (in eval mode, batch dimension dynamic where possible)."""
    if isinstance(model, ExportedProgram):
        return model
    if not isinstance(model, nn.Module):
        raise LipcertError(f"expected an nn.Module or ExportedProgram, got {type(model).__name__}")
    ex = example if example.shape[0] >= 2 else example.expand(2, *example.shape[1:]).clone()
    training = model.training
    model.eval()
    try:
        try:
            return torch.export.export(
                model, (ex,), dynamic_shapes=({0: torch.export.Dim.AUTO},)
            )
        except Exception:
            return torch.export.export(model, (ex,))
    finally:
        model.train(training)


# --------------------------------------------------------------------------- normalisation


def user_input_names(program: ExportedProgram) -> list[str]:
    """Names of the program's user-input placeholders."""
    return [spec.arg.name for spec in program.graph_signature.input_specs
            if spec.kind == InputKind.USER_INPUT]


def _carries_tensors(node: torch.fx.Node) -> bool:
    """Whether a node's value holds tensors (unknown values count as tensors)."""
    val = node.meta.get("val")
    if val is None:
        return True
    if isinstance(val, list | tuple):
        return any(isinstance(v, Tensor) for v in val)
    return isinstance(val, Tensor)


def _constant_result(fn: Any) -> bool:
    """Whether a rule is annotated to return a ``Const`` (a value that does not depend on
    the input: the shape-only operators such as ``zeros_like``)."""
    return getattr(fn, "__annotations__", {}).get("return") in ("Const", Const)


def unsupported_nodes(graph: torch.fx.Graph, inputs: list[str]) -> list[torch.fx.Node]:
    """The call nodes that depend on the placeholders ``inputs`` through tensors (module
    docstring) and whose operator has no rule, in graph order. ``getitem`` on an operator's
    tuple of outputs needs none."""
    dependent: set[torch.fx.Node] = set()
    missing = []
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name in inputs:
                dependent.add(node)
            continue
        if node.op != "call_function" or not any(
                a in dependent and _carries_tensors(a) for a in node.all_input_nodes):
            continue
        fn = lookup(node.target)
        if fn is None and node.target is not operator.getitem:
            missing.append(node)
        if not _constant_result(fn):
            dependent.add(node)
    return missing


def _mutates(graph: torch.fx.Graph) -> bool:
    """Whether any call in the graph is an in-place (mutating) operator."""
    return any(node.op == "call_function" and getattr(
        getattr(node.target, "_schema", None), "is_mutable", False) for node in graph.nodes)


def normalize_program(program: ExportedProgram) -> ExportedProgram:
    """The program with in-place operators functionalised and operators without a rule
    decomposed (module docstring); the program itself when it needs neither."""
    inputs = user_input_names(program)
    missing = {n.target for n in unsupported_nodes(program.graph, inputs)}
    mutates = _mutates(program.graph)
    if not missing and not mutates:
        return program
    available = torch.export.default_decompositions().materialize()  # a plain dict
    tried: set[Any] = set()
    for _ in range(_MAX_ROUNDS):
        table = {op: available[op] for op in missing - tried if op in available}
        if not table and not mutates:
            break
        try:
            program = program.run_decompositions(table)
        except Exception as err:  # torch raises many types for a graph it cannot retrace
            text = " ".join(str(err).split())
            raise LipcertError(f"cannot functionalise and decompose the exported program "
                               f"for bound propagation: {type(err).__name__}: {text}") from err
        mutates = False
        tried |= set(table)
        missing = {n.target for n in unsupported_nodes(program.graph, inputs)}
    return program


# --------------------------------------------------------------------------- rewriting


def copy_graph(graph: torch.fx.Graph) -> tuple[torch.fx.Graph, dict[str, str]]:
    """A copy of ``graph`` (metadata kept) and the map from old to new node names (a copy
    may rename nodes whose names shadow Python builtins, such as ``input``)."""
    new = torch.fx.Graph()
    val_map: dict[Any, Any] = {}
    out = new.graph_copy(graph, val_map)
    new.output(out)
    return new, {old.name: copied.name for old, copied in val_map.items()}


_ROWWISE_SCALAR = (torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor)


def _rowwise(node: Any, dim: int) -> bool:
    """Maps that commute with selecting index i of dimension ``dim`` (not the last): maps
    acting on each row alone and the same for all rows (linear layers, scalings), and slices
    along an earlier dimension."""
    if node.op != "call_function" or not node.args:
        return False
    if node.target is torch.ops.aten.linear.default:
        return True
    if node.target is torch.ops.aten.slice.Tensor:
        d = node.args[1] if len(node.args) > 1 else 0
        return isinstance(d, int) and 0 <= d < dim  # a negative dim would shift
    return node.target in _ROWWISE_SCALAR and isinstance(node.args[1], int | float)


def push_selections(graph: torch.fx.Graph) -> torch.fx.Graph:
    """Rewrite ``select(f(x), d, i)`` as ``f(select(x, d, i))`` for chains f of row-wise maps
    (linear layers, scalings) and d not the last dimension: the same function, but the
    rows that are thrown away (a GPT's logits at every position but the certified one) are
    never bounded. Rewrites ``graph`` in place (give it a copy); nn_module_stack is kept."""
    select = torch.ops.aten.select.int
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not select:
            continue
        src, dim, index = node.args[0], node.args[1], node.args[2]
        val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
        if not isinstance(val, Tensor) or not isinstance(dim, int):
            continue
        rank = val.dim()
        dim = dim % rank
        if dim == rank - 1:
            continue
        chain = []
        cur = src
        while isinstance(cur, torch.fx.Node) and len(cur.users) == 1 and _rowwise(cur, dim):
            chain.append(cur)
            cur = cur.args[0]
        if not any(c.target is torch.ops.aten.linear.default for c in chain):
            continue
        if not isinstance(cur, torch.fx.Node):
            continue
        first = chain[-1]
        with graph.inserting_before(first):
            moved = graph.call_function(select, (cur, dim, index))
        moved.meta = dict(node.meta)
        first.args = (moved, *first.args[1:])
        node.replace_all_uses_with(src)
        graph.erase_node(node)
    graph.lint()
    return graph

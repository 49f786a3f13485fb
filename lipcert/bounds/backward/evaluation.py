"""Float64 evaluation of an exported graph at the centre input: every node's value, with
attention written out (its scores and probabilities are needed too, and the fused CPU
kernel has no forward-mode derivative) and runtime checks skipped.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.fx.node import map_arg
from torch.utils._pytree import tree_map

SDPA = torch.ops.aten.scaled_dot_product_attention.default
# Runtime checks of an exported program (dtype and shape asserts): no value, and a float64
# evaluation would fail their dtype checks, so the evaluators here skip them.
RUNTIME_CHECKS = (
    torch.ops.aten._assert_tensor_metadata, torch.ops.aten._assert_scalar,
    torch.ops.aten.sym_constrain_range_for_size, torch.ops.aten._assert_async,
    torch.ops.aten.sym_constrain_range,
)


def is_runtime_check(target: Any) -> bool:
    return getattr(target, "overloadpacket", target) in RUNTIME_CHECKS


def evaluable(target: Any) -> Any:
    """The op to evaluate for ``target`` here: attention written out (the fused CPU kernel
    has no forward-mode derivative), and view as reshape (the written-out attention's
    output strides differ from the fused kernel's, which a later view may rely on)."""
    if target is SDPA:
        return attention_parts_exact
    if target is torch.ops.aten.view.default:
        return torch.ops.aten.reshape.default
    return target


def attention_parts_exact(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                          dropout_p: float = 0.0, is_causal: bool = False, *,
                          scale: float | None = None, enable_gqa: bool = False
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """(Y, S, P) of scaled_dot_product_attention written out: S = c·QKᵀ (+ mask),
    P = softmax(S), Y = P V."""
    c = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = c * (q @ k.transpose(-1, -2))
    L, S = q.shape[-2], k.shape[-2]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, -math.inf)
        else:
            s = s + attn_mask.to(s.dtype)
    if is_causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), -math.inf)
    p = torch.softmax(s, dim=-1)
    return p @ v, s, p


def as_f64(tree: Any) -> Any:
    """Every floating tensor in ``tree`` as float64: constants the program creates itself
    (an empty cache, a float32 buffer) meet float64 values in ops such as cat."""
    return tree_map(lambda t: t.to(torch.float64) if isinstance(t, Tensor)
                    and t.is_floating_point() and t.dtype != torch.float64 else t, tree)


def node_values(graph: torch.fx.Graph, consts: dict[str, Any], input_name: str, x: Tensor
                ) -> dict[str, Any]:
    """Every node's value at ``x`` in float64 (an attention node: its output; runtime checks:
    None), differentiable if ``x`` requires grad."""
    vals: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            vals[node.name] = x if node.name == input_name else consts[node.name]
        elif node.op == "call_function" and is_runtime_check(node.target):
            vals[node.name] = None
        elif node.op == "call_function":
            args, kwargs = as_f64((map_arg(node.args, lambda a: vals[a.name]),
                                   map_arg(dict(node.kwargs), lambda a: vals[a.name])))
            res = evaluable(node.target)(*args, **kwargs)
            vals[node.name] = res[0] if node.target is SDPA else res
    return vals

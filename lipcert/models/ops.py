"""Custom operators that lipcert's models use, registered with ``torch.library``.

They are custom ops (not plain compositions of ATen ops in the model code) so that
``torch.export`` keeps each as one node whose Lipschitz rule is known exactly, instead of a
chain of ``norm``/``div``/``clamp`` nodes that a generic rule table could only bound
loosely. Each is registered as ``CompositeImplicitAutograd``: in eager mode it decomposes
into ATen ops, so reverse mode, forward mode (``torch.func.jvp``) and ``vmap`` all see the
true derivative, while ``torch.export`` keeps the single node.
"""

from __future__ import annotations

import torch

from lipcert.errors import LipcertError

_LIBRARY = torch.library.Library("lipcert", "DEF")
_LIBRARY.define("token_ball(Tensor x, float radius) -> Tensor")


def _token_ball(x: torch.Tensor, radius: float) -> torch.Tensor:
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.clamp(radius / norms.clamp_min(1e-30), max=1.0)


_LIBRARY.impl("token_ball", _token_ball, "CompositeImplicitAutograd")


def token_ball(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Project every token (last dimension) onto the L2 ball of the given radius.

    ``x_i ↦ x_i · min(1, radius / ‖x_i‖₂)``. A projection onto a closed convex set is
    non-expansive, so this map is 1-Lipschitz per token, hence 1-Lipschitz in both the
    whole-tensor L2 norm and the max-token norm ‖·‖_{2,∞}, and its output tokens have
    ‖y_i‖₂ ≤ radius. With ``radius = √d`` it caps each token's RMS norm at 1, which is
    the paper's RMS-normalised embedding.
    """
    return torch.ops.lipcert.token_ball(x, radius)


_LIBRARY.define("group_sort2(Tensor x) -> Tensor")


def _group_sort2(x: torch.Tensor) -> torch.Tensor:
    pairs = x.unflatten(-1, (-1, 2))
    low, high = pairs.amin(-1, keepdim=True), pairs.amax(-1, keepdim=True)
    return torch.cat([low, high], dim=-1).flatten(-2)


_LIBRARY.impl("group_sort2", _group_sort2, "CompositeImplicitAutograd")


def group_sort2(x: torch.Tensor) -> torch.Tensor:
    """GroupSort with groups of two ("MaxMin", Anil et al. 2019), along the last dimension.

    Each adjacent pair (x_{2i}, x_{2i+1}) becomes (min, max). It permutes the entries of
    every pair, so it preserves every norm, and it is 1-Lipschitz in L2: for sorted pairs
    the rearrangement inequality gives p₍₁₎q₍₁₎ + p₍₂₎q₍₂₎ ≥ p·q, hence
    ‖sort(p) − sort(q)‖² ≤ ‖p − q‖². It is deel-torchlip's ``GroupSort2`` on (B, C) inputs.
    """
    if x.shape[-1] % 2:
        raise LipcertError(f"group_sort2 needs an even last dimension, got {x.shape[-1]}")
    return torch.ops.lipcert.group_sort2(x)

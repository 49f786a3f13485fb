"""lipcert's own custom operators (``lipcert.models.ops``)."""

from __future__ import annotations

import torch

import lipcert.models.ops  # noqa: F401  (registers the torch.ops.lipcert operators)
from lipcert.bounds.registry import rule
from lipcert.bounds.state import Bound, Ctx


@rule(torch.ops.lipcert.token_ball)
def token_ball(ctx: Ctx, x: Bound, radius: float) -> Bound:
    """Projection of every token onto the L2 ball of radius ρ: a projection onto a closed
    convex set is non-expansive, so it is 1-Lipschitz per token (lip and lip_tok unchanged)
    and every output token has norm ≤ ρ. Each y_i = t·x_i with t ∈ (0, 1], so
    y_i ∈ [min(lo_i, 0), max(hi_i, 0)] ∩ [−ρ, ρ]."""
    rho = float(radius)
    return Bound(
        torch.minimum(x.lo, torch.zeros(())).clamp(min=-rho),
        torch.maximum(x.hi, torch.zeros(())).clamp(max=rho),
        x.lip,
        x.lip_tok,
        x.norm,
        torch.clamp(x.tok_norm, max=rho * (1 + 1e-15)),
        sid=x.sid,
        tok_l1=x.tok_l1,
    )


@rule(torch.ops.lipcert.group_sort2)
def group_sort2(ctx: Ctx, x: Bound) -> Bound:
    """Sorting each adjacent pair (``lipcert.models.ops.group_sort2``): a permutation within
    each pair, 1-Lipschitz in L2 (rearrangement inequality, see the op), so lip and lip_tok
    are unchanged and every norm bound carries over. For a pair (a, b) with a ∈ [lo_a, hi_a],
    b ∈ [lo_b, hi_b]: min(a, b) ∈ [min(lo_a, lo_b), min(hi_a, hi_b)] and
    max(a, b) ∈ [max(lo_a, lo_b), max(hi_a, hi_b)]."""
    lo, hi = x.lo.unflatten(-1, (-1, 2)), x.hi.unflatten(-1, (-1, 2))
    new_lo = torch.stack([lo.amin(-1), lo.amax(-1)], dim=-1).flatten(-2)
    new_hi = torch.stack([hi.amin(-1), hi.amax(-1)], dim=-1).flatten(-2)
    return Bound(new_lo, new_hi, x.lip, x.lip_tok, x.norm, x.tok_norm, sid=x.sid,
                 tok_l1=x.tok_l1)

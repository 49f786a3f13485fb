"""lipcert's own custom operators (``lipcert.models.ops``)."""

from __future__ import annotations

import torch

import lipcert.models.ops  # noqa: F401  (registers torch.ops.lipcert.token_ball)
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

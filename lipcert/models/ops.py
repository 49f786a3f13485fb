"""Custom operators that lipcert's models use, registered with ``torch.library``.

They are custom ops (not compositions of ATen ops) so that ``torch.export`` keeps each as
one node whose Lipschitz rule is known exactly, instead of a chain of ``norm``/``div``/
``clamp`` nodes that a generic rule table could only bound loosely.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("lipcert::token_ball", mutates_args=())
def token_ball(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Project every token (last dimension) onto the L2 ball of the given radius.

    ``x_i ↦ x_i · min(1, radius / ‖x_i‖₂)``. A projection onto a closed convex set is
    non-expansive, so this map is 1-Lipschitz per token, hence 1-Lipschitz in both the
    whole-tensor L2 norm and the max-token norm ‖·‖_{2,∞}, and its output tokens have
    ‖y_i‖₂ ≤ radius. With ``radius = √d`` it caps each token's RMS norm at 1, which is
    the paper's RMS-normalised embedding.
    """
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.clamp(radius / norms.clamp_min(1e-30), max=1.0)


@token_ball.register_fake
def _token_ball_fake(x: torch.Tensor, radius: float) -> torch.Tensor:
    return torch.empty_like(x)


def _token_ball_setup(ctx, inputs, output) -> None:
    x, radius = inputs
    ctx.save_for_backward(x)
    ctx.radius = radius


def _token_ball_backward(ctx, grad: torch.Tensor):
    """Vector-Jacobian product of the projection.

    Inside the ball the Jacobian is I. Outside, y = r·x/‖x‖ and
    J = (r/‖x‖)(I − x̂x̂ᵀ), so Jᵀg = (r/‖x‖)(g − x̂(x̂·g)).
    """
    (x,) = ctx.saved_tensors
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-30)
    unit = x / norms
    projected = (ctx.radius / norms) * (grad - unit * (unit * grad).sum(-1, keepdim=True))
    return torch.where(norms > ctx.radius, projected, grad), None


token_ball.register_autograd(_token_ball_backward, setup_context=_token_ball_setup)

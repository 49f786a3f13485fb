"""The paper-style Lipschitz bound of a Lipschitz-family model, composed module by module.

Each module knows its own sensitivity (modula's idea); the bound of the network is their
composition. Perturbations of the token sequence are measured in the max-token norm
‖E‖_{2,∞} = max_i ‖e_i‖₂, which never exceeds the whole-tensor L2 norm, so the result
also bounds ‖f(x) − f(y)‖₂ / ‖x − y‖₂ for inputs x, y (images, or embedded sequences).

With σ(·) the exact spectral norm, R the per-token norm bound of a sublayer's input,
c = softmax_scale / d_head and α = 1/(2·n_layers):

* input: the ViT's patch embedding gives max_i ‖W δ_i‖ ≤ σ(W_pe)·‖δ‖₂; the token ball is
  1-Lipschitz and sets R = √d;
* attention (the paper's form, DESIGN.md "Attention in the max-token norm"):
  σ(W_O)·σ(W_V)·(1 + 2R²·c·σ(W_Q)·σ(W_K)) / 3. It is proven for one head; for several
  heads it is the paper's claim, which lipcert's certifier does not rely on;
* MLP: σ(W_down)·σ(W_up)·g/1.1289, with g = 1.128904… GELU's exact largest slope;
* sublayer with convex residual: (1 − α) + α·Lip(f), and R ← (1 − α)·R + α·R_f, where
  R_f = σ(W_O)·(Σ_h σ(W_V,h)²)^{1/2}·R/3 for attention (every head mixes values of norm
  ≤ σ(W_V,h)·R) and σ(W_down)·σ(W_up)·R/1.1289 for the MLP (|GELU(z)| ≤ |z|);
* head: mean pooling (ViT) or one position (GPT) is 1-Lipschitz from ‖·‖_{2,∞} to ℓ2,
  then final_scale·σ(W_head).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lipcert.models.blocks import GELU_SLOPE_PAPER, Attention, Block

GELU_MAX_SLOPE = 1.1289042  # Φ(√2) + √2·φ(√2) = 1.12890415…, rounded up


def _sigma(weight: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(weight.detach().double(), ord=2).item()


def _attention(attn: Attention, radius: float) -> tuple[float, float]:
    """(Lipschitz bound, output token-norm bound) of one attention sublayer's f."""
    c = attn.score_scale
    s_q, s_k, s_v, s_o = (_sigma(m.weight) for m in (attn.q, attn.k, attn.v, attn.o))
    lip = s_o * s_v * (1 + 2 * radius**2 * c * s_q * s_k) * attn.output_scale
    heads = attn.v.weight.detach().double().view(attn.n_heads, attn.d_head, -1)
    per_head = math.sqrt(sum(_sigma(h) ** 2 for h in heads))
    return lip, s_o * per_head * radius * attn.output_scale


def _mlp(block: Block, radius: float) -> tuple[float, float]:
    gain = _sigma(block.mlp.up.weight) * _sigma(block.mlp.down.weight) / GELU_SLOPE_PAPER
    return gain * GELU_MAX_SLOPE, gain * radius


@torch.no_grad()
def paper_lipschitz_bound(model: nn.Module) -> float:
    """The composed bound above for a Lipschitz-family ViT or GPT (inputs: images, or
    token embeddings for the GPT). Raises ``ValueError`` for the standard family."""
    config = model.config
    if config.family != "lipschitz":
        raise ValueError("the paper's bound is defined for the lipschitz family only")
    lip = _sigma(model.patch_embed.weight) if config.arch == "vit" else 1.0
    radius = math.sqrt(config.d_model)
    for block in model.blocks:
        a = block.alpha
        for sublayer in (lambda r, b=block: _attention(b.attn, r),
                         lambda r, b=block: _mlp(b, r)):
            f_lip, f_radius = sublayer(radius)
            lip *= (1 - a) + a * f_lip
            radius = (1 - a) * radius + a * f_radius
    head = model.head if config.arch == "vit" else model.unembed
    return lip * config.final_scale * _sigma(head.weight)

"""A small Vision Transformer classifier: patch embedding, transformer blocks, mean pooling,
linear head (nanoGPT-style, in one readable file)."""

from __future__ import annotations

import math

import torch
from torch import nn

from lipcert import spectral
from lipcert.models.blocks import (
    Block,
    blocks_lipschitz_bound,
    require_lipschitz_family,
    zero_init_outputs,
)
from lipcert.models.config import ModelConfig
from lipcert.models.ops import token_ball


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) → (B, N, C·p·p), non-overlapping p×p patches in row-major order (a
    permutation of the pixels)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


class ViT(nn.Module):
    """Images (B, C, H, W) in [0, 1] → logits (B, num_classes).

    Lipschitz family: tokens = ball_{√d}(W_pe·patch_i + p_i) (each token's RMS norm at
    most 1), convex-residual blocks, mean over tokens, logits = final_scale · W_head·pooled.
    Standard family: pre-LN blocks, a final LayerNorm, biases, no scale.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config
        bias = c.family == "standard"
        self.n_patches = (c.image_size // c.patch_size) ** 2
        self.patch_embed = nn.Linear(c.channels * c.patch_size**2, c.d_model, bias=bias)
        self.pos_embed = nn.Parameter(torch.randn(self.n_patches, c.d_model) * 0.02)
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_heads, c.mlp_hidden, c.family, c.n_layers, causal=False,
                  softmax_scale=c.softmax_scale)
            for _ in range(c.n_layers)
        )
        self.norm = nn.LayerNorm(c.d_model) if c.family == "standard" else nn.Identity()
        self.head = nn.Linear(c.d_model, c.num_classes, bias=bias)
        if c.zero_init_out:
            zero_init_outputs(self.blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(patchify(images, self.config.patch_size)) + self.pos_embed
        if self.config.family == "lipschitz":
            x = token_ball(x, math.sqrt(self.config.d_model))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x).mean(dim=1))
        return logits * self.config.final_scale if self.config.final_scale != 1.0 else logits

    @torch.no_grad()
    def lipschitz_bound(self) -> float:
        """The paper-style L2 bound from image to logits (lipschitz family;
        ``lipcert.models.blocks`` explains the max-token norm it is composed in):

            σ(W_pe) · Π_blocks Lip(block; R) · final_scale · σ(W_head),   R = √d at the start

        The patch embedding gives max_i ‖W_pe·δ_i‖ ≤ σ(W_pe)·‖δ‖₂ (patchify is a permutation),
        the token ball is 1-Lipschitz and sets R = √d, and mean pooling is 1-Lipschitz from
        ‖·‖_{2,∞} to ℓ2. σ are verified upper values; for several heads the attention factor
        is the paper's claim (see ``Attention.lipschitz_bound``)."""
        c = self.config
        require_lipschitz_family(c.family)
        blocks = blocks_lipschitz_bound(self.blocks, math.sqrt(c.d_model))
        return (spectral.exact(self.patch_embed.weight).value * blocks * c.final_scale
                * spectral.exact(self.head.weight).value)

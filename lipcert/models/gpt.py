"""A character-level GPT (nanoGPT-style, in one readable file).

Certification and embedding-space attacks perturb the token embeddings, so the model is
split into ``token_embeddings(idx)`` and ``forward_embeddings(e)``; ``EmbeddingSpaceGPT``
exposes the second as a module whose input is the embedded sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


class GPT(nn.Module):
    """Token ids (B, T) → next-token logits (B, T, vocab).

    Lipschitz family: the embedding table's rows are scaled to RMS norm at most 1, tokens
    are ball_{√d}(e_t + p_t), causal convex-residual blocks, and logits =
    final_scale · W_unembed·x_t with W_unembed constrained like every other matrix.
    Standard family: pre-LN blocks, a final LayerNorm, biases.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config
        self.token_embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_embed = nn.Parameter(torch.randn(c.context, c.d_model) * 0.02)
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_heads, c.mlp_hidden, c.family, c.n_layers, causal=True,
                  softmax_scale=c.softmax_scale)
            for _ in range(c.n_layers)
        )
        self.norm = nn.LayerNorm(c.d_model) if c.family == "standard" else nn.Identity()
        self.unembed = nn.Linear(c.d_model, c.vocab_size, bias=c.family == "standard")
        if c.zero_init_out:
            zero_init_outputs(self.blocks)

    def embedding_table(self) -> torch.Tensor:
        """The table used for lookups; Lipschitz family: rows scaled to RMS ≤ 1."""
        table = self.token_embed.weight
        if self.config.family == "standard":
            return table
        radius = math.sqrt(self.config.d_model)
        return table * torch.clamp(radius / table.norm(dim=1, keepdim=True), max=1.0)

    def token_embeddings(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.embedding_table())

    def forward_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        T = embeddings.shape[1]
        x = embeddings + self.pos_embed[:T]
        if self.config.family == "lipschitz":
            x = token_ball(x, math.sqrt(self.config.d_model))
        for block in self.blocks:
            x = block(x)
        logits = self.unembed(self.norm(x))
        return logits * self.config.final_scale if self.config.final_scale != 1.0 else logits

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.forward_embeddings(self.token_embeddings(idx))

    @torch.no_grad()
    def lipschitz_bound(self) -> float:
        """The paper-style L2 bound from the embedded sequence to the logits of any one
        position (lipschitz family; ``lipcert.models.blocks`` explains the max-token norm it
        is composed in): Π_blocks Lip(block; R) · final_scale · σ(W_unembed), with R = √d
        after the token ball (1-Lipschitz; adding positions is a translation). Reading one
        position is 1-Lipschitz from ‖·‖_{2,∞} to ℓ2. σ are verified upper values; for
        several heads the attention factor is the paper's claim."""
        c = self.config
        require_lipschitz_family(c.family)
        blocks = blocks_lipschitz_bound(self.blocks, math.sqrt(c.d_model))
        return blocks * c.final_scale * spectral.exact(self.unembed.weight).value


class EmbeddingSpaceGPT(nn.Module):
    """The GPT seen as a function of its embedded input sequence (B, T, d) → logits."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.gpt.forward_embeddings(embeddings)

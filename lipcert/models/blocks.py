"""Transformer parts shared by the ViT and the GPT, in two families.

``lipschitz`` is the architecture of Newhouse et al. (arXiv 2507.13338):

* no LayerNorm; every sublayer is a convex combination x ← (1 − α)·x + α·f(x), with
  α = 1 / (2·n_layers) (each layer has two sublayers, so the residual stream moves by at
  most half of its length over the whole network);
* attention scores ``softmax_scale · q·k / d_head`` (1/d, not 1/√d) and the attention
  output divided by 3, which makes a head 1-Lipschitz for unit weights and tokens of RMS
  at most 1 (DESIGN.md, "Attention in the max-token norm");
* MLP ``W_out · GELU(W_in x) / 1.1289``, 1.1289 being the paper's value for GELU's
  largest slope (the exact maximum, at x = √2, is 1.128904…, so the scaled GELU is
  1.0000037-Lipschitz; certificates use the exact value);
* no biases, so every weight is a matrix that ``lipcert.constraints`` can cap.

``standard`` is a pre-LayerNorm transformer: x ← x + f(LN(x)), scores q·k/√d_head, biases.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Family = Literal["lipschitz", "standard"]
GELU_SLOPE_PAPER = 1.1289
ATTENTION_OUTPUT_SCALE = 1.0 / 3.0


def residual_alpha(n_layers: int) -> float:
    """The convex residual weight α = 1/(2·n_layers) of the Lipschitz family."""
    return 1.0 / (2 * n_layers)


class Attention(nn.Module):
    """Multi-head self-attention built on ``F.scaled_dot_product_attention``.

    Lipschitz family: ``W_o · concat_h softmax(s · q_h k_hᵀ / d_head) v_h / 3`` with
    s = ``softmax_scale``. Standard family: the usual 1/√d_head scores and biases.
    """

    def __init__(
        self, d_model: int, n_heads: int, family: Family, causal: bool, softmax_scale: float
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        bias = family == "standard"
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.family, self.causal = family, causal
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.k = nn.Linear(d_model, d_model, bias=bias)
        self.v = nn.Linear(d_model, d_model, bias=bias)
        self.o = nn.Linear(d_model, d_model, bias=bias)
        if family == "lipschitz":
            self.score_scale = softmax_scale / self.d_head
            self.output_scale = ATTENTION_OUTPUT_SCALE
        else:
            self.score_scale = self.d_head**-0.5
            self.output_scale = 1.0

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.score_scale)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.o(y) * self.output_scale if self.output_scale != 1.0 else self.o(y)


class MLP(nn.Module):
    """Two-layer GELU MLP; the Lipschitz family divides GELU by its largest slope."""

    def __init__(self, d_model: int, hidden: int, family: Family) -> None:
        super().__init__()
        bias = family == "standard"
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.gelu_scale = 1.0 / GELU_SLOPE_PAPER if family == "lipschitz" else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up(x))
        return self.down(h * self.gelu_scale if self.gelu_scale != 1.0 else h)


class Block(nn.Module):
    """One transformer layer: an attention sublayer, then an MLP sublayer."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        mlp_hidden: int,
        family: Family,
        n_layers: int,
        causal: bool,
        softmax_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.family = family
        self.attn = Attention(d_model, n_heads, family, causal, softmax_scale)
        self.mlp = MLP(d_model, mlp_hidden, family)
        if family == "standard":
            self.ln_attn = nn.LayerNorm(d_model)
            self.ln_mlp = nn.LayerNorm(d_model)
        else:
            self.alpha = residual_alpha(n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "standard":
            x = x + self.attn(self.ln_attn(x))
            return x + self.mlp(self.ln_mlp(x))
        a = self.alpha
        x = (1 - a) * x + a * self.attn(x)
        return (1 - a) * x + a * self.mlp(x)


def zero_init_outputs(blocks: nn.ModuleList) -> None:
    """Zero the output projections of every sublayer (the paper's Shakespeare setting)."""
    for block in blocks:
        nn.init.zeros_(block.attn.o.weight)
        nn.init.zeros_(block.mlp.down.weight)

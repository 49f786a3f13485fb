"""Transformer parts shared by the ViT and the GPT, in two families.

``lipschitz`` is the architecture of Newhouse et al. (arXiv 2507.13338):

* no LayerNorm; every sublayer is a convex combination x ← (1 − α)·x + α·f(x), with
  α = 1 / (2·n_layers) (each layer has two sublayers, so the residual stream moves by at
  most half of its length over the whole network);
* attention scores ``softmax_scale · q·k / d_head`` (1/d, not 1/√d) and the attention
  output divided by 3, which makes a head 1-Lipschitz for unit weights and tokens of RMS
  at most 1 (docs/attention.md, "One head");
* MLP ``W_out · GELU(W_in x) / 1.1289``, 1.1289 being the paper's value for GELU's
  largest slope (the exact maximum, at x = √2, is 1.128904…, so the scaled GELU is
  1.0000037-Lipschitz; certificates use the exact value);
* no biases, so every weight is a matrix that ``lipcert.constraints`` can cap.

``standard`` is a pre-LayerNorm transformer: x ← x + f(LN(x)), scores q·k/√d_head, biases.

The paper's Lipschitz bound of the ``lipschitz`` family is composed module by module
(modula's style): each part states its own bound in ``lipschitz_bound`` and the bound on
the token norms it outputs in ``output_radius``. Perturbations of the token sequence are
measured in the max-token norm ‖E‖_{2,∞} = max_i ‖e_i‖₂, which never exceeds the
whole-tensor L2 norm, so the composed bound also bounds ‖f(x) − f(y)‖₂ / ‖x − y‖₂ for
inputs x, y (images, or embedded sequences). σ(·) is the verified upper value of the
spectral norm (:func:`lipcert.spectral.exact`). The attention bound is proven for one head;
for several heads it is the paper's claim, which lipcert's certifier does not rely on
(docs/attention.md, "Several heads").
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lipcert import spectral
from lipcert.errors import LipcertError

Family = Literal["lipschitz", "standard"]
GELU_SLOPE_PAPER = 1.1289
GELU_MAX_SLOPE = 1.1289042  # Φ(√2) + √2·φ(√2) = 1.12890415…, rounded up
ATTENTION_OUTPUT_SCALE = 1.0 / 3.0


def _sigma(weight: torch.Tensor) -> float:
    """The verified upper value of σ_max(W) (:func:`lipcert.spectral.exact`)."""
    return spectral.exact(weight).value


def require_lipschitz_family(family: str) -> None:
    """The paper's bound exists for the ``lipschitz`` family only."""
    if family != "lipschitz":
        raise LipcertError(
            f"the paper's Lipschitz bound is defined for the lipschitz family only, not {family!r}"
        )


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
            raise LipcertError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
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

    def lipschitz_bound(self, radius: float) -> float:
        """Lipschitz bound of this sublayer's f in ‖·‖_{2,∞}, for input tokens of norm
        ≤ ``radius`` R (lipschitz family; docs/attention.md, "One head")::

            σ(W_O)·σ(W_V)·(1 + 2R²·c·σ(W_Q)·σ(W_K)) / 3,    c = softmax_scale / d_head

        Proven for one head; for several heads it is the paper's claim."""
        require_lipschitz_family(self.family)
        s_q, s_k, s_v, s_o = (_sigma(m.weight) for m in (self.q, self.k, self.v, self.o))
        return s_o * s_v * (1 + 2 * radius**2 * self.score_scale * s_q * s_k) * self.output_scale

    def output_radius(self, radius: float) -> float:
        """Bound on f's output token norms: σ(W_O)·(Σ_h σ(W_V,h)²)^{1/2}·R / 3. Each head mixes
        values v_j = W_V,h·x_j of norm ≤ σ(W_V,h)·R with weights summing to 1, so its output
        token has norm ≤ σ(W_V,h)·R; the concatenation has norm ≤ (Σ_h σ(W_V,h)²)^{1/2}·R."""
        require_lipschitz_family(self.family)
        heads = self.v.weight.detach().double().view(self.n_heads, self.d_head, -1)
        per_head = math.sqrt(sum(_sigma(h) ** 2 for h in heads))
        return _sigma(self.o.weight) * per_head * radius * self.output_scale


class MLP(nn.Module):
    """Two-layer GELU MLP; the Lipschitz family divides GELU by its largest slope."""

    def __init__(self, d_model: int, hidden: int, family: Family) -> None:
        super().__init__()
        self.family = family
        bias = family == "standard"
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.gelu_scale = 1.0 / GELU_SLOPE_PAPER if family == "lipschitz" else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up(x))
        return self.down(h * self.gelu_scale if self.gelu_scale != 1.0 else h)

    def _gain(self) -> float:
        require_lipschitz_family(self.family)
        return _sigma(self.up.weight) * _sigma(self.down.weight) / GELU_SLOPE_PAPER

    def lipschitz_bound(self) -> float:
        """Lipschitz bound per token (so also in ‖·‖_{2,∞}), lipschitz family:
        σ(W_down)·σ(W_up)·g / 1.1289 with g = 1.128904… GELU's exact largest slope
        (:data:`GELU_MAX_SLOPE`, rounded up)."""
        return self._gain() * GELU_MAX_SLOPE

    def output_radius(self, radius: float) -> float:
        """Bound on the output token norms: σ(W_down)·σ(W_up)·R / 1.1289, since
        |GELU(z)| ≤ |z|."""
        return self._gain() * radius


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

    def lipschitz_bound(self, radius: float) -> float:
        """Lipschitz bound in ‖·‖_{2,∞} for input tokens of norm ≤ ``radius`` R (lipschitz
        family): each convex residual x ← (1 − α)x + α·f(x) has Lip ≤ (1 − α) + α·Lip(f),
        and the MLP sees tokens of norm ≤ R' = (1 − α)·R + α·R_attn(R)::

            ((1 − α) + α·Lip(attention; R)) · ((1 − α) + α·Lip(MLP))"""
        require_lipschitz_family(self.family)
        a = self.alpha
        return ((1 - a) + a * self.attn.lipschitz_bound(radius)) * (
            (1 - a) + a * self.mlp.lipschitz_bound())

    def output_radius(self, radius: float) -> float:
        """Bound on the output token norms: R ← (1 − α)·R + α·R_f through both sublayers."""
        require_lipschitz_family(self.family)
        a = self.alpha
        radius = (1 - a) * radius + a * self.attn.output_radius(radius)
        return (1 - a) * radius + a * self.mlp.output_radius(radius)


def blocks_lipschitz_bound(blocks: nn.ModuleList, radius: float) -> float:
    """Lipschitz bound in ‖·‖_{2,∞} of a stack of lipschitz-family blocks whose input tokens
    have norm ≤ ``radius``: the product of each block's bound at its input radius."""
    bound = 1.0
    for block in blocks:
        bound *= block.lipschitz_bound(radius)
        radius = block.output_radius(radius)
    return bound


def zero_init_outputs(blocks: nn.ModuleList) -> None:
    """Zero the output projections of every sublayer (the paper's Shakespeare setting)."""
    for block in blocks:
        nn.init.zeros_(block.attn.o.weight)
        nn.init.zeros_(block.mlp.down.weight)

"""The ``certified`` family: a ViT built to be about 1-Lipschitz in L2 from image to logits,
so that certified radii margin / (√2·L) are large.

Every weight is kept at spectral norm σ ≤ 1 during training (``w_norm="spectral"``,
``w_max=1``) and starts orthogonal. With σ(·) the spectral norm and all norms whole-tensor
L2 norms (perturbations of one image):

* patchify is a permutation of the pixels; the patch embedding acts on every token with
  the same W_pe, a block-diagonal map of norm σ(W_pe); biases and positions are constants;
* attention f_a(X) = s·W_o·softmax(c·Q Kᵀ)·V with one head, Q = ball_R(X) W_qᵀ,
  K = ball_R(X) W_kᵀ, V = ball_{R_v}(X) W_vᵀ (``token_ball``: 1-Lipschitz, tokens of
  norm ≤ R) and c = B / R². Scores are bounded, |c·q_i·(k_j − m)| ≤ c·σ_q·σ_k·R² =: b, so
  every column of the attention matrix sums to ≤ e^{2b} and ‖P‖₂ ≤ e^b (see
  ``lipcert.bounds.rules.attention``). With ρ_v ≤ σ_v·R_v, the attention rule gives
  Lip(f_a) ≤ s·σ_o·σ_v·(e^b + c·R·R_v·σ_q·σ_k·(1 + e^b)); s is the inverse of that
  expression at unit norms, so f_a is 1-Lipschitz while every σ ≤ 1. Scores this small
  make attention a learned, slightly input-dependent average of the tokens;
* MLP f_m(x) = W_down·GroupSort2(W_up·x + b) + b per token: Lip ≤ σ_down·σ_up
  (GroupSort2 is 1-Lipschitz and norm-preserving, Anil et al. 2019);
* each sublayer is x ← (1 − α)·x + α·f(x), Lip ≤ (1 − α) + α·Lip(f); α = 1 drops the
  residual (a gradient-norm-preserving stack, as in 1-Lipschitz dense networks);
* pooling: ``flatten`` concatenates the tokens (an isometry) before the head; ``mean``
  averages them (Lip 1/√N in L2, which shrinks margins as much as the bound);
* head W_head·z + b: σ(W_head); or, with ``head_hidden`` > 0, a GroupSort2 MLP
  W_2·GroupSort2(W_1·z + b) + b over the pooled vector: σ(W_1)·σ(W_2). On flattened tokens
  this is a 1-Lipschitz dense network reading every token, the mixing that weak attention
  does not provide.

Each module composes its factors in its own ``lipschitz_bound(sigma)``, from the current
weights; ``sigma`` gives each weight's spectral norm. By default it is
:func:`lipcert.spectral.sigma_max_differentiable`, so the bound is differentiable (the
margin losses of ``lipcert.losses`` use it); :func:`sigma_upper` (the verified upper value
of :func:`lipcert.spectral.exact`) gives the bound that training reports. ``lipcert
certify``'s engine derives its global bound from the exported graph on its own; a test
checks that it never exceeds this one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipcert import spectral
from lipcert.models.config import ModelConfig
from lipcert.models.ops import group_sort2, token_ball
from lipcert.models.vit import patchify

#: A weight's spectral norm, as a 0-dim tensor (see the module docstring).
Sigma = Callable[[Tensor], Tensor]


def sigma_upper(weight: Tensor) -> Tensor:
    """The verified upper value of σ_max(W) (:func:`lipcert.spectral.exact`) as a float64
    0-dim tensor, without gradient: bounds composed from it are reported, never trained."""
    return torch.tensor(spectral.exact(weight).value, dtype=torch.float64)


def attention_gain(logit_bound: float, token_radius: float, value_radius: float,
                   sigma_q: Tensor | float = 1.0, sigma_k: Tensor | float = 1.0) -> Tensor:
    """e^b + c·R·R_v·σ_q·σ_k·(1 + e^b) with c = B/R², b = c·σ_q·σ_k·R² (see the module
    docstring): the Lipschitz bound of unscaled attention per unit σ_v·σ_o."""
    c = logit_bound / token_radius**2
    qk = torch.as_tensor(sigma_q) * torch.as_tensor(sigma_k)
    spread = torch.exp(c * qk * token_radius**2)
    return spread + c * token_radius * value_radius * qk * (1 + spread)


class CertifiedAttention(nn.Module):
    """One-head attention on token-ball-projected inputs, scaled to be 1-Lipschitz."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.d_model
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.radius, self.value_radius = config.token_radius, config.value_radius
        self.logit_bound = config.logit_bound
        self.score_scale = config.logit_bound / config.token_radius**2
        self.output_scale = 1.0 / float(
            attention_gain(config.logit_bound, config.token_radius, config.value_radius))

    def forward(self, x: Tensor) -> Tensor:
        qk_in = token_ball(x, self.radius)
        v_in = token_ball(x, self.value_radius)
        q, k, v = (t.unsqueeze(1) for t in (self.q(qk_in), self.k(qk_in), self.v(v_in)))
        y = F.scaled_dot_product_attention(q, k, v, scale=self.score_scale).squeeze(1)
        return self.o(y) * self.output_scale

    def lipschitz_bound(self, sigma: Sigma = spectral.sigma_max_differentiable) -> Tensor:
        """output_scale·σ_o·σ_v·(e^b + c·R·R_v·σ_q·σ_k·(1 + e^b)), b = c·σ_q·σ_k·R²
        (module docstring)."""
        s_q, s_k, s_v, s_o = (sigma(m.weight) for m in (self.q, self.k, self.v, self.o))
        gain = attention_gain(self.logit_bound, self.radius, self.value_radius, s_q, s_k)
        return self.output_scale * s_o * s_v * gain


class CertifiedMLP(nn.Module):
    """W_down · GroupSort2(W_up x + b) + b, applied to every token."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.d_model, config.mlp_hidden)
        self.down = nn.Linear(config.mlp_hidden, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(group_sort2(self.up(x)))

    def lipschitz_bound(self, sigma: Sigma = spectral.sigma_max_differentiable) -> Tensor:
        """σ_up·σ_down: GroupSort2 is 1-Lipschitz, biases are constants."""
        return sigma(self.up.weight) * sigma(self.down.weight)


class CertifiedHead(nn.Module):
    """W_2·GroupSort2(W_1·z + b) + b, or W·z + b when ``hidden`` is 0."""

    def __init__(self, pooled: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Linear(pooled, hidden), nn.Linear(hidden, classes)] if hidden
            else [nn.Linear(pooled, classes)])

    def forward(self, z: Tensor) -> Tensor:
        for k, layer in enumerate(self.layers):
            z = layer(group_sort2(z) if k else z)
        return z

    def lipschitz_bound(self, sigma: Sigma = spectral.sigma_max_differentiable) -> Tensor:
        """The product of the layers' σ (GroupSort2 between them is 1-Lipschitz)."""
        return math.prod(sigma(layer.weight) for layer in self.layers)


class CertifiedBlock(nn.Module):
    """x ← (1 − α_a)·x + α_a·attention(x); x ← (1 − α_m)·x + α_m·mlp(x)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn, self.mlp = CertifiedAttention(config), CertifiedMLP(config)
        self.attn_alpha, self.mlp_alpha = config.attn_alpha, config.mlp_alpha

    @staticmethod
    def _mix(x: Tensor, fx: Tensor, alpha: float) -> Tensor:
        return fx if alpha == 1.0 else (1 - alpha) * x + alpha * fx

    def forward(self, x: Tensor) -> Tensor:
        x = self._mix(x, self.attn(x), self.attn_alpha)
        return self._mix(x, self.mlp(x), self.mlp_alpha)

    def lipschitz_bound(self, sigma: Sigma = spectral.sigma_max_differentiable) -> Tensor:
        """((1 − α_a) + α_a·Lip(attention))·((1 − α_m) + α_m·Lip(MLP))."""
        a, m = self.attn_alpha, self.mlp_alpha
        return ((1 - a) + a * self.attn.lipschitz_bound(sigma)) * (
            (1 - m) + m * self.mlp.lipschitz_bound(sigma))


class CertifiedViT(nn.Module):
    """Images (B, C, H, W) in [0, 1] → logits (B, num_classes); see the module docstring."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config
        self.n_patches = (c.image_size // c.patch_size) ** 2
        self.patch_embed = nn.Linear(c.channels * c.patch_size**2, c.d_model)
        self.pos_embed = nn.Parameter(torch.zeros(self.n_patches, c.d_model))
        self.blocks = nn.ModuleList(CertifiedBlock(c) for _ in range(c.n_layers))
        pooled = c.d_model * (self.n_patches if c.pooling == "flatten" else 1)
        self.head = CertifiedHead(pooled, c.head_hidden, c.num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(patchify(images, self.config.patch_size)) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        pooled = x.flatten(1) if self.config.pooling == "flatten" else x.mean(dim=1)
        return self.head(pooled)

    def lipschitz_bound(self, sigma: Sigma = spectral.sigma_max_differentiable) -> Tensor:
        """The L2 bound from image to logits: σ(W_pe)·Π blocks·(1/√N with mean pooling)·head
        (module docstring); patchify and flattening are isometries."""
        bound = sigma(self.patch_embed.weight)
        for block in self.blocks:
            bound = bound * block.lipschitz_bound(sigma)
        if self.config.pooling == "mean":
            bound = bound / math.sqrt(self.n_patches)
        return bound * self.head.lipschitz_bound(sigma)


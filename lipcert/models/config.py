"""The one dataclass that describes every lipcert model; it is stored in ``config.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from lipcert.errors import LipcertError


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a ViT classifier or a character-level GPT.

    ``softmax_scale`` multiplies the Lipschitz family's q·k/d_head scores and
    ``final_scale`` its logits; both are fixed parts of the model and enter its bound.

    The ``certified`` family (ViT only, ``lipcert.models.certified``) uses one head and:
    ``token_radius`` R and ``value_radius`` R_v, the token-ball radii of the attention's
    query/key and value inputs; ``logit_bound`` B, the attention scores' bound c·R² (c the
    score scale); ``attn_alpha`` and ``mlp_alpha``, the convex residual weights (1: no
    residual); ``pooling``, ``flatten`` (concatenate the tokens) or ``mean``;
    ``head_hidden``, the width of a GroupSort2 MLP head (0: a linear head).
    """

    arch: Literal["vit", "gpt"]
    family: Literal["lipschitz", "standard", "certified"]
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    softmax_scale: float = 1.0
    final_scale: float = 1.0
    zero_init_out: bool = False
    # certified family
    token_radius: float = 1.0
    value_radius: float = 8.0
    logit_bound: float = 0.02
    attn_alpha: float = 0.1
    mlp_alpha: float = 1.0
    pooling: Literal["flatten", "mean"] = "flatten"
    head_hidden: int = 0
    # ViT
    image_size: int = 28
    channels: int = 1
    patch_size: int = 7
    num_classes: int = 10
    # GPT
    vocab_size: int = 0
    context: int = 256

    def __post_init__(self) -> None:
        if self.arch not in ("vit", "gpt"):
            raise LipcertError(f"unknown architecture {self.arch!r}; expected 'vit' or 'gpt'")
        if self.family not in ("lipschitz", "standard", "certified"):
            raise LipcertError(f"unknown family {self.family!r}; expected 'lipschitz', "
                               "'standard' or 'certified'")
        if self.family == "certified":
            self._check_certified()
        if self.d_model % self.n_heads:
            raise LipcertError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.arch == "vit" and self.image_size % self.patch_size:
            raise LipcertError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.arch == "gpt" and self.vocab_size <= 0:
            raise LipcertError("a GPT needs vocab_size > 0")

    def _check_certified(self) -> None:
        if self.arch != "vit":
            raise LipcertError("the certified family is a ViT: use --arch vit")
        if self.n_heads != 1:
            raise LipcertError("the certified family uses one attention head: --n-heads 1")
        if self.pooling not in ("flatten", "mean"):
            raise LipcertError(f"unknown pooling {self.pooling!r}; expected flatten or mean")
        if not (self.token_radius > 0 and self.value_radius > 0 and self.logit_bound >= 0):
            raise LipcertError("token_radius and value_radius must be > 0, logit_bound ≥ 0")
        if not (0 <= self.attn_alpha <= 1 and 0 <= self.mlp_alpha <= 1):
            raise LipcertError("attn_alpha and mlp_alpha must lie in [0, 1]")
        if self.mlp_hidden % 2 or self.head_hidden % 2 or self.head_hidden < 0:
            raise LipcertError("GroupSort2 needs even MLP and head widths ≥ 0")

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_ratio * self.d_model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LipcertError(f"model config has unknown fields: {', '.join(unknown)}")
        return cls(**data)

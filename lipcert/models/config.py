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
    """

    arch: Literal["vit", "gpt"]
    family: Literal["lipschitz", "standard"]
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    softmax_scale: float = 1.0
    final_scale: float = 1.0
    zero_init_out: bool = False
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
        if self.family not in ("lipschitz", "standard"):
            raise LipcertError(
                f"unknown family {self.family!r}; expected 'lipschitz' or 'standard'"
            )
        if self.d_model % self.n_heads:
            raise LipcertError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.arch == "vit" and self.image_size % self.patch_size:
            raise LipcertError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.arch == "gpt" and self.vocab_size <= 0:
            raise LipcertError("a GPT needs vocab_size > 0")

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

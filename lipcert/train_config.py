"""The flat training configuration: model architecture plus optimisation settings.

Flat so that every field maps to one ``lipcert train --field-name`` flag.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from lipcert.errors import LipcertError
from lipcert.losses import LOSSES
from lipcert.models.config import ModelConfig

OPTIMIZERS = ("muon", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (with ``seed``, it is repeatable, except
    that ``max_time_s`` > 0 ends it, and its learning-rate decay, by wall-clock time).

    ``w_norm`` says in which norm ``w_max`` bounds every weight: ``rms`` (the paper's
    RMS→RMS norm) or ``spectral`` (σ_max). ``loss``, ``margin_eps`` (ε of ``lmt``),
    ``temperature``, ``hkr_alpha`` and ``min_margin`` select the loss of
    ``lipcert.losses``.
    """

    preset: str
    arch: str
    family: str
    dataset: str
    data_dir: str | None = None
    # architecture
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    softmax_scale: float = 1.0
    final_scale: float = 1.0
    zero_init_out: bool = False
    token_radius: float = 1.0
    value_radius: float = 8.0
    logit_bound: float = 0.02
    attn_alpha: float = 0.1
    mlp_alpha: float = 1.0
    pooling: str = "flatten"
    head_hidden: int = 0
    image_size: int = 28
    channels: int = 1
    patch_size: int = 7
    num_classes: int = 10
    context: int = 256
    # optimisation
    optimizer: str = "muon"
    lr: float = 0.05
    adam_lr: float = 3e-3
    weight_decay: float = 0.0
    constraint: str = "none"
    w_max: float = 0.0
    w_norm: str = "rms"
    # loss (lipcert.losses)
    loss: str = "ce"
    margin_eps: float = 0.0
    temperature: float = 1.0
    hkr_alpha: float = 0.98
    min_margin: float = 1.0
    steps: int = 1000
    max_time_s: float = 0.0
    batch_size: int = 128
    warmup_steps: int = 0
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise LipcertError(
                f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}"
            )
        if self.steps <= 0 or self.batch_size <= 0 or self.eval_every <= 0:
            raise LipcertError("steps, batch_size and eval_every must be positive")
        if self.loss not in LOSSES:
            raise LipcertError(f"unknown loss {self.loss!r}; expected one of {', '.join(LOSSES)}")
        if self.margin_eps < 0 or self.temperature <= 0 or self.max_time_s < 0:
            raise LipcertError("margin_eps and max_time_s must be ≥ 0 and temperature > 0")
        if self.w_norm not in ("rms", "spectral"):
            raise LipcertError(f"unknown w_norm {self.w_norm!r}; expected rms or spectral")
        if self.constraint != "none" and self.w_max <= 0:
            raise LipcertError(f"constraint {self.constraint!r} needs --w-max > 0")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise LipcertError(f"unknown device {self.device!r}; expected cpu or cuda")

    def model_config(self, vocab_size: int = 0) -> ModelConfig:
        """The architecture part; ``vocab_size`` comes from the dataset for a GPT."""
        names = {f.name for f in fields(ModelConfig)}
        values = {k: v for k, v in asdict(self).items() if k in names}
        return ModelConfig(**values, vocab_size=vocab_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

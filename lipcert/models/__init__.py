"""lipcert's models: a ViT classifier and a character-level GPT, each in a ``lipschitz``
family (the paper's architecture) and a ``standard`` (pre-LayerNorm) family, and a
``certified`` ViT family built for large certified radii (``lipcert.models.certified``)."""

from __future__ import annotations

import torch
from torch import nn

from lipcert.models.certified import CertifiedViT
from lipcert.models.config import ModelConfig
from lipcert.models.gpt import GPT, EmbeddingSpaceGPT
from lipcert.models.vit import ViT

__all__ = [
    "GPT",
    "CertifiedViT",
    "EmbeddingSpaceGPT",
    "ModelConfig",
    "ViT",
    "build_model",
    "constrained_matrices",
    "example_input",
    "export_model",
]


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised model for ``config``.

    Lipschitz-family matrices start orthogonal with unit RMS→RMS norm (σ = √(fan_out/fan_in)),
    the natural starting point for Muon and the weight constraints; certified-family
    matrices start orthogonal with σ = 1.
    """
    if config.family == "certified":
        model = CertifiedViT(config)
        for _, weight in constrained_matrices(model):
            nn.init.orthogonal_(weight)
        return model
    model = ViT(config) if config.arch == "vit" else GPT(config)
    if config.family == "lipschitz":
        for _, weight in constrained_matrices(model):
            if weight.abs().sum() > 0:  # keep zero-initialised output layers at zero
                fan_out, fan_in = weight.shape
                nn.init.orthogonal_(weight, gain=(fan_out / fan_in) ** 0.5)
    return model


def constrained_matrices(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every weight matrix that a weight constraint acts on: all ``nn.Linear`` weights.

    Embedding tables and positional embeddings are excluded (the Lipschitz family
    normalises token embeddings in its forward pass instead).
    """
    return [
        (f"{name}.weight", module.weight)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]


def export_model(model: nn.Module) -> torch.export.ExportedProgram:
    """``torch.export`` of a lipcert model with a dynamic batch (and GPT sequence) size."""
    config: ModelConfig = model.config
    batch = torch.export.Dim("batch", min=1)
    if config.arch == "vit":
        dynamic = ({0: batch},)
    else:
        dynamic = ({0: batch, 1: torch.export.Dim("seq", min=1, max=config.context)},)
    return torch.export.export(model, (example_input(config),), dynamic_shapes=dynamic)


def example_input(config: ModelConfig, batch: int = 2) -> torch.Tensor:
    """A valid input batch for ``torch.export`` and shape checks."""
    if config.arch == "vit":
        return torch.rand(batch, config.channels, config.image_size, config.image_size)
    return torch.randint(0, config.vocab_size, (batch, config.context))

"""Adapters that put a model in the form certification expects: one tensor input, (batch,
classes) logits, and the input domain the bounds hold on."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lipcert.bounds import EmbeddingDomain
from lipcert.errors import LipcertError

__all__ = ["LastPosition", "embedding_domain"]


class LastPosition(nn.Module):
    """Logits of a sequence model at one position: (B, T, V) → (B, V)."""

    def __init__(self, model: nn.Module, position: int = -1) -> None:
        super().__init__()
        self.model = model
        self.position = position

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)[:, self.position, :]


def embedding_domain(model: nn.Module) -> EmbeddingDomain:
    """Tokens bounded by the largest row norm of a GPT's (normalised) embedding table, rounded
    up by a relative 1e-12 for the float64 norm computation."""
    gpt = getattr(model, "gpt", model)
    while not hasattr(gpt, "embedding_table") and hasattr(gpt, "model"):
        gpt = gpt.model
        gpt = getattr(gpt, "gpt", gpt)
    if not hasattr(gpt, "embedding_table"):
        raise LipcertError("embedding_domain needs a lipcert GPT (or a wrapper of one)")
    with torch.no_grad():
        table = gpt.embedding_table().detach().to(torch.float64)
    return EmbeddingDomain(float(torch.linalg.vector_norm(table, dim=1).max()) * (1 + 1e-12))

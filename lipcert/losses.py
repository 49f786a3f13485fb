"""Training losses: plain cross-entropy and two margin-aware losses for certified training.

With logits z = f(x), label y and a Lipschitz bound L of f in L2, the prediction is certified
within radius (z_y − max_{j≠y} z_j) / (√2·L) (docs/conventions.md). The losses below
make that margin large:

* ``ce``: cross-entropy of τ·z, τ the ``temperature`` (a fixed logit scale);
* ``lmt``: Lipschitz-margin training (Tsuzuku, Sato, Sugiyama, NeurIPS 2018): cross-entropy
  of τ·(z + √2·L·ε·(1 − onehot(y))). It adds √2·L·ε to every non-target logit, so its
  minimiser certifies radius ε wherever it classifies correctly;
* ``hkr``: the multiclass hinge + Kantorovich–Rubinstein loss (Serrurier et al., CVPR 2021):
  α·hinge − (1 − α)·KR with hinge = mean_j relu(m/2 − s_j·z_j) (s_j = +1 for the label,
  weighted by C − 1, and −1 otherwise; m the ``min_margin``), deel-torchlip's hinge term,
  and KR = mean over the batch of z_y − mean_{j≠y} z_j, a per-sample form of its KR term
  (deel-torchlip weights each class by its frequency in the batch instead).
  It needs no L: the network is meant to be 1-Lipschitz by construction.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from lipcert.errors import LipcertError

LOSSES = ("ce", "lmt", "hkr")


def lmt_cross_entropy(logits: Tensor, labels: Tensor, lipschitz: Tensor | float, eps: float,
                      temperature: float = 1.0) -> Tensor:
    """Cross-entropy of τ·(z + √2·L·ε·(1 − onehot(y))), Tsuzuku et al. (2018)."""
    shift = math.sqrt(2) * eps * lipschitz
    others = 1 - F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    return F.cross_entropy(temperature * (logits + shift * others), labels)


def hkr_loss(logits: Tensor, labels: Tensor, alpha: float = 0.98,
             min_margin: float = 1.0) -> Tensor:
    """α·hinge − (1 − α)·KR, the multiclass HKR loss of the module docstring."""
    classes = logits.shape[-1]
    onehot = F.one_hot(labels, classes).to(logits.dtype)
    sign = 2 * onehot - 1
    hinge = F.relu(min_margin / 2 - sign * logits) * (1 + (classes - 2) * onehot)
    target = (logits * onehot).sum(-1)
    rest = (logits * (1 - onehot)).sum(-1) / (classes - 1)
    return alpha * hinge.mean() - (1 - alpha) * (target - rest).mean()


def training_loss(name: str, logits: Tensor, labels: Tensor, *, lipschitz: Tensor | float,
                  eps: float, temperature: float, alpha: float, min_margin: float) -> Tensor:
    """The loss ``name`` (one of :data:`LOSSES`) for logits (…, C) and labels (…)."""
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    if name == "ce":
        return F.cross_entropy(temperature * logits, labels)
    if name == "lmt":
        return lmt_cross_entropy(logits, labels, lipschitz, eps, temperature)
    if name == "hkr":
        return hkr_loss(logits, labels, alpha, min_margin)
    raise LipcertError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")


def needs_bound(name: str) -> bool:
    """Whether the loss uses the model's Lipschitz bound."""
    return name == "lmt"


__all__ = ["LOSSES", "hkr_loss", "lmt_cross_entropy", "needs_bound", "training_loss"]


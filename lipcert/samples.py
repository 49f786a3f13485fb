"""Which samples a command certifies or attacks, and in which input space.

Images: the first N images of the dataset's test split, in [0, 1]. Text: N windows of the
validation split, taken at starts 0, T, 2T, … (T = the model's context); the model is seen
in embedding space, ``LastPosition(EmbeddingSpaceGPT(gpt))``, and the label is the character
that follows the window. A sample's ``index`` is the image's position in the test split, or
the window's start offset in the validation split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from lipcert.bounds import BoxDomain, EmbeddingDomain
from lipcert.certificate import LastPosition, embedding_domain
from lipcert.data import ImageDataset, TextDataset, load_dataset
from lipcert.errors import LipcertError
from lipcert.loading import LoadedModel, check_input_shape
from lipcert.models import EmbeddingSpaceGPT


@dataclass
class Samples:
    """Inputs, labels and dataset positions, with the classifier that maps inputs to logits
    (as a callable module, and as the exported program when the model came as a ``.pt2``)."""

    classifier: nn.Module
    inputs: torch.Tensor
    labels: torch.Tensor
    indices: list[int]
    domain: BoxDomain | EmbeddingDomain | tuple[float, float]
    dataset: str
    description: str
    program: ExportedProgram | None = None

    @property
    def certifiable(self) -> nn.Module | ExportedProgram:
        """What ``lipcert.certify`` takes: the exported program if there is one."""
        return self.program if self.program is not None else self.classifier


def select_samples(
    loaded: LoadedModel, data: str | None, n: int, data_dir: str | None = None
) -> Samples:
    """The first ``n`` test samples of ``data`` (default: the run's dataset) for ``loaded``."""
    name = data or loaded.dataset
    if name is None:
        raise LipcertError("this model does not say which dataset it was trained on; pass --data")
    if n <= 0:
        raise LipcertError("--n must be positive")
    dataset = load_dataset(name, data_dir)
    if isinstance(dataset, ImageDataset):
        return _image_samples(loaded, dataset, n)
    return _text_samples(loaded, dataset, n)


def _image_samples(loaded: LoadedModel, data: ImageDataset, n: int) -> Samples:
    n = min(n, len(data.y_test))
    x, y = data.x_test[:n], data.y_test[:n]
    check_input_shape(loaded, x)
    return Samples(loaded.module, x, y, list(range(n)), (0.0, 1.0), data.name,
                   f"first {n} images of the {data.name} test split", loaded.program)


def _text_samples(loaded: LoadedModel, data: TextDataset, n: int) -> Samples:
    module: Any = loaded.module
    if not isinstance(module, EmbeddingSpaceGPT):
        raise LipcertError("text models are certified and attacked in embedding space: give "
                           "a lipcert GPT run directory (a .pt2 of a GPT takes token ids)")
    gpt = module.gpt
    context = gpt.config.context
    if gpt.config.vocab_size != data.vocab_size:
        raise LipcertError(f"the model's vocabulary ({gpt.config.vocab_size}) does not match "
                           f"{data.name}'s ({data.vocab_size})")
    starts = list(range(0, len(data.val) - context - 1, context))[:n]
    windows = torch.stack([data.val[s : s + context] for s in starts])
    labels = torch.stack([data.val[s + context] for s in starts])
    with torch.no_grad():
        embeddings = gpt.token_embeddings(windows)
    return Samples(LastPosition(module).eval(), embeddings, labels, starts,
                   embedding_domain(gpt), data.name,
                   f"{len(starts)} windows of {context} characters of the {data.name} "
                   "validation split, next character after each, in embedding space")

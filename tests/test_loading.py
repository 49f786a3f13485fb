"""``lipcert.loading``: run directories, safe ``.pt2`` loading (crafted archives), factories."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lipcert.checkpoint import TrainResult, save_run, sha256_file
from lipcert.errors import CheckpointError, LipcertError
from lipcert.loading import ACCEPTED_FORMS, check_input_shape, inspect_pt2, load_model
from lipcert.models import EmbeddingSpaceGPT, build_model
from lipcert.presets import preset

ROOT = "net/"  # torch.export.save puts every member under a folder named after the file


class Net(nn.Module):
    """A small program with parameters, a buffer and a lifted constant."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)
        self.register_buffer("shift", torch.full((3,), 0.5))
        self.scale = torch.tensor(2.0)  # a plain tensor attribute: a program constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x))) * self.scale + self.shift


class Payload:
    """Pickles to a call of ``os.mkdir(marker)``: executing it leaves a visible trace."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _torch_save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _export(model: nn.Module, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model.eval(), (torch.randn(2, 6),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return path


@pytest.fixture(scope="module")
def net_pt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Net, Path]:
    torch.manual_seed(0)
    model = Net()
    return model, _export(model, tmp_path_factory.mktemp("pt2") / "net.pt2")


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes] | None = None,
             drop: tuple[str, ...] = (), add: dict[str, bytes] | None = None) -> Path:
    """Copy a .pt2 archive, replacing, dropping or adding members (names without the root)."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            name = info.filename[len(ROOT):]
            if name not in drop:
                zout.writestr(info.filename, replace.get(name, zin.read(info.filename)))
        for name, data in add.items():
            zout.writestr(ROOT + name, data)
    return dst


def _member(path: Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read(ROOT + name)


def _config_with(path: Path, member: str, fqn: str, **changes) -> bytes:
    config = json.loads(_member(path, member))
    config["config"][fqn].update(changes)
    return json.dumps(config).encode()


# --------------------------------------------------------------------------- .pt2: good files


def test_pt2_loads_with_shape_digest_and_outputs(net_pt2: tuple[Net, Path]) -> None:
    model, path = net_pt2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_model(path)
    assert loaded.kind == "pt2" and loaded.program is not None and loaded.config is None
    assert loaded.input_shape == (6,) and loaded.dataset is None
    assert loaded.weights_sha256 == sha256_file(path) and loaded.source == str(path)
    x = torch.randn(5, 6)
    torch.testing.assert_close(loaded.module(x), model(x))
    assert inspect_pt2(path) == []


def test_rewritten_archive_still_loads(net_pt2: tuple[Net, Path], tmp_path: Path) -> None:
    """The rewriting helper alone does not trip the checks (so the refusals below are due to
    the crafted content)."""
    model, path = net_pt2
    copy_ = _rewrite(path, tmp_path / "net.pt2")
    x = torch.randn(3, 6)
    torch.testing.assert_close(load_model(copy_).module(x), model(x))


# --------------------------------------------------------------------------- .pt2: crafted


def test_pickled_weight_is_refused_without_running_it(
    net_pt2: tuple[Net, Path], tmp_path: Path
) -> None:
    _, path = net_pt2
    weights_config = "data/weights/model_weights_config.json"
    entry = json.loads(_member(path, weights_config))["config"]["inp.weight"]

    def craft(marker: Path, name: str) -> Path:
        return _rewrite(path, tmp_path / name, replace={
            weights_config: _config_with(path, weights_config, "inp.weight", use_pickle=True),
            f"data/weights/{entry['path_name']}": _torch_save(Payload(marker)),
        })

    marker = tmp_path / "pwned"
    with pytest.raises(CheckpointError, match=r"inp\.weight .*use_pickle.*--trust-pickle"):
        load_model(craft(marker, "net.pt2"))
    assert not marker.exists()
    # The payload is live: plain torch.export.load runs it.
    ran = tmp_path / "ran"
    with contextlib.suppress(Exception):
        torch.export.load(craft(ran, "live.pt2"))
    assert ran.exists()


def test_unsafe_sample_inputs_are_refused_without_running_them(
    net_pt2: tuple[Net, Path], tmp_path: Path
) -> None:
    _, path = net_pt2
    marker = tmp_path / "pwned"
    bad = _rewrite(path, tmp_path / "net.pt2",
                   replace={"data/sample_inputs/model.pt": _torch_save(Payload(marker))})
    with pytest.raises(CheckpointError, match=r"sample_inputs/model\.pt does not load with "
                                              r"weights_only=True"):
        load_model(bad)
    assert not marker.exists()
    with contextlib.suppress(Exception):  # torch falls back to weights_only=False: it runs
        torch.export.load(bad)
    assert marker.exists()


def test_trust_pickle_warns_then_loads(net_pt2: tuple[Net, Path], tmp_path: Path) -> None:
    """A benign pickled weight (as torch.export.save writes tensor subclasses) is refused,
    and loads with a warning when trusted."""
    model, path = net_pt2
    weights_config = "data/weights/model_weights_config.json"
    entry = json.loads(_member(path, weights_config))["config"]["out.weight"]
    weight = nn.Parameter(model.out.weight.detach().clone())
    pickled = _rewrite(path, tmp_path / "net.pt2", replace={
        weights_config: _config_with(path, weights_config, "out.weight", use_pickle=True),
        f"data/weights/{entry['path_name']}": _torch_save(weight),
    })
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(pickled)
    with pytest.warns(UserWarning, match="may execute arbitrary code"):
        loaded = load_model(pickled, trust_pickle=True)
    x = torch.randn(2, 6)
    torch.testing.assert_close(loaded.module(x), model(x))


@pytest.mark.parametrize("craft", ["opaque_constant", "aotinductor", "legacy_weights",
                                   "custom_obj_constant"])
def test_other_code_paths_are_refused(
    net_pt2: tuple[Net, Path], tmp_path: Path, craft: str
) -> None:
    _, path = net_pt2
    constants = "data/constants/model_constants_config.json"
    fqn = next(iter(json.loads(_member(path, constants))["config"]))
    crafted = {
        "opaque_constant": dict(
            replace={constants: _config_with(path, constants, fqn, path_name="opaque_obj_0")},
            add={"data/constants/opaque_obj_0": b"cos\nsystem\n."}),
        "custom_obj_constant": dict(
            replace={constants: _config_with(path, constants, fqn, path_name="custom_obj_0")},
            add={"data/constants/custom_obj_0": b"x"}),
        "aotinductor": dict(add={"data/aotinductor/model/model.so": b"\x7fELF"}),
        "legacy_weights": dict(add={"data/weights/model.pt": b"x"}),
    }[craft]
    bad = _rewrite(path, tmp_path / "net.pt2", **crafted)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(bad)


def _corrupt_crc(path: Path, dst: Path) -> Path:
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(ROOT + "models/model.json")
    header = info.header_offset  # local header: name and extra lengths at bytes 26..29
    name_len, extra_len = (int.from_bytes(data[header + i:header + i + 2], "little")
                           for i in (26, 28))
    data[header + 30 + name_len + extra_len + 10] ^= 0xFF  # a byte of the stored data
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("craft, message", [
    ("not_zip", "not a zip file"),
    ("truncated", "not a zip file, or truncated"),
    ("crc", "corrupt"),
    ("no_program", r"missing models/model\.json"),
    ("no_sample_inputs", r"missing data/sample_inputs/model\.pt"),
    ("no_weight_file", r"missing data/weights/weight_0"),
    ("bad_json", "model_weights_config.json is malformed"),
    ("two_roots", "one top-level folder"),
])
def test_malformed_archives_give_one_clear_error(
    net_pt2: tuple[Net, Path], tmp_path: Path, craft: str, message: str
) -> None:
    _, path = net_pt2
    dst = tmp_path / "net.pt2"
    if craft == "not_zip":
        dst.write_bytes(b"this is not a zip archive" * 10)
    elif craft == "truncated":
        dst.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif craft == "crc":
        _corrupt_crc(path, dst)
    elif craft == "two_roots":
        _rewrite(path, dst)
        with zipfile.ZipFile(dst, "a") as zf:
            zf.writestr("other/archive_format", b"pt2")
    else:
        drop = {"no_program": "models/model.json", "no_sample_inputs":
                "data/sample_inputs/model.pt", "no_weight_file": "data/weights/weight_0"}
        replace = {"data/weights/model_weights_config.json": b"{not json"}
        _rewrite(path, dst, drop=(drop.get(craft, ""),),
                 replace=replace if craft == "bad_json" else None)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(dst)
    assert "\n" not in str(info.value)


def test_non_finite_program_weights_are_refused(tmp_path: Path) -> None:
    model = Net()
    with torch.no_grad():
        model.out.bias[1] = float("nan")
    path = _export(model, tmp_path / "net.pt2")
    with pytest.raises(CheckpointError, match=r"out\.bias contains NaN or Inf"):
        load_model(path)


# --------------------------------------------------------------------------- run directories


@pytest.fixture(scope="module")
def untrained_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run directories of untrained tiny models (loading does not need training)."""
    root, runs = tmp_path_factory.mktemp("runs"), {}
    for name, vocab in (("vit-mnist-lipschitz-tiny", 0), ("gpt-shakespeare-standard-tiny", 11)):
        config = preset(name)
        torch.manual_seed(0)
        model = build_model(config.model_config(vocab_size=vocab))
        runs[name] = save_run(TrainResult(config, model, metrics={}, log=[]), root / name)
    return runs


def test_run_directory_vit(untrained_runs: dict[str, Path]) -> None:
    run = untrained_runs["vit-mnist-lipschitz-tiny"]
    loaded = load_model(run)
    assert loaded.kind == "run" and loaded.program is None and loaded.dataset == "mnist"
    assert loaded.input_shape == (1, 28, 28) and loaded.config["model"]["arch"] == "vit"
    assert loaded.weights_sha256 == sha256_file(run / "model.safetensors")
    assert not loaded.module.training
    # The run's own .pt2 (with the lipcert::token_ball custom op) passes the safe loader.
    program = load_model(run / "model.pt2")
    assert program.input_shape == (1, 28, 28)
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(program.module(x), loaded.module(x), rtol=0, atol=1e-6)


def test_run_directory_gpt_is_embedding_space(untrained_runs: dict[str, Path]) -> None:
    run = untrained_runs["gpt-shakespeare-standard-tiny"]
    loaded = load_model(run)
    context, d = loaded.config["model"]["context"], loaded.config["model"]["d_model"]
    assert isinstance(loaded.module, EmbeddingSpaceGPT) and loaded.dataset == "shakespeare"
    assert loaded.input_shape == (context, d)
    ids = torch.randint(0, 11, (2, context))
    gpt = loaded.module.gpt
    torch.testing.assert_close(loaded.module(gpt.token_embeddings(ids)), gpt(ids))
    # Its token-id program has a dynamic sequence length: -1.
    assert load_model(run / "model.pt2").input_shape == (-1,)


# --------------------------------------------------------------------------- factories

FACTORY_MODULE = "lipcert_test_factory"


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("factory")
    (folder / f"{FACTORY_MODULE}.py").write_text(
        "from torch import nn\n"
        "INPUT_SHAPE = (4,)\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))\n"
        "def not_a_model():\n"
        "    return 3\n"
    )
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop(FACTORY_MODULE, None)


def _state(seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def test_factory_with_safetensors(factory: Path, tmp_path: Path) -> None:
    state = _state()
    save_file(state, tmp_path / "w.safetensors")
    loaded = load_model(f"{FACTORY_MODULE}:make", weights=tmp_path / "w.safetensors")
    assert loaded.kind == "factory" and loaded.input_shape == (4,)
    assert loaded.weights_sha256 == sha256_file(tmp_path / "w.safetensors")
    assert torch.equal(loaded.module.state_dict()["0.weight"], state["0.weight"])


def test_factory_weight_checks(factory: Path, tmp_path: Path) -> None:
    spec = f"{FACTORY_MODULE}:make"
    state = _state()
    state["2.bias"] = torch.tensor([0.0, float("inf")])
    save_file(state, tmp_path / "inf.safetensors")
    with pytest.raises(CheckpointError, match=r"2\.bias contains NaN or Inf"):
        load_model(spec, weights=tmp_path / "inf.safetensors")
    save_file({"0.weight": torch.zeros(3, 3)}, tmp_path / "short.safetensors")
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_model(spec, weights=tmp_path / "short.safetensors")


def test_factory_pickle_weights_need_trust(factory: Path, tmp_path: Path) -> None:
    spec, weights = f"{FACTORY_MODULE}:make", tmp_path / "w.pt"
    state = _state()
    torch.save(state, weights)
    with pytest.raises(CheckpointError, match=r"convert it to safetensors.*--trust-pickle"):
        load_model(spec, weights=weights)
    with pytest.warns(UserWarning, match="may execute arbitrary code"):
        loaded = load_model(spec, weights=weights, trust_pickle=True)
    assert torch.equal(loaded.module.state_dict()["2.weight"], state["2.weight"])


@pytest.mark.parametrize("spec, message", [
    ("lipcert_no_such_module_xyz:make", "cannot import"),
    (f"{FACTORY_MODULE}:missing", "has no callable 'missing'"),
    (f"{FACTORY_MODULE}:not_a_model", "returned int, not an nn.Module"),
])
def test_bad_factories(factory: Path, spec: str, message: str) -> None:
    with pytest.raises(LipcertError, match=message):
        load_model(spec)


# --------------------------------------------------------------------------- bad specs, shapes


def test_unrecognised_specs_list_the_accepted_forms(tmp_path: Path,
                                                    net_pt2: tuple[Net, Path]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.onnx").write_bytes(b"x")
    for spec in (tmp_path / "missing.pt2", tmp_path / "empty", tmp_path / "model.onnx",
                 "not a model"):
        with pytest.raises(LipcertError) as info:
            load_model(spec)
        assert all(form in str(info.value) for form in ACCEPTED_FORMS), info.value
    with pytest.raises(LipcertError, match="--weights applies only"):
        load_model(net_pt2[1], weights=tmp_path / "w.safetensors")


def test_check_input_shape(net_pt2: tuple[Net, Path]) -> None:
    loaded = load_model(net_pt2[1])
    check_input_shape(loaded, torch.zeros(7, 6))
    with pytest.raises(LipcertError, match=r"input shape \(5,\) does not match the model's "
                                           r"\(6,\)"):
        check_input_shape(loaded, torch.zeros(7, 5))
    loaded.input_shape = (-1, 3)
    check_input_shape(loaded, torch.zeros(2, 9, 3))
    with pytest.raises(LipcertError):
        check_input_shape(loaded, torch.zeros(2, 9, 4))
    loaded.input_shape = None
    check_input_shape(loaded, torch.zeros(2, 1, 2, 3))

"""Resolve a MODEL argument into a module that lipcert can certify or attack.

MODEL takes one of three forms (``ACCEPTED_FORMS``):

1. a lipcert run directory (holds ``config.json``): rebuilt with ``load_run`` from
   ``model.safetensors``; a GPT is wrapped in ``EmbeddingSpaceGPT``, because certificates
   and attacks live in the embedded sequence (docs/conventions.md, "Norms");
2. a ``.pt2`` file written by ``torch.export.save``, inspected before it is loaded;
3. ``package.module:factory``: the factory is called with no arguments and the weights come
   from a safetensors file (a pickle file only with ``trust_pickle``).

Why ``.pt2`` files are inspected first. In torch 2.13 ``torch.export.load`` unpickles (with
``weights_only=False``) every weight or constant whose entry in
``data/weights/<model>_weights_config.json`` or ``data/constants/<model>_constants_config.json``
says ``"use_pickle": true``; it ``pickle.loads`` constants named ``opaque_obj_*`` and runs the
TorchScript unpickler on ``custom_obj_*``; it reads legacy ``data/weights/<model>.pt`` files
as pickles, loads compiled AOTInductor code from ``data/aotinductor/``, and loads
``data/sample_inputs/<model>.pt`` with ``weights_only=True`` but falls back to
``weights_only=False`` when that fails. A crafted archive therefore runs code on load.
``inspect_pt2`` lists every such member (and every member it does not recognise) without
unpickling anything; ``load_model`` refuses the file unless the user trusts it.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lipcert.checkpoint import CONFIG, WEIGHTS, load_run, load_state_checked, sha256_file
from lipcert.errors import CheckpointError, LipcertError
from lipcert.models import EmbeddingSpaceGPT, ModelConfig

__all__ = [
    "ACCEPTED_FORMS",
    "LoadedModel",
    "check_input_shape",
    "inspect_pt2",
    "load_model",
]

ACCEPTED_FORMS = (
    "a lipcert run directory (containing config.json)",
    "a .pt2 file written by torch.export.save",
    "package.module:factory with --weights FILE.safetensors",
)
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
_FACTORY = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
_TRUST_HINT = "pass --trust-pickle (trust_pickle=True) only if you trust the file's author"

# Members of a torch 2.13 .pt2 archive, relative to its single top-level folder.
_FIXED_MEMBERS = {"archive_format", "archive_version", "byteorder", ".data/version",
                  ".data/serialization_id"}
_KNOWN_MEMBER = re.compile(
    r"models/[^/]+\.json|data/weights/[^/]+_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/[^/]+_constants_config\.json|data/constants/tensor_\d+"
    r"|data/sample_inputs/[^/]+\.pt|extra/.+"
)
_RAW_TENSOR = re.compile(r"data/weights/weight_\d+|data/constants/tensor_\d+")


@dataclass
class LoadedModel:
    """A model resolved from a MODEL argument, with what lipcert knows about it.

    ``input_shape`` is the shape of one sample (no batch dimension); ``-1`` marks a
    dimension the program accepts at any size, and ``None`` means unknown.
    ``weights_sha256`` identifies the weights: of ``model.safetensors`` for a run, of the
    ``.pt2`` file itself, or of the ``--weights`` file for a factory (``None`` without one).
    """

    module: nn.Module
    program: torch.export.ExportedProgram | None
    config: dict[str, Any] | None
    source: str
    weights_sha256: str | None
    input_shape: tuple[int, ...] | None
    dataset: str | None
    kind: Literal["run", "pt2", "factory"]


def load_model(
    spec: str | Path, *, weights: str | Path | None = None, trust_pickle: bool = False
) -> LoadedModel:
    """Resolve ``spec`` (a run directory, a ``.pt2`` file or ``package.module:factory``).

    Nothing is unpickled unless ``trust_pickle`` is true, in which case a warning names what
    will be unpickled. Every error is a ``LipcertError`` (``CheckpointError`` for a corrupt,
    unsafe or non-finite checkpoint) whose message fits on one line.
    """
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        if not (path / CONFIG).is_file():
            raise LipcertError(f"{spec} is a directory without {CONFIG}; {_forms()}")
        _no_weights(weights, spec)
        return _load_run_dir(path)
    if path.is_file():
        if path.suffix != ".pt2":
            raise LipcertError(f"{spec}: unsupported model file type {path.suffix!r}; {_forms()}")
        _no_weights(weights, spec)
        return _load_pt2(path, trust_pickle)
    if _FACTORY.fullmatch(spec):
        return _load_factory(spec, weights, trust_pickle)
    raise LipcertError(f"{spec}: no such file or directory; {_forms()}")


def check_input_shape(loaded: LoadedModel, x: torch.Tensor) -> None:
    """Raise ``LipcertError`` if the per-sample shape of the batch ``x`` is not the model's.

    Dimensions recorded as ``-1`` match any size; an unknown input shape matches anything.
    """
    if loaded.input_shape is None:
        return
    got, want = tuple(x.shape[1:]), loaded.input_shape
    if len(got) != len(want) or any(w not in (-1, g) for g, w in zip(got, want, strict=True)):
        raise LipcertError(f"input shape {got} does not match the model's {want}")


# --------------------------------------------------------------------------- run directories


def _load_run_dir(path: Path) -> LoadedModel:
    model, config = load_run(path)
    mc: ModelConfig = model.config
    if mc.arch == "vit":
        module, shape = model, (mc.channels, mc.image_size, mc.image_size)
    else:
        module, shape = EmbeddingSpaceGPT(model).eval(), (mc.context, mc.d_model)
    # load_run has verified the recorded digest when there is one.
    digest = config.get("weights_sha256") or sha256_file(path / WEIGHTS)
    return LoadedModel(module, None, config, str(path), digest, shape, config.get("dataset"),
                       "run")


# --------------------------------------------------------------------------- .pt2 files


def _load_pt2(path: Path, trust_pickle: bool) -> LoadedModel:
    # One open file for hashing, inspecting and loading: replacing the file on disk
    # meanwhile cannot swap in unchecked content.
    with open(path, "rb") as f:
        digest = _sha256(f)
        unsafe = inspect_pt2(f, str(path))
        if unsafe and not trust_pickle:
            more = f" (and {len(unsafe) - 1} more)" if len(unsafe) > 1 else ""
            raise CheckpointError(
                f"{path}: refusing to load: {unsafe[0]}{more}; torch.export.load would unpickle "
                f"or run it, which can execute arbitrary code; {_TRUST_HINT}"
            )
        if unsafe:
            warnings.warn(f"{path}: trusting the file: {'; '.join(unsafe)}. Loading it may "
                          "execute arbitrary code.", stacklevel=3)
        f.seek(0)
        try:
            program = torch.export.load(f)
        except Exception as err:  # torch raises many types for a bad archive
            raise CheckpointError(
                f"{path}: torch.export.load failed: {type(err).__name__}: {_first_line(err)}"
            ) from err
    named = {**program.state_dict, **program.constants}
    _check_finite(named.items(), str(path))
    return LoadedModel(program.module(), program, None, str(path), digest,
                       _program_input_shape(program), None, "pt2")


def inspect_pt2(file: str | Path | IO[bytes], source: str | None = None) -> list[str]:
    """Check a ``.pt2`` archive without unpickling anything; list what would be unpickled.

    Raises ``CheckpointError`` if the file is not a readable torch.export archive (not a
    zip, truncated, a CRC mismatch, duplicate or missing members, malformed configs).
    Returns one line per member that ``torch.export.load`` would unpickle or that is not
    part of a plain archive: weights or constants marked ``use_pickle``, ``custom_obj_`` /
    ``opaque_obj_`` constants, sample inputs that do not load with ``weights_only=True``,
    and unrecognised members (AOTInductor code, legacy pickled weights, …). An empty list
    means the archive holds only raw tensors, JSON and ``weights_only``-loadable inputs.
    """
    source = source or str(file)
    try:
        with zipfile.ZipFile(file) as zf:
            return _inspect(zf, source)
    except zipfile.BadZipFile as err:
        raise CheckpointError(
            f"{source} is not a torch.export archive (not a zip file, or truncated): {err}"
        ) from err
    except (OSError, EOFError, NotImplementedError, RuntimeError, zlib.error) as err:
        raise CheckpointError(f"{source}: unreadable archive: {_first_line(err)}") from err


def _inspect(zf: zipfile.ZipFile, source: str) -> list[str]:
    names = zf.namelist()
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        raise CheckpointError(f"{source}: not a torch.export archive "
                              "(its members are not all under one top-level folder)")
    if len(set(names)) != len(names):
        raise CheckpointError(f"{source}: the archive has duplicate member names")
    bad = zf.testzip()
    if bad is not None:
        raise CheckpointError(f"{source}: archive member {bad} is corrupt (CRC mismatch)")
    root = roots.pop() + "/"
    members = {name[len(root):] for name in names}

    def read(member: str, content: bool = True) -> bytes:
        if member not in members:
            raise CheckpointError(f"{source}: not a complete torch.export archive "
                                  f"(missing {member})")
        return zf.read(root + member) if content else b""

    if read("archive_format") != b"pt2" or read("archive_version") != b"0":
        raise CheckpointError(f"{source}: not a torch.export archive of format pt2, version 0")
    models = sorted(m[len("models/"):-len(".json")] for m in members
                    if _KNOWN_MEMBER.fullmatch(m) and m.startswith("models/"))
    if "model" not in models:
        read("models/model.json")  # raises: missing
    unsafe = [f"unexpected archive member {m}" for m in sorted(members)
              if m not in _FIXED_MEMBERS and not _KNOWN_MEMBER.fullmatch(m)]
    for model in models:
        for kind, directory in (("weights", "data/weights/"), ("constants", "data/constants/")):
            config_name = f"{directory}{model}_{kind}_config.json"
            unsafe += _inspect_payloads(read(config_name), config_name, directory, read, source)
        unsafe += _inspect_sample_inputs(f"data/sample_inputs/{model}.pt", read)
    return unsafe


def _inspect_payloads(raw: bytes, config_name: str, directory: str, read, source: str
                      ) -> list[str]:
    """Unsafe entries of one weights or constants config (``{"config": {fqn: meta}}``)."""
    try:
        entries = json.loads(raw)["config"]
        items = [(fqn, meta["path_name"], meta.get("use_pickle")) for fqn, meta in entries.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{source}: {config_name} is malformed: {err!r}") from err
    unsafe = []
    for fqn, path_name, use_pickle in items:
        member = f"{directory}{path_name}"
        if use_pickle is not False:
            unsafe.append(f"{fqn} ({member}) is marked use_pickle")
        elif not _RAW_TENSOR.fullmatch(member):  # custom_obj_*, opaque_obj_*, …
            unsafe.append(f"{fqn} ({member}) is not a raw tensor")
        else:
            read(member, content=False)  # raises if missing
    return unsafe


def _inspect_sample_inputs(member: str, read) -> list[str]:
    raw = read(member)
    if not raw:  # a program saved without example inputs
        return []
    try:
        torch.load(io.BytesIO(raw), weights_only=True)
    except Exception as err:  # anything the restricted unpickler rejects
        lines = [line.strip() for line in str(err).splitlines()]
        why = next((line for line in lines if "GLOBAL" in line), _first_line(err))
        why = why.removeprefix("WeightsUnpickler error: ").split(". ")[0][:120]
        return [f"{member} does not load with weights_only=True ({why})"]
    return []


def _program_input_shape(program: torch.export.ExportedProgram) -> tuple[int, ...] | None:
    """Per-sample shape of the program's single tensor input, from its placeholder's
    ``meta["val"]``; symbolic (dynamic) dimensions become ``-1``."""
    user_inputs = set(program.graph_signature.user_inputs)
    vals = [node.meta.get("val") for node in program.graph.nodes
            if node.op == "placeholder" and node.name in user_inputs]
    tensors = [v for v in vals if isinstance(v, torch.Tensor)]
    if len(tensors) != 1 or tensors[0].dim() == 0:
        return None
    return tuple(d if isinstance(d, int) else -1 for d in tensors[0].shape[1:])


# --------------------------------------------------------------------------- factories


def _load_factory(spec: str, weights: str | Path | None, trust_pickle: bool) -> LoadedModel:
    module_name, attr = spec.split(":")
    try:
        package = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or whatever the module raises on import
        raise LipcertError(f"{spec}: cannot import {module_name}: {type(err).__name__}: "
                           f"{_first_line(err)}; {_forms()}") from err
    factory = getattr(package, attr, None)
    if not callable(factory):
        raise LipcertError(f"{spec}: {module_name} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as err:
        raise LipcertError(f"{spec}: calling {attr}() failed: {type(err).__name__}: "
                           f"{_first_line(err)}") from err
    if not isinstance(model, nn.Module):
        raise LipcertError(f"{spec}: {attr}() returned {type(model).__name__}, not an nn.Module")
    digest = None
    if weights is not None:
        weights = Path(weights)
        load_state_checked(model, _read_weights(weights, trust_pickle), str(weights))
        digest = sha256_file(weights)
    else:
        _check_finite(model.state_dict().items(), spec)
    shape = getattr(package, "INPUT_SHAPE", None)
    return LoadedModel(model.eval(), None, None, spec, digest,
                       None if shape is None else tuple(int(d) for d in shape), None, "factory")


def _read_weights(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a pickle file when the user trusts it."""
    if not path.is_file():
        raise LipcertError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    if suffix not in PICKLE_SUFFIXES:
        raise LipcertError(f"weights file {path}: unsupported type {suffix!r}; "
                           "expected .safetensors")
    if not trust_pickle:
        raise CheckpointError(
            f"{path} is a pickle file, and loading a pickle can execute arbitrary code; "
            "convert it to safetensors (safetensors.torch.save_file(model.state_dict(), "
            f"'model.safetensors')) or {_TRUST_HINT}"
        )
    warnings.warn(f"{path}: unpickling with weights_only=False (--trust-pickle); this may "
                  "execute arbitrary code", stacklevel=4)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{path}: torch.load failed: {_first_line(err)}") from err
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path} does not hold a state dict (names → tensors)")
    return state


# --------------------------------------------------------------------------- helpers


def _check_finite(named, source: str) -> None:
    """Raise ``CheckpointError`` naming the first floating tensor with a NaN or Inf.

    A NaN or Inf element makes the sum NaN or Inf, so a finite sum clears a tensor at the
    cost of one vectorised reduction; only a non-finite sum (possibly an overflow of finite
    values) needs the element-wise test.
    """
    for name, value in named:
        if (isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())
                and not torch.isfinite(value.detach().sum())
                and not torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: {name} contains NaN or Inf values")


def _sha256(f: IO[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    f.seek(0)
    return digest.hexdigest()


def _no_weights(weights: str | Path | None, spec: str) -> None:
    if weights is not None:
        raise LipcertError(f"--weights applies only to package.module:factory, not to {spec}")


def _forms() -> str:
    return "MODEL must be " + "; or ".join(ACCEPTED_FORMS)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

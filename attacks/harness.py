"""Run registered attacks over a dataset, batch by batch, into a per-sample table.

``run_attacks`` attacks one model with every (attack, ε) of a grid and returns the table
described in ``attacks.results`` (one row per sample, attack, norm and ε). With ``output``
it appends each finished batch to a CSV and resumes an interrupted run where it stopped.

Conventions (as AutoAttack's):

* the model is put in eval mode, and the inputs of each batch are moved to ``device``;
* a sample misclassified clean is not attacked: it is a success (not robust) at every ε,
  with δ = 0 and ``pred_adv = pred_clean``;
* every adversarial input is projected back into its ε-ball in the model's input space and
  into the input domain (``attacks.space.project``), so ``delta_*`` never exceed ε;
* robust accuracy at (model, norm, ε) is the per-sample worst case over all attacks run.

Repeatability: before each attack call, torch is seeded from (``seed``, attack, norm, ε,
batch, restart), and attacks that reseed themselves (APGD, FAB, AutoAttack) get that seed
too, so a batch gives the same result whether it runs first or after a resume. The model is
not part of the seed: every model sees the same random starts (paired comparisons), and a
``.pt2`` export gives the rows of its run directory.

Under torchrun each process attacks a contiguous block of whole batches and rank 0 writes
the rows of all of them, in the order above (``attacks.shards``): the same file as one
process writes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from attacks.registry import AttackSpec, resolve
from attacks.results import COLUMNS, Key, concat, read_results
from attacks.shards import merge_shards, open_shard
from attacks.space import AttackSpace, ImageSpace, measure, project
from lipcert.distributed import block, world
from lipcert.errors import LipcertError

__all__ = ["COLUMNS", "attack_accuracy", "attackable", "predict", "robust_accuracy",
           "run_attacks"]


def key_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed derived from ``seed`` and the parts of a key (stable across runs)."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256,
            device: str | torch.device = "cpu") -> tuple[torch.Tensor, int]:
    """Predicted classes (on the CPU) of ``x``, and the model's number of classes."""
    preds, n_classes = [], 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size].to(device))
        if logits.dim() != 2:
            raise LipcertError(f"the model returns logits of shape {tuple(logits.shape)}; "
                               "attacks need a classifier returning (batch, classes)")
        n_classes = logits.shape[1]
        preds.append(logits.argmax(dim=1).cpu())
    return (torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)), n_classes


class _ModeFree(nn.Module):
    """A module whose ``train()``/``eval()`` raise (the module of a loaded ``.pt2``
    program: its graph was fixed, in eval mode, when it was exported), wrapped so that the
    harness and torchattacks can switch modes: the switch stops at this wrapper."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def train(self, mode: bool = True) -> _ModeFree:
        self.training = mode
        return self


def attackable(model: nn.Module) -> nn.Module:
    """``model`` itself, or wrapped when it cannot switch between train and eval mode."""
    try:
        model.train(model.training)
    except NotImplementedError:
        return _ModeFree(model)
    return model


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients during the attack (attacks differentiate with
    respect to inputs only); the parameters' flags and the mode are restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _state_digest(model: nn.Module) -> str:
    state = model.state_dict()
    return _digest(*(state[k] for k in sorted(state) if isinstance(state[k], torch.Tensor)))


@dataclass
class _Batch:
    """One batch: inputs, labels and clean correctness on the device; the rest on the CPU."""

    number: int
    rows: list[int]
    x: torch.Tensor
    y: torch.Tensor
    correct: torch.Tensor
    pred_clean: torch.Tensor
    index: torch.Tensor
    radius: torch.Tensor


class _Runner:
    """Attacks one model; ``rows`` gives the table rows of one (attack, ε, batch) key."""

    def __init__(self, model: nn.Module, name: str, space: AttackSpace, seed: int,
                 n_classes: int, sample_shape: tuple[int, ...]) -> None:
        self.model, self.name, self.space = model, name, space
        self.seed, self.n_classes = seed, n_classes
        self.wrapped = space.wrap(model, sample_shape)

    @torch.no_grad()
    def preds(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).argmax(dim=1)

    def attack(self, spec: AttackSpec, x: torch.Tensor, y: torch.Tensor, eps: float | None,
               norm: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Adversarial inputs for ``x`` (all correctly classified) and their predictions.

        Bounded attacks return inputs projected into the ε-ball; minimal attacks (``eps``
        None) return what they found, clamped to the domain only. With restarts, a sample
        keeps its first successful example (or the first restart's, if none succeeds).
        """
        x_adv, pred = x.clone(), y.clone()
        todo = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for restart in range(spec.restarts):
            idx = todo.nonzero().flatten()
            if not len(idx):
                break
            seed = key_seed(self.seed, spec.name, norm, eps, batch, restart)
            torch.manual_seed(seed)
            u_clean = self.space.encode(x[idx])
            box_eps = None if eps is None else self.space.box_eps(eps)
            attack = spec.build(self.wrapped, box_eps, n_classes=self.n_classes,
                                seed=seed % 2**31)
            u_adv = attack(u_clean, y[idx]).detach()
            cand = self.space.decode(x[idx], u_clean, u_adv)
            cand = (self.space.clamp(cand) if eps is None
                    else project(x[idx], cand, norm, eps, self.space))
            cand_pred = self.preds(cand)
            fooled = cand_pred != y[idx]
            keep = torch.ones_like(fooled) if restart == 0 else fooled
            x_adv[idx[keep]], pred[idx[keep]] = cand[keep], cand_pred[keep]
            todo[idx[fooled]] = False
        return x_adv, pred

    def rows(self, spec: AttackSpec, eps: float, batch: _Batch,
             found: torch.Tensor | None) -> pd.DataFrame:
        """The rows of one key. ``found``: a minimal attack's examples for the correct
        samples, projected here onto this ε-ball; ``None`` runs a bounded attack."""
        norm, correct = spec.grid_norm, batch.correct
        x_adv = batch.x.clone()
        pred_adv = batch.pred_clean.to(batch.x.device, copy=True)
        if correct.any():
            if found is None:
                adv, pred = self.attack(spec, batch.x[correct], batch.y[correct], eps, norm,
                                        batch.number)
            else:
                adv = project(batch.x[correct], found, "l2", eps, self.space)
                pred = self.preds(adv)
            x_adv[correct], pred_adv[correct] = adv, pred
        l2, linf = measure(batch.x, x_adv)
        return pd.DataFrame({
            "model": self.name, "attack": spec.name, "norm": norm, "eps": eps,
            "index": batch.index.numpy(), "label": batch.y.cpu().numpy(),
            "pred_clean": batch.pred_clean.numpy(), "pred_adv": pred_adv.cpu().numpy(),
            "success": (pred_adv != batch.y).cpu().numpy(), "delta_l2": l2.cpu().numpy(),
            "delta_linf": linf.cpu().numpy(), "certified_radius_l2": batch.radius.numpy(),
        }, columns=COLUMNS)


def run_attacks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[str | AttackSpec],
    eps_l2: Sequence[float] = (),
    eps_linf: Sequence[float] = (),
    *,
    model_name: str = "model",
    space: AttackSpace | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    seed: int = 0,
    indices: Sequence[int] | torch.Tensor | None = None,
    certified_radius_l2: Sequence[float] | torch.Tensor | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
    settings: Mapping[str, Any] | None = None,
    on_key: Callable[[Key], None] | None = None,
) -> pd.DataFrame:
    """Attack ``model`` on ``(x, y)`` with each attack at each ε of its norm's grid.

    ``attacks``: registry names (or ``AttackSpec``s); ``params``: per-attack overrides,
    e.g. ``{"pgd": {"steps": 50}}``. ``space``: where torchattacks works (default
    ``ImageSpace``: images in [0, 1]; ``attacks.embedding.EmbeddingBox`` for embeddings).
    ``indices``: dataset indices of the samples (default 0..N−1). ``certified_radius_l2``:
    per-sample certified radii (NaN where none). ``output``: a CSV to append to batch by
    batch and to resume from (``overwrite`` starts it afresh). ``settings``: extra facts
    recorded in the CSV's sidecar and checked on resume. ``on_key`` is called after each
    (model, attack, norm, ε, batch) key is written. Returns this model's rows (see
    ``attacks.results``), in the order written.
    """
    specs = [resolve(a, (params or {}).get(a if isinstance(a, str) else a.name))
             for a in attacks]
    grids = {"l2": [float(e) for e in eps_l2], "linf": [float(e) for e in eps_linf]}
    space = space or ImageSpace()
    y, index, radius = _check_inputs(specs, grids, space, x, y, indices, certified_radius_l2,
                                     batch_size)
    used = sorted({s.grid_norm for s in specs})
    n = len(x)
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    mine = set(block(len(batches)))  # all of them, unless torchrun started several ranks
    model = attackable(model)
    with frozen(model.to(device)):
        pred_clean, n_classes = predict(model, x, batch_size, device)
        if n and int(y.max()) >= n_classes:
            raise LipcertError(f"labels go up to {int(y.max())} but the model has only "
                               f"{n_classes} classes")
        results, done = None, set()
        if output is not None:
            run_settings = json.loads(json.dumps({
                "attacks": [s.to_dict() for s in specs],
                "eps": {norm: grids[norm] for norm in used},
                "seed": seed, "batch_size": batch_size, "n": n, "device": str(device),
                "space": space.describe(), "model_sha256": _state_digest(model),
                "inputs_sha256": _digest(x, y, index, radius), **(settings or {}),
            }))
            results, done = open_shard(Path(output), model_name, run_settings,
                                       [index[b].tolist() for b in batches], overwrite)
        runner = _Runner(model, model_name, space, seed, n_classes, tuple(x.shape[1:]))
        frames: list[pd.DataFrame] = []
        with _progress(progress and world().main) as bars:
            total = sum(len(grids[s.grid_norm]) for s in specs) * len(mine)
            model_task = bars.add_task(model_name, total=total)
            for spec in specs:
                norm, grid = spec.grid_norm, grids[spec.grid_norm]
                task = bars.add_task(f"  {spec.name} ({norm})", total=len(grid) * len(mine))
                for number, rows in enumerate(batches):
                    if number not in mine:
                        continue
                    todo = [e for e in grid if (model_name, spec.name, norm, e, number)
                            not in done]
                    bars.advance(task, len(grid) - len(todo))
                    bars.advance(model_task, len(grid) - len(todo))
                    if not todo:
                        continue
                    batch = _Batch(number, rows, x[rows].to(device), y[rows].to(device),
                                   (pred_clean[rows] == y[rows]).to(device), pred_clean[rows],
                                   index[rows], radius[rows])
                    found = None
                    if spec.norm is None and batch.correct.any():  # one run for every ε
                        found = runner.attack(spec, batch.x[batch.correct],
                                              batch.y[batch.correct], None, norm, number)[0]
                    for eps in todo:
                        frame = runner.rows(spec, eps, batch, found)
                        key = (model_name, spec.name, norm, eps, number)
                        if results is not None:
                            results.append(key, frame)
                        frames.append(frame)
                        bars.advance(task)
                        bars.advance(model_task)
                        if on_key is not None:
                            on_key(key)
    if world().size > 1:
        return merge_shards(None if output is None else Path(output), model_name,
                            concat(frames), [s.name for s in specs], grids,
                            [index[b].tolist() for b in batches])
    if done:  # resumed: earlier rows come from the file
        df = read_results(output)
        return df[df["model"] == model_name].reset_index(drop=True)
    return concat(frames)


def _check_inputs(specs: list[AttackSpec], grids: dict[str, list[float]], space: AttackSpace,
                  x: torch.Tensor, y, indices, radii, batch_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the arguments of ``run_attacks``; returns labels, indices and radii."""
    if not specs:
        raise LipcertError("no attack given")
    for spec in specs:
        if not grids[spec.grid_norm]:
            raise LipcertError(f"attack {spec.name} needs an {spec.grid_norm.upper()} ε grid "
                               f"(--eps-{spec.grid_norm})")
    for norm, grid in grids.items():
        if any(not e > 0 for e in grid):
            raise LipcertError(f"every {norm} ε must be > 0, got {grid}")
    if batch_size < 1:
        raise LipcertError(f"batch size must be >= 1, got {batch_size}")
    used = {s.grid_norm for s in specs}
    space.validate(x, grids["l2"] if "l2" in used else [],
                   grids["linf"] if "linf" in used else [])
    n = len(x)
    y = torch.as_tensor(y, dtype=torch.long).cpu()
    index = torch.arange(n) if indices is None else torch.as_tensor(indices).long().cpu()
    radius = (torch.full((n,), float("nan"), dtype=torch.float64) if radii is None
              else torch.as_tensor(radii, dtype=torch.float64).cpu())
    if y.shape != (n,) or index.shape != (n,) or radius.shape != (n,):
        raise LipcertError(f"labels, indices and certified radii need one value per sample "
                           f"({n}), got {tuple(y.shape)}, {tuple(index.shape)}, "
                           f"{tuple(radius.shape)}")
    return y, index, radius


@contextmanager
def _progress(enabled: bool) -> Iterator[Progress]:
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled)
    with bars:
        yield bars


def robust_accuracy(df: pd.DataFrame) -> pd.DataFrame:
    """Per (model, norm, ε): clean and robust accuracy, robustness being the per-sample
    worst case over every attack run at that ε (as AutoAttack counts it).

    Columns: model, norm, eps, n, clean_accuracy, robust_accuracy, attacks.
    """
    if df.empty:
        return pd.DataFrame(columns=["model", "norm", "eps", "n", "clean_accuracy",
                                     "robust_accuracy", "attacks"])
    per_sample = df.groupby(["model", "norm", "eps", "index"], sort=False).agg(
        broken=("success", "any"),
        clean=("pred_clean", "first"), label=("label", "first"))
    per_sample["correct"] = per_sample["clean"] == per_sample["label"]
    table = per_sample.groupby(level=["model", "norm", "eps"], sort=False).agg(
        n=("broken", "size"), clean_accuracy=("correct", "mean"),
        robust_accuracy=("broken", lambda b: 1.0 - float(np.mean(b))))
    names = df.groupby(["model", "norm", "eps"], sort=False)["attack"].agg(
        lambda a: ",".join(dict.fromkeys(a)))
    return table.join(names.rename("attacks")).reset_index()


def attack_accuracy(df: pd.DataFrame) -> pd.DataFrame:
    """Robust accuracy of each attack on its own: per (model, attack, norm, ε)."""
    return (df.assign(robust=~df["success"])
            .groupby(["model", "attack", "norm", "eps"], sort=False)["robust"]
            .agg(n="size", robust_accuracy="mean").reset_index())

"""The training loop: Muon (hidden matrices) + AdamW (the rest), or AdamW alone, with a
weight constraint projected after every optimizer step and a linear learning-rate decay.

``train(config)`` returns a :class:`~lipcert.checkpoint.TrainResult` in memory;
``lipcert.checkpoint.save_run`` writes it as a run directory.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from lipcert.checkpoint import TrainResult
from lipcert.constraints import WeightConstraint
from lipcert.data import ImageDataset, TextDataset, load_dataset
from lipcert.ddp import DataParallel
from lipcert.distributed import resolve_device
from lipcert.errors import LipcertError
from lipcert.losses import needs_bound, training_loss
from lipcert.models import build_model, constrained_matrices
from lipcert.models.certified import sigma_upper
from lipcert.muon import Muon
from lipcert.train_config import TrainConfig


def build_optimizers(model: nn.Module, config: TrainConfig) -> list[torch.optim.Optimizer]:
    """Muon for every constrained matrix and AdamW for everything else, or AdamW alone.

    Muon (``torch.optim.Muon``; :class:`lipcert.muon.Muon` runs its iteration in float32 on
    CPUs without native bfloat16) orthogonalises each 2-D update with Newton–Schulz;
    ``adjust_lr_fn="original"`` scales it by √max(1, fan_out/fan_in), close to the paper's
    RMS→RMS normalisation. Muon's own weight decay is off: decay is a constraint method here.
    """
    if config.optimizer == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=config.adam_lr,
                                  weight_decay=config.weight_decay)]
    matrices = [p for _, p in constrained_matrices(model)]
    matrix_ids = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in matrix_ids]
    return [
        Muon(matrices, lr=config.lr, weight_decay=0.0, adjust_lr_fn="original"),
        torch.optim.AdamW(rest, lr=config.adam_lr, weight_decay=0.0),
    ]


def lr_factor(step: int, config: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warm-up over ``warmup_steps``, then linear decay to zero at ``steps``, or at
    ``max_time_s`` seconds of training if that comes first."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    done = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.max_time_s > 0:
        done = max(done, elapsed_s / config.max_time_s)
    return max(0.0, 1.0 - done)


class _Batches:
    """Seeded training batches and a fixed evaluation set for either kind of dataset."""

    def __init__(self, data: ImageDataset | TextDataset, config: TrainConfig) -> None:
        self.data, self.config = data, config
        self.generator = torch.Generator().manual_seed(config.seed)
        self._order = torch.empty(0, dtype=torch.long)

    def train_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        if isinstance(self.data, TextDataset):
            return self.data.batch("train", c.batch_size, c.context, self.generator)
        if len(self._order) < c.batch_size:  # reshuffle once per epoch
            perm = torch.randperm(len(self.data.y_train), generator=self.generator)
            self._order = torch.cat([self._order, perm])
        idx, self._order = self._order[: c.batch_size], self._order[c.batch_size :]
        return self.data.x_train[idx], self.data.y_train[idx]

    def eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.config
        if isinstance(self.data, TextDataset):
            g = torch.Generator().manual_seed(c.seed + 1)
            return [self.data.batch("val", c.batch_size, c.context, g)
                    for _ in range(c.eval_batches)]
        x, y = self.data.x_test, self.data.y_test
        return [(x[i : i + 500], y[i : i + 500]) for i in range(0, len(y), 500)]


def _loss_and_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    logits = model(x)
    logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    loss = F.cross_entropy(logits, y)
    return loss, (logits.argmax(-1) == y).sum().item(), y.numel()


def _training_loss(model: DataParallel, x: torch.Tensor, y: torch.Tensor,
                   config: TrainConfig):
    """The configured loss (``lipcert.losses``) and the batch's correct count. ``lmt`` uses
    the certified family's composed bound (``CertifiedViT.lipschitz_bound``), differentiable
    in the weights and never below the bound ``lipcert certify`` proves (the paper formula of
    the Lipschitz family can be below it, so it is not offered)."""
    logits = model.net(x)
    bound: torch.Tensor | float = 1.0
    if needs_bound(config.loss):
        if config.family != "certified":
            raise LipcertError("--loss lmt needs the certified family, whose Lipschitz bound "
                               "is known (and differentiable) during training")
        bound = model.module.lipschitz_bound()
    loss = training_loss(config.loss, logits, y, lipschitz=bound, eps=config.margin_eps,
                         temperature=config.temperature, alpha=config.hkr_alpha,
                         min_margin=config.min_margin)
    correct = (logits.reshape(-1, logits.shape[-1]).argmax(-1) == y.reshape(-1)).sum().item()
    return loss, correct, y.numel()


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: str | torch.device) -> tuple[float, float]:
    """Mean loss and accuracy (per token for text) over the evaluation batches."""
    model.eval()
    total_loss = total_correct = total = 0.0
    for x, y in batches:
        loss, correct, n = _loss_and_correct(model, x.to(device), y.to(device))
        total_loss += loss.item() * n
        total_correct += correct
        total += n
    model.train()
    return total_loss / total, total_correct / total


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Train one model.

    A non-finite loss stops training with the weights of the last finite evaluation and a
    ``status`` that says so; the caller saves that checkpoint and exits non-zero. Under
    torchrun the ranks share each global batch through DistributedDataParallel
    (``lipcert.ddp``) and all return the same weights.
    """
    device = resolve_device(config.device)
    data = load_dataset(config.dataset, config.data_dir)
    vocab = data.vocab_size if isinstance(data, TextDataset) else 0
    if isinstance(data, ImageDataset):
        c, h, _ = data.input_shape
        config = _with_image_shape(config, c, h, data.num_classes)
    torch.manual_seed(config.seed)
    model = build_model(config.model_config(vocab_size=vocab)).to(device)
    parallel = DataParallel(model, device)
    optimizers = build_optimizers(model, config)
    base_lrs = [[g["lr"] for g in o.param_groups] for o in optimizers]
    constraint = None
    if config.constraint != "none":
        constraint = WeightConstraint(
            config.constraint, config.w_max, constrained_matrices(model),
            weight_decay=config.weight_decay, norm=config.w_norm,
        )
        constrained = {id(p) for _, p in constrained_matrices(model)}
        for optimizer in optimizers:
            if any(id(p) in constrained for g in optimizer.param_groups for p in g["params"]):
                constraint.attach(optimizer)

    batches = _Batches(data, config)
    eval_set = batches.eval_batches()
    log: list[dict[str, float]] = []
    last_good = copy.deepcopy(model.state_dict())
    status = "finished"
    start = time.perf_counter()
    model.train()
    with _progress_bar(progress and parallel.world.main) as bar:
        task = bar.add_task(config.preset, total=config.steps, loss=math.nan, acc=math.nan)
        for step in range(config.steps):
            elapsed = time.perf_counter() - start
            if config.max_time_s > 0:
                elapsed = parallel.elapsed(elapsed)
            factor = lr_factor(step, config, elapsed)
            if step and factor <= 0:
                break  # max_time_s is spent
            for optimizer, lrs in zip(optimizers, base_lrs, strict=True):
                for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                    group["lr"] = lr * factor
            x, y, share = parallel.shard(*batches.train_batch())
            loss, correct, n = _training_loss(parallel, x.to(device), y.to(device), config)
            total, correct, n = parallel.global_stats(loss, correct, n, share)
            if not math.isfinite(total):
                model.load_state_dict(last_good)
                status = (f"stopped: loss became {total} at step {step}; kept the last "
                          f"good weights (lower --lr/--adam-lr or tighten the constraint)")
                break
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            (loss * share if share != 1.0 else loss).backward()
            for optimizer in optimizers:
                optimizer.step()
            row = {"step": step + 1, "loss": total, "train_acc": correct / n,
                   "lr": optimizers[0].param_groups[0]["lr"],
                   "elapsed_s": time.perf_counter() - start}
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                row["val_loss"], row["val_acc"] = evaluate(model, eval_set, device)
                if math.isfinite(row["val_loss"]):
                    last_good = copy.deepcopy(model.state_dict())
            log.append(row)
            bar.update(task, advance=1, loss=row["loss"], acc=row.get("val_acc", row["train_acc"]))

    report = constraint.finalize() if constraint is not None else []
    val_loss, val_acc = evaluate(model, eval_set, device)
    metrics = {"val_loss": val_loss, "val_acc": val_acc,
               "train_time_s": time.perf_counter() - start, "steps": len(log)}
    if config.family == "lipschitz":
        metrics["lipschitz_paper_formula"] = model.lipschitz_bound()
    if config.family == "certified":
        metrics["lipschitz_certified_formula"] = model.lipschitz_bound(sigma_upper).item()
    return TrainResult(config, model.eval(), metrics, log, report, status)


def _with_image_shape(config: TrainConfig, channels: int, size: int, classes: int) -> TrainConfig:
    return replace(config, channels=channels, image_size=size, num_classes=classes)


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.3f}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        disable=not enabled, transient=False,
    )

"""``lipcert train``: train a preset and write a run directory.

Under ``torchrun --nproc-per-node N`` the processes share each global batch
(DistributedDataParallel, ``lipcert.ddp``) and rank 0 writes the run directory."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from lipcert.commands.args import bool_argument
from lipcert.commands.display import stdout_is_terminal
from lipcert.errors import LipcertError
from lipcert.presets import PRESET_NAMES
from lipcert.train_config import TrainConfig

__all__ = ["add_parser", "run"]

# TrainConfig fields that are not flags of their own (set by --preset, or by the data).
_NOT_FLAGS = {"preset", "arch", "image_size", "channels", "num_classes"}
_TYPES = {"int": int, "float": float, "bool": bool_argument, "str": str, "str | None": str}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train``: ``--preset``, ``--out``, and one flag per preset field."""
    p = sub.add_parser(
        "train",
        help="train a preset and write a run directory",
        description="Train a model from a named preset and write RUN_DIR with "
        "model.safetensors, config.json, model.pt2 and train_log.csv. Every field of the "
        "preset can be overridden by the flag of the same name.",
    )
    p.add_argument("--preset", required=True, choices=PRESET_NAMES, metavar="NAME",
                   help="one of: " + ", ".join(PRESET_NAMES))
    p.add_argument("--out", required=True, type=Path, metavar="RUN_DIR",
                   help="run directory to create (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing RUN_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    overrides = p.add_argument_group("preset overrides")
    for f in fields(TrainConfig):
        if f.name in _NOT_FLAGS:
            continue
        overrides.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                               type=_TYPES[str(f.type)], metavar=str(f.type).split()[0].upper())
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Train, save the run, and print where it went with its final metrics."""
    from lipcert.checkpoint import check_writable, save_run
    from lipcert.distributed import is_main, on_main
    from lipcert.presets import preset
    from lipcert.train import train

    flags = {f.name for f in fields(TrainConfig)} - _NOT_FLAGS
    overrides = {k: v for k, v in vars(args).items() if k in flags and v is not None}
    config = preset(args.preset, **overrides)
    on_main(lambda: check_writable(args.out, args.overwrite))
    result = train(config, progress=not args.quiet and stdout_is_terminal())
    if not is_main():  # under torchrun, rank 0 alone writes the run and prints
        return 0 if result.status == "finished" else 1
    save_run(result, args.out, overwrite=args.overwrite)
    m = result.metrics
    bound = m.get("lipschitz_paper_formula")
    bound_text = f", Lipschitz bound (paper formula) {bound:.4g}" if bound is not None else ""
    print(f"run written to {args.out}  (val_acc {m['val_acc']:.4f}, val_loss "
          f"{m['val_loss']:.4f}{bound_text}, {m['train_time_s']:.0f} s)")
    if result.status != "finished":
        raise LipcertError(result.status)
    return 0

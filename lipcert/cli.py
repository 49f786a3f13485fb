"""The ``lipcert`` command line: one thin subcommand per verb.

Every error that lipcert anticipates (``LipcertError``) is printed as one line,
``error: …``, with exit status 2 and no partial output.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from attacks.cli import add_attack_parser
from lipcert.certify_cli import add_certify_parser
from lipcert.demo import add_demo_parser
from lipcert.errors import LipcertError
from lipcert.presets import PRESET_NAMES
from reports.cli import add_report_parser

# TrainConfig fields that are not flags of their own (set by --preset, or by the data).
_NOT_FLAGS = {"preset", "arch", "image_size", "channels", "num_classes"}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from lipcert.train_config import TrainConfig

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
    types = {"int": int, "float": float, "bool": _bool, "str": str, "str | None": str}
    for f in fields(TrainConfig):
        if f.name in _NOT_FLAGS:
            continue
        overrides.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                               type=types[str(f.type)], metavar=str(f.type).split()[0].upper())
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from lipcert.checkpoint import check_writable, save_run
    from lipcert.presets import preset
    from lipcert.train import train
    from lipcert.train_config import TrainConfig

    flags = {f.name for f in fields(TrainConfig)} - _NOT_FLAGS
    overrides = {k: v for k, v in vars(args).items() if k in flags and v is not None}
    config = preset(args.preset, **overrides)
    check_writable(args.out, args.overwrite)
    result = train(config, progress=not args.quiet)
    save_run(result, args.out, overwrite=args.overwrite)
    m = result.metrics
    bound = m.get("lipschitz_paper_formula")
    bound_text = f", Lipschitz bound (paper formula) {bound:.4g}" if bound is not None else ""
    print(f"run written to {args.out}  (val_acc {m['val_acc']:.4f}, val_loss "
          f"{m['val_loss']:.4f}{bound_text}, {m['train_time_s']:.0f} s)")
    if result.status != "finished":
        raise LipcertError(result.status)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lipcert",
        description="Certified Lipschitz bounds and adversarial testing for transformers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    add_certify_parser(sub)
    add_attack_parser(sub)
    add_report_parser(sub)
    add_demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except LipcertError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

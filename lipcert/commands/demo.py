"""``lipcert demo``: the whole pipeline on MNIST (``lipcert.demo``), under one progress bar
on a terminal, one plain line per stage otherwise, then the model summary."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lipcert.commands.args import seconds_argument
from lipcert.commands.display import make_console, stage_line, stdout_is_terminal
from lipcert.errors import LipcertError

__all__ = ["add_parser", "run"]

StageCallback = Callable[[int, int, str, "float | None"], None]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``demo``: the output directory, the sample counts and the training budget."""
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on MNIST: train, certify, attack, report (~7 min)",
        description="The whole pipeline on the embedded MNIST data. Trains three ViTs (the "
        "paper's Lipschitz family, a standard pre-LN ViT and the certified family) within a "
        "wall-clock training budget, certifies and attacks them, and writes "
        "OUT_DIR/report/report.html. With the defaults it takes about 7 minutes on 2 CPU "
        "cores: 4 of training, the rest certifying and attacking.",
    )
    # Defaults are DemoSettings' own (None here), so that --help need not import the demo.
    p.add_argument("-o", "--out", type=Path, default=None, metavar="OUT_DIR",
                   help="where runs and the report go (default runs/demo); finished runs "
                   "there are reused")
    p.add_argument("--n-certify", type=int, default=None, metavar="N",
                   help="test images certified globally (default 1000)")
    p.add_argument("--n-local", type=int, default=None, metavar="N",
                   help="test images certified locally, then attacked (FGSM, PGD, PGD-L2, "
                   "minimal perturbation) with the audit on (default 100)")
    p.add_argument("--n-margin", type=int, default=None, metavar="N",
                   help="test images certified in margin mode (symbolic remainders, a few "
                   "seconds each) for the Lipschitz and standard ViTs (default 30)")
    p.add_argument("--train-budget-s", type=seconds_argument, default=None, metavar="SECONDS",
                   help="wall-clock seconds of training, shared by the three models (a "
                   "quarter each for the Lipschitz and standard ViTs, half for the certified "
                   "one; default 240). More trains better models; the rest of the demo "
                   "does not depend on it")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the demo, print the summary and the report's path; a certificate violation
    found by the attacks is an error (after the report is written)."""
    from lipcert.demo import DemoSettings, run_demo
    from reports.render import summary_text

    given = {"out": args.out, "n_certify": args.n_certify, "n_local": args.n_local,
             "n_margin": args.n_margin, "train_budget_s": args.train_budget_s}
    settings = DemoSettings(**{k: v for k, v in given.items() if v is not None})
    with _stage_display(stdout_is_terminal()) as on_stage:
        result = run_demo(settings, on_stage)
    print(summary_text(result.report.summary))
    if result.failures:
        raise LipcertError("; ".join(result.failures))
    print(f"report: {result.report.html.resolve()}")
    return 0


@contextmanager
def _stage_display(terminal: bool) -> Iterator[StageCallback]:
    """On a terminal, one rich progress bar over the stages; otherwise a plain line as each
    stage ends: ``[3/13] certify vit-mnist-lipschitz (global): 12.3 s (total 140.2 s)``."""
    start = time.perf_counter()
    if not terminal:
        def line(number: int, total: int, name: str, seconds: float | None) -> None:
            if seconds is not None:
                print(stage_line(f"[{number}/{total}] {name}", seconds,
                                 f"total {time.perf_counter() - start:.1f} s"), flush=True)

        print("demo: training, certifying, attacking, reporting", flush=True)
        yield line
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]demo"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=make_console()) as bar:
        task = bar.add_task("starting", total=None)

        def advance(number: int, total: int, name: str, seconds: float | None) -> None:
            bar.update(task, completed=number - (seconds is None), total=total,
                       description=name)

        yield advance

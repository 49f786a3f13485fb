"""``lipcert certify``: certificates for a model on a dataset, printed and written as JSON."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from lipcert.commands.args import add_input_arguments, eps_argument, seconds_argument
from lipcert.commands.display import make_console, stage_line, stdout_is_terminal

if TYPE_CHECKING:
    from lipcert.lower import LowerBound, SearchProgress

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``certify``: MODEL, the samples, the mode and the lower bound's budget."""
    p = sub.add_parser(
        "certify",
        help="certified Lipschitz bounds and per-sample certified radii",
        description="Certify MODEL on the first N test samples of a dataset: per-layer "
        "Lipschitz upper bounds, the global bound of the logits (L2), an empirical lower "
        "bound, per-sample certified radii r = (z_y - max_{j!=y} z_j) / (sqrt(2) L) and "
        "certified accuracy. MODEL is a run directory, a .pt2 file (torch.export.save), or "
        "package.module:factory with --weights FILE.safetensors.",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--data", help="dataset name (default: the run's dataset)")
    p.add_argument("--data-dir", help="dataset directory or text file")
    add_input_arguments(p)
    p.add_argument("--n", "-n", type=int, default=1000,
                   help="number of test samples (default 1000; under torchrun write -n, since "
                   "torchrun reads --n as an abbreviation of its own options)")
    p.add_argument("--eps", type=eps_argument, default="0.25,0.5,1.0",
                   help="L2 radii for certified accuracy (default 0.25,0.5,1.0)")
    p.add_argument("--mode", choices=("global", "local", "margin"), default="global",
                   help="global: one bound for the input domain; local: a bound per ball; "
                   "margin: local plus margin-gradient bounds with symbolic remainders "
                   "(slower, about a second per sample on the demo ViTs; each sample keeps "
                   "its largest sound radius)")
    p.add_argument("--method", choices=("exact", "gram"), default="exact",
                   help="certified spectral norms: exact (float64 Gram eigenvalues, rounded "
                   "up) or gram (Gram iteration)")
    p.add_argument("--no-lower", action="store_true",
                   help="skip the empirical lower bound (gradient ascent on Jacobian norms)")
    p.add_argument("--lower-budget-s", type=seconds_argument, default=None, metavar="SECONDS",
                   help="wall-clock budget of the empirical lower bound's search (default: "
                   "max(5 s, the time the certificate took); 'inf': the whole search). "
                   "Stopping early gives a weaker witness, never an unsound one")
    p.add_argument("--device", default="cpu",
                   help="where the certified weight norms are computed, in float64: cpu, cuda "
                   "(under torchrun: each process's own GPU) or auto (default cpu)")
    p.add_argument("--weights", help="safetensors weights for a package.module:factory MODEL")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow pickled content (it can execute code): only for trusted files")
    p.add_argument("-o", "--output", type=Path, default=Path("certificate.json"),
                   help="JSON output (default certificate.json, written atomically)")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Certify, print the per-layer table and the summary, and say where the JSON went."""
    from lipcert.certify_run import certify_model
    from lipcert.distributed import is_main

    main = is_main()  # under torchrun, rank 0 alone prints
    with _lower_display(main and stdout_is_terminal() and not args.no_lower) as on_progress:
        result = certify_model(
            args.model, data=args.data, data_dir=args.data_dir, n=args.n, eps=args.eps,
            mode=args.mode, method=args.method, lower=not args.no_lower,
            lower_budget_s=args.lower_budget_s, weights=args.weights,
            trust_pickle=args.trust_pickle, output=args.output, on_lower_progress=on_progress,
            device=args.device, inputs=args.inputs, domain=args.domain,
            embedding_table=args.embedding_table)
    if not main:
        return 0
    for note in result.notes:
        print(note)
    print(stage_line("certificate", result.certificate.timing_s["total"]))
    if result.lower is not None:
        print(stage_line("lower bound", result.lower.elapsed_s, lower_summary(result.lower)))
    print(result.certificate.format_table())
    print(f"certificate written to {args.output}")
    return 0


def lower_summary(lower: LowerBound) -> str:
    """How the lower bound's search ended, in a few words."""
    how = "finished" if lower.stopped == "finished" else f"budget of {lower.budget_s:g} s spent"
    return (f"{how}: {lower.samples_scanned} samples scanned, {lower.ascent_steps_done} "
            "ascent steps")


@contextmanager
def _lower_display(enabled: bool) -> Iterator[Callable[[SearchProgress], None] | None]:
    """A rich progress bar for the lower bound's search, filling up as its budget is spent
    (before the search starts: the certificate, with a bar that just pulses)."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]certify"), BarColumn(), TextColumn("{task.description}"),
                   TimeElapsedColumn(), console=make_console(), transient=True)
    task = bar.add_task("certificate", total=None)

    def show(p: SearchProgress) -> None:
        where = (f"scan {p.samples_scanned}/{p.samples}" if p.phase == "scan"
                 else f"ascent {p.ascent_step}/{p.ascent_steps}")
        limited = p.budget_s is not None and math.isfinite(p.budget_s)
        budget = f", budget {p.budget_s:g} s" if limited else ""
        bar.update(task, total=p.budget_s if limited else None, completed=p.elapsed_s,
                   description=f"lower bound: {where}, best {p.best:.5g}{budget}")

    with bar:
        yield show

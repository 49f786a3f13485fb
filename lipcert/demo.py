"""``lipcert demo``: the whole pipeline on the embedded MNIST data.

Train ``vit-mnist-lipschitz``, ``vit-mnist-standard`` and ``vit-mnist-certified`` (finished
runs in OUT_DIR are reused), certify each in global and local mode, attack each with FGSM,
PGD and PGD-L2 with the certificate audit on, and build the report. Every stage runs the
same code as its own ``lipcert`` subcommand; one progress display covers them all.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from lipcert.errors import LipcertError

PRESETS = ("vit-mnist-lipschitz", "vit-mnist-standard", "vit-mnist-certified")
EPS_L2 = "0.1,0.25,0.5,1.0"
EPS_LINF = "0.02,0.05,0.1"


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on MNIST: train, certify, attack, report",
        description="The whole pipeline on the embedded MNIST data. Trains three ViTs (the "
        "paper's Lipschitz family, a standard pre-LN ViT and the certified family), certifies "
        "and attacks them, and writes OUT_DIR/report/report.html (about 6 minutes on 2 quiet "
        "CPU cores).",
    )
    p.add_argument("-o", "--out", type=Path, default=Path("runs/demo"), metavar="OUT_DIR",
                   help="where runs and the report go (default runs/demo)")
    p.add_argument("--n-certify", type=int, default=1000, help="samples certified globally")
    p.add_argument("--n-local", type=int, default=200,
                   help="samples certified locally, and attacked with the audit on")
    p.set_defaults(handler=run_demo)


def _stages(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    out = args.out
    stages = []
    for preset in PRESETS:
        run = out / preset
        if not (run / "config.json").is_file():
            stages.append((f"train {preset}", ["train", "--preset", preset, "--out", str(run),
                                               "--overwrite", "--quiet"]))
    for preset in PRESETS:
        run = out / preset
        stages.append((f"certify {preset} (global)", [
            "certify", str(run), "--n", str(args.n_certify), "--eps", EPS_L2,
            "-o", str(run / "certificate-global.json")]))
        # The local certificate's radii are at least the global ones (certify keeps the
        # larger of the two, both sound), so the audit checks the stronger claim.
        stages.append((f"certify {preset} (local)", [
            "certify", str(run), "--n", str(args.n_local), "--eps", EPS_L2, "--mode", "local",
            "--no-lower", "-o", str(run / "certificate-local.json")]))
        stages.append((f"attack {preset}", [
            "attack", str(run), "--data", "mnist", "--attacks", "fgsm,pgd,pgdl2",
            "--eps-l2", EPS_L2, "--eps-linf", EPS_LINF, "--n", str(args.n_local),
            "--certificate", str(run / "certificate-local.json"),
            "--overwrite", "--quiet", "-o", str(run / "attacks.csv")]))
    stages.append(("report", ["report", *(str(out / p) for p in PRESETS),
                              "-o", str(out / "report")]))
    return stages


def run_demo(args: argparse.Namespace) -> int:
    from lipcert.cli import main

    console = Console()
    stages = _stages(args)
    failures: list[str] = []
    last_output = ""
    columns = (TextColumn("[bold]demo"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("", total=len(stages))
        for name, argv in stages:
            progress.update(task, description=name)
            captured = io.StringIO()
            with contextlib.redirect_stdout(captured):
                code = main(argv)
            last_output = captured.getvalue()
            if code == 1 and argv[0] == "attack":
                failures.append(f"{name}: certificate violations (see the attack CSV)")
            elif code != 0:
                raise LipcertError(f"demo stage '{name}' failed (exit {code})")
            progress.advance(task)
    console.print(last_output.rstrip())
    if failures:
        raise LipcertError("; ".join(failures))
    console.print(f"report: {(args.out / 'report' / 'report.html').resolve()}")
    return 0

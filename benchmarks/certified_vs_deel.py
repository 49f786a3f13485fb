"""Certified robustness side by side: deel-torchlip's 1-Lipschitz dense and convolutional
baselines against lipcert's certified ViT, on the same data, with the same wall-clock
training budget each.

1. **deel-torchlip baselines** (``deel_baseline.py`` beside this script, trained here,
   in-process): the dense ``Flatten → SpectralLinear(784, 256) → GroupSort2 →
   SpectralLinear(256, 256) → GroupSort2 → SpectralLinear(256, 10)`` and the convolutional
   net of deel's HKR tutorial (``SpectralConv2d`` + ``GroupSort2`` + ``ScaledL2NormPool2d``,
   twice, then ``SpectralLinear`` 64 + ``GroupSort2`` + ``SpectralLinear``); loss
   ``HKRMulticlassLoss(alpha=0.98, min_margin=1.0)``, Adam at lr 1e-3 with batch 128 as in
   deel-torchlip's dense MNIST example (its Fashion-MNIST example also uses Adam at 1e-3),
   epochs until ``--budget-s`` is spent. Each is then ``vanilla_export()``-ed and saved with
   ``torch.export.save`` as a ``.pt2`` with a dynamic batch dimension, and certified from
   that graph as it is.
2. **lipcert ViT**: ``lipcert train --preset PRESET --out DIR --max-time-s BUDGET --steps
   10000000``: like deel's net, it trains until the budget is spent (its learning rate
   decays linearly to zero at the budget).
3. Both are certified with ``lipcert certify … --mode global --n N --eps …`` and attacked
   with ``lipcert attack … --attacks pgdl2`` (100 steps, 5 restarts, step 2.5·ε/steps as in
   lipcert's registry) with ``--certificate`` (the ε-grid audit) and ``--audit-radius``
   (every certified ball attacked at exactly its radius). These
   are subprocesses running the ``lipcert`` command line a user runs.

Both deel nets are 1-Lipschitz layer by layer, so the engine must certify each with a bound
of at most 1 up to rounding (and deel's Björck tolerance); the script checks and prints
that (the convolutional net's bound is below 1 where deel's convolution normalisation
leaves its layers below 1).

Output, under ``--out`` (a directory; every file written atomically, the deel model's
folder as a whole):
``table.csv`` and ``table.md`` (model | clean | certified L2 @ε… | PGD-L2 robust @ε… |
violations | train wall time), ``summary.json`` (bounds, epochs, steps, timings, settings),
and one folder per model with its ``.pt2`` or run directory, ``certificate.json``,
``attacks.csv`` and the attack's audit files.

    pip install -e .[bench]          # deel-torchlip==1.0.5, benchmark only
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/certified_vs_deel.py [--dataset mnist]
        [--preset vit-mnist-certified] [--budget-s 300] [--n 1000]
        [--eps 0.25,0.5,1.0,1.58] [--out runs/certified-vs-deel-mnist] [--overwrite]

``--dataset fashion-mnist`` uses the full 60k/10k split, the preset
``vit-fashion-mnist-certified`` and a default budget of 900 s.
"""

from __future__ import annotations

import os

# On the shared 2-core hosts this runs on, torch's default of one thread per core spin-waits
# and slows every run down several times: one thread here, and in every `lipcert` subprocess
# (set before torch is imported; torch.set_num_threads below as well).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import csv
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from deel_baseline import (
    HKR_ALPHA,
    HKR_MIN_MARGIN,
    build_deel,
    build_deel_conv,
    export_deel,
    require_deel,
    train_deel,
)

from lipcert.atomic import atomic_directory, write_json_atomic, write_text_atomic
from lipcert.data import load_dataset

DEFAULT_PRESETS = {"mnist": "vit-mnist-certified", "fashion-mnist": "vit-fashion-mnist-certified"}
DEFAULT_BUDGET_S = {"mnist": 300.0, "fashion-mnist": 900.0}
# deel's Björck orthonormalisation stops at a tolerance (eps_bjorck = 1e-3), so its float32
# weights have σ_max = 1 + O(1e-7) in practice; the certified bound may exceed 1 by that and
# by the engine's own rounding margin, nothing more.
BOUND_TOLERANCE = 1e-3
DEEL_NAME = "deel-dense"
DEEL_CONV_NAME = "deel-conv"
# The ViT trains until the budget is spent, as deel's net does: a step count it never reaches.
UNBOUNDED_STEPS = 10**7


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; dataset-dependent defaults are filled in after parsing."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DEFAULT_PRESETS), default="mnist")
    p.add_argument("--preset", default=None,
                   help="lipcert preset for the ViT (default: vit-<dataset>-certified)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock training budget per model, seconds "
                   "(default 300 for mnist, 900 for fashion-mnist)")
    p.add_argument("--n", type=int, default=1000, help="test samples certified and attacked")
    p.add_argument("--eps", default="0.25,0.5,1.0,1.58", help="L2 radii (comma-separated)")
    p.add_argument("--steps", type=int, default=100, help="PGD-L2 steps (default 100)")
    p.add_argument("--restarts", type=int, default=5, help="PGD-L2 restarts (default 5)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="deel training batch (default 128, its MNIST example's)")
    p.add_argument("--lr", type=float, default=1e-3, help="deel Adam lr (default 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads here and OMP_NUM_THREADS of the subprocesses "
                   "(default 1: the hosts are shared)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default runs/certified-vs-deel-<dataset>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    args.preset = args.preset or DEFAULT_PRESETS[args.dataset]
    args.budget_s = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S[args.dataset]
    args.out = args.out or Path("runs") / f"certified-vs-deel-{args.dataset}"
    try:
        args.eps_list = [float(e) for e in args.eps.split(",") if e.strip()]
    except ValueError:
        p.error(f"--eps: expected comma-separated numbers, got {args.eps!r}")
    if not args.eps_list or min(args.eps_list) <= 0:
        p.error("--eps needs at least one positive radius")
    if args.budget_s <= 0 or args.n < 1 or args.steps < 1 or args.restarts < 1:
        p.error("--budget-s, --n, --steps and --restarts must be positive")
    return args


# --------------------------------------------------------------------------- the lipcert CLI


def lipcert_cli() -> list[str]:
    """The ``lipcert`` console script of this environment (what a user runs)."""
    beside = Path(sys.executable).with_name("lipcert")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("lipcert")
    return [found] if found else [sys.executable, "-m", "lipcert.cli"]


def subprocess_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def run_lipcert(args: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)
                ) -> tuple[int, float]:
    """Run ``lipcert ARGS`` with its output streamed to the terminal; return the exit status
    and wall time. Exits this script on an exit status outside ``ok``."""
    command = [*lipcert_cli(), *args]
    print("$ " + " ".join(_quote(a) for a in ["lipcert", *args]), flush=True)
    start = time.perf_counter()
    rc = subprocess.run(command, env=env, check=False).returncode
    wall = time.perf_counter() - start
    if rc not in ok:
        sys.exit(f"error: `lipcert {args[0]}` failed with exit status {rc} (see above)")
    return rc, wall


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " {}\"") else arg


# --------------------------------------------------------------------------- results


@dataclass
class ModelResult:
    """One row of the table, plus what the notes print."""

    name: str
    clean: float
    certified: dict[float, float]
    robust: dict[float, float]
    violations: int
    train_wall_s: float
    lipschitz_upper: float
    notes: dict[str, Any] = field(default_factory=dict)


def read_certificate(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def summarize(name: str, certificate: Path, attacks_csv: Path, train_wall_s: float,
              eps: list[float], notes: dict[str, Any]) -> ModelResult:
    """Clean and certified accuracy from the certificate; robust accuracy (worst case over
    restarts, per sample) from the attack CSV; violations from its ``.violations.csv``."""
    from attacks.harness import robust_accuracy
    from attacks.results import read_results

    cert = read_certificate(certificate)
    samples = cert["samples"]
    clean = sum(s["pred"] == s["label"] for s in samples) / len(samples)
    certified = {float(r["eps"]): float(r["accuracy"]) for r in cert["certified_accuracy"]}
    table = robust_accuracy(read_results(attacks_csv))
    robust = {}
    for e in eps:
        row = table[(table["norm"] == "l2") & ((table["eps"] - e).abs() < 1e-12)]
        robust[e] = float(row["robust_accuracy"].iloc[0]) if len(row) else math.nan
    violations_csv = attacks_csv.with_name(f"{attacks_csv.stem}.violations.csv")
    with open(violations_csv, newline="") as f:
        violations = sum(1 for _ in csv.DictReader(f))
    upper = cert["lipschitz"]["upper"]
    return ModelResult(name, clean, {e: certified.get(e, math.nan) for e in eps}, robust,
                       violations, train_wall_s, math.inf if upper == "inf" else float(upper),
                       {**notes, "lipschitz_lower": cert["lipschitz"].get("lower"),
                        "n": len(samples)})


def results_table(results: list[ModelResult], eps: list[float]) -> pd.DataFrame:
    """The comparison table, one row per model, its numbers formatted as printed."""
    rows = [{"model": r.name, "clean": f"{r.clean:.3f}",
             **{f"certified L2 @{e:g}": f"{r.certified[e]:.3f}" for e in eps},
             **{f"PGD-L2 robust @{e:g}": f"{r.robust[e]:.3f}" for e in eps},
             "violations": str(r.violations), "train wall time (s)": f"{r.train_wall_s:.0f}"}
            for r in results]
    return pd.DataFrame(rows)


def table_csv(table: pd.DataFrame) -> str:
    return table.to_csv(index=False, lineterminator="\n")


def table_markdown(table: pd.DataFrame, notes: list[str]) -> str:
    """The table in Markdown, then the notes as a list."""
    markdown = table.to_markdown(index=False, disable_numparse=True)
    return "\n".join([markdown, "", *(f"- {n}" for n in notes)]) + "\n"


def table_text(table: pd.DataFrame) -> str:
    """The table as aligned plain text, for the terminal."""
    return table.to_markdown(index=False, tablefmt="simple", disable_numparse=True,
                             colalign=("left", *("right",) * (table.shape[1] - 1)))


# --------------------------------------------------------------------------- main


def prepare_out(out: Path, overwrite: bool) -> None:
    """Create ``out``; an existing non-empty one is replaced only with ``--overwrite``, and
    only if it holds this script's output (never an unrelated directory)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            sys.exit(f"error: {out} exists and is not empty; pass --overwrite to replace it")
        if not any((out / marker).exists() for marker in (DEEL_NAME, DEEL_CONV_NAME,
                                                          "summary.json")):
            sys.exit(f"error: {out} is not an output of this benchmark; refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def certify_and_attack(spec: Path, folder: Path, args: argparse.Namespace,
                       env: dict[str, str]) -> tuple[Path, Path, int]:
    """``lipcert certify`` then ``lipcert attack`` on one model; returns the certificate,
    the attack CSV and the attack's exit status (1: the audit found violations)."""
    certificate, attacks_csv = folder / "certificate.json", folder / "attacks.csv"
    eps = ",".join(f"{e:g}" for e in args.eps_list)
    run_lipcert(["certify", str(spec), "--data", args.dataset, "--mode", "global",
                 "--n", str(args.n), "--eps", eps, "-o", str(certificate)], env)
    params = {"pgdl2": {"steps": args.steps, "restarts": args.restarts,
                        "step_fraction": 2.5 / args.steps}}
    attack = ["attack", str(spec), "--data", args.dataset, "--attacks", "pgdl2",
              "--attack-params", json.dumps(params, separators=(",", ":")), "--eps-l2", eps,
              "--n", str(args.n), "--seed", str(args.seed), "--certificate", str(certificate),
              "-o", str(attacks_csv), "--overwrite", "--quiet", "--audit-radius",
              "--audit-steps", str(args.steps), "--audit-restarts", str(args.restarts)]
    rc, _ = run_lipcert(attack, env, ok=(0, 1))
    return certificate, attacks_csv, rc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torchlip = require_deel()
    from lipcert.presets import PRESET_NAMES

    if args.preset not in PRESET_NAMES:
        sys.exit(f"error: lipcert has no preset {args.preset!r} (yet); pass --preset NAME, "
                 f"one of: {', '.join(PRESET_NAMES)}")
    torch.set_num_threads(args.threads)  # see the OMP_NUM_THREADS note at the top
    env = subprocess_env(args.threads)
    prepare_out(args.out, args.overwrite)
    started = time.perf_counter()

    data = load_dataset(args.dataset)
    channels, height, width = data.x_train.shape[1:]
    num_classes = int(data.y_train.max()) + 1
    print(f"{args.dataset}: {len(data.x_train)} train / {len(data.x_test)} test images; "
          f"budget {args.budget_s:.0f} s per model; certify and attack the first {args.n} "
          f"test images at L2 eps {args.eps}", flush=True)

    # 1. deel-torchlip baselines, trained here.
    deel_nets = []
    for k, (name, build) in enumerate((
            (DEEL_NAME, lambda: build_deel(torchlip, channels * height * width, num_classes)),
            (DEEL_CONV_NAME, lambda: build_deel_conv(torchlip, (channels, height, width),
                                                     num_classes)))):
        print(f"[{k + 1}/6] training the deel-torchlip {name} baseline for "
              f"{args.budget_s:.0f} s", flush=True)
        torch.manual_seed(args.seed)
        net = build()
        training = train_deel(torchlip, net, data.x_train, data.y_train, num_classes,
                              args.budget_s, args.batch_size, args.lr, args.seed)
        folder_path = args.out / name
        pt2 = folder_path / f"{name}.pt2"
        with atomic_directory(folder_path) as folder:
            _, sigma_product = export_deel(net, data.x_test, folder / pt2.name)
            (folder / "train_log.csv").write_text(training.log_csv())
        print(f"  exported {pt2}", flush=True)
        deel_nets.append((name, folder_path, pt2, training, sigma_product))

    # 2. lipcert ViT, trained by the CLI.
    vit_dir = args.out / args.preset
    train_args = ["train", "--preset", args.preset, "--out", str(vit_dir), "--seed",
                  str(args.seed), "--quiet", "--max-time-s", f"{args.budget_s:g}",
                  "--steps", str(UNBOUNDED_STEPS)]
    print(f"[3/6] training lipcert {args.preset} for {args.budget_s:.0f} s", flush=True)
    _, vit_process_s = run_lipcert(train_args, env)
    vit_config = json.loads((vit_dir / "config.json").read_text())
    vit_metrics = vit_config.get("metrics", {})
    vit_train_s = float(vit_metrics.get("train_time_s", vit_process_s))

    # 4-6. certify and attack all three, through the CLI.
    results = []
    for k, (name, folder_path, pt2, training, sigma_product) in enumerate(deel_nets):
        print(f"[{k + 4}/6] certifying and attacking the deel-torchlip {name} baseline",
              flush=True)
        cert, attacks_csv, rc = certify_and_attack(pt2, folder_path, args, env)
        label = (f"deel-torchlip dense {channels * height * width}-256-256-{num_classes}"
                 if name == DEEL_NAME else "deel-torchlip conv 16-32 (L2-norm pooling)-64")
        results.append(summarize(
            label, cert, attacks_csv, training.wall_s, args.eps_list,
            {"epochs": round(training.epochs, 3), "steps": training.steps,
             "sigma_max_product_float64": sigma_product, "attack_exit_status": rc}))
    print(f"[6/6] certifying and attacking lipcert {args.preset}", flush=True)
    vit_cert, vit_attacks, vit_rc = certify_and_attack(vit_dir, vit_dir, args, env)
    results.append(
        summarize(f"lipcert {args.preset}", vit_cert, vit_attacks, vit_train_s, args.eps_list,
                  {"steps": vit_metrics.get("steps"), "val_acc": vit_metrics.get("val_acc"),
                   "train_process_wall_s": round(vit_process_s, 3),
                   "attack_exit_status": vit_rc}))
    deel_results, vit_result = results[:-1], results[-1]
    bound_ok = all(r.lipschitz_upper <= 1.0 + BOUND_TOLERANCE for r in deel_results)
    notes = [
        f"data: {args.dataset}, first {results[0].notes['n']} test images; certified accuracy "
        f"= fraction with radius r > eps, r = margin / (sqrt(2) L), global mode",
        f"PGD-L2: {args.steps} steps, {args.restarts} restarts, step 2.5*eps/{args.steps}; "
        "robust = per-sample worst case; violations = adversarial examples inside a "
        "certified radius (eps grid and per-sample radius audit)",
        f"deel-torchlip {torchlip.__version__}: Adam lr {args.lr:g}, batch {args.batch_size}, "
        f"HKRMulticlassLoss(alpha={HKR_ALPHA:g}, min_margin={HKR_MIN_MARGIN:g}), certified "
        "from the vanilla_export()-ed graph as it is",
        *(f"{r.name}: certified Lipschitz upper bound {r.lipschitz_upper:.9g}"
          + ("" if r.notes["sigma_max_product_float64"] is None else
             f" (float64 product of the layers' sigma_max "
             f"{r.notes['sigma_max_product_float64']:.9g})")
          + f"; {r.notes['epochs']:.2f} epochs, {r.notes['steps']} steps"
          for r in deel_results),
        f"lipcert {args.preset}: certified Lipschitz upper bound "
        f"{vit_result.lipschitz_upper:.6g}; {vit_metrics.get('steps')} steps; train wall time "
        f"{vit_train_s:.0f} s (training loop), {vit_process_s:.0f} s (whole `lipcert train`)"
        + f"; --max-time-s {args.budget_s:g} --steps {UNBOUNDED_STEPS} (the budget ends "
        "training and its learning-rate decay)",
    ]
    table = results_table(results, args.eps_list)
    write_text_atomic(args.out / "table.csv", table_csv(table))
    write_text_atomic(args.out / "table.md", table_markdown(table, notes))
    write_json_atomic(args.out / "summary.json", {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": [{"name": r.name, "clean": r.clean,
                    "certified": {f"{e:g}": v for e, v in r.certified.items()},
                    "robust": {f"{e:g}": v for e, v in r.robust.items()},
                    "violations": r.violations, "train_wall_s": r.train_wall_s,
                    "lipschitz_upper": r.lipschitz_upper, **r.notes} for r in results],
        "deel_bound_check": {"upper": {r.name: r.lipschitz_upper for r in deel_results},
                             "tolerance": BOUND_TOLERANCE, "ok": bound_ok},
        "total_wall_s": time.perf_counter() - started,
    })

    print()
    print(table_text(table))
    print()
    for note in notes:
        print(f"* {note}")
    for r in deel_results:
        ok = r.lipschitz_upper <= 1.0 + BOUND_TOLERANCE
        print(f"deel bound check, {r.name}: certified upper bound {r.lipschitz_upper:.9g} "
              f"{'<=' if ok else '>'} 1 + {BOUND_TOLERANCE:g}: {'OK' if ok else 'FAIL'}")
    print(f"written: {args.out / 'table.csv'}, {args.out / 'table.md'}, "
          f"{args.out / 'summary.json'}  (total {time.perf_counter() - started:.0f} s)")
    violations = sum(r.violations for r in results)
    if violations:
        print(f"CERTIFICATE VIOLATIONS: {violations} (see the *.violations.csv files)",
              file=sys.stderr)
    return 0 if bound_ok and not violations else 1


if __name__ == "__main__":
    sys.exit(main())

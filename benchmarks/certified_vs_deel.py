"""Certified robustness side by side: deel-torchlip's 1-Lipschitz dense baseline against
lipcert's certified ViT, on the same data, with the same wall-clock training budget.

1. **deel-torchlip baseline** (trained here, in-process): ``Flatten → SpectralLinear(784, 256)
   → GroupSort2 → SpectralLinear(256, 256) → GroupSort2 → SpectralLinear(256, 10)``, loss
   ``HKRMulticlassLoss(alpha=0.98, min_margin=1.0)`` (deel-lip calls it ``MulticlassHKR``),
   Adam at lr 1e-3 with batch 128 as in deel-torchlip's dense MNIST example ("Example 3: HKR
   classifier on MNIST dataset"; its Fashion-MNIST example also uses Adam at 1e-3). Epochs
   run until ``--budget-s`` is spent (checked after every batch, so the last epoch may be
   partial). The model is then ``vanilla_export()``-ed, each deel ``GroupSort2`` is replaced
   by a module calling ``lipcert.models.ops.group_sort2`` (the same function, as a custom op
   with a certified 1-Lipschitz rule; outputs are asserted identical on the whole test set),
   and the result is saved with ``torch.export.save`` as a ``.pt2`` with a dynamic batch
   dimension.
2. **lipcert ViT**: ``lipcert train --preset PRESET --out DIR --max-time-s BUDGET --steps
   10000000``: like deel's net, it trains until the budget is spent (its learning rate
   decays linearly to zero at the budget).
3. Both are certified with ``lipcert certify … --mode global --n N --eps …`` and attacked
   with ``lipcert attack … --attacks pgdl2`` (100 steps, 5 restarts, step 2.5·ε/steps as in
   lipcert's registry) with ``--certificate`` (the ε-grid audit) and ``--audit-radius``
   (every certified ball attacked at exactly its radius). These
   are subprocesses running the ``lipcert`` command line a user runs.

The dense net is 1-Lipschitz layer by layer, so the engine must certify it with a bound of
1 up to rounding (and deel's Björck tolerance); the script checks and prints that.

Output, under ``--out`` (a directory; every file written atomically):
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
import io
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lipcert.atomic import write_json_atomic, write_text_atomic
from lipcert.data import load_dataset
from lipcert.models.ops import group_sort2

DEEL_VERSION = "1.0.5"
DEFAULT_PRESETS = {"mnist": "vit-mnist-certified", "fashion-mnist": "vit-fashion-mnist-certified"}
DEFAULT_BUDGET_S = {"mnist": 300.0, "fashion-mnist": 900.0}
# deel's Björck orthonormalisation stops at a tolerance (eps_bjorck = 1e-3), so its float32
# weights have σ_max = 1 + O(1e-7) in practice; the certified bound may exceed 1 by that and
# by the engine's own rounding margin, nothing more.
BOUND_TOLERANCE = 1e-3
DEEL_NAME = "deel-dense"
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


def require_deel() -> Any:
    """Import ``deel.torchlip``, or exit non-zero saying how to install it."""
    try:
        from deel import torchlip
    except ImportError as err:
        sys.exit(f"error: this benchmark needs deel-torchlip ({err}); install the benchmark "
                 f"extra with `pip install -e .[bench]` (deel-torchlip=={DEEL_VERSION})")
    if torchlip.__version__ != DEEL_VERSION:
        print(f"warning: deel-torchlip {torchlip.__version__} is installed; this benchmark "
              f"pins {DEEL_VERSION}", file=sys.stderr)
    return torchlip


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


# --------------------------------------------------------------------------- deel baseline


def build_deel(torchlip: Any, in_features: int, num_classes: int) -> nn.Module:
    """deel-torchlip's 1-Lipschitz dense net: in-256-256-classes, SpectralLinear + GroupSort2."""
    return torchlip.Sequential(
        nn.Flatten(),
        torchlip.SpectralLinear(in_features, 256),
        torchlip.GroupSort2(),
        torchlip.SpectralLinear(256, 256),
        torchlip.GroupSort2(),
        torchlip.SpectralLinear(256, num_classes),
    )


@dataclass
class DeelTraining:
    """What the budgeted deel training did."""

    epochs: float
    steps: int
    wall_s: float
    log: list[dict[str, float]] = field(default_factory=list)


def train_deel(torchlip: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               num_classes: int, budget_s: float, batch_size: int, lr: float, seed: int
               ) -> DeelTraining:
    """Adam + multiclass HKR (alpha 0.98, min_margin 1.0) over shuffled epochs until
    ``budget_s`` seconds have passed (checked after every batch)."""
    loss_fn = torchlip.HKRMulticlassLoss(alpha=0.98, min_margin=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    batches_per_epoch = math.ceil(len(x) / batch_size)
    steps, log = 0, []
    model.train()
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < budget_s:
        order = torch.randperm(len(x), generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            xb, yb = x[idx], y[idx]
            out = model(xb)
            loss = loss_fn(out, nn.functional.one_hot(yb, num_classes))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((out.detach().argmax(1) == yb).sum())
            seen += len(idx)
            elapsed = time.perf_counter() - start
            if elapsed >= budget_s:
                break
        log.append({"epoch": round(steps / batches_per_epoch, 4), "step": steps,
                    "loss": loss_sum / seen, "train_acc": correct / seen, "elapsed_s": elapsed})
        print(f"  deel epoch {log[-1]['epoch']:.2f}: loss {log[-1]['loss']:.4f}, "
              f"train acc {log[-1]['train_acc']:.4f}, {elapsed:.0f}/{budget_s:.0f} s", flush=True)
    model.eval()
    return DeelTraining(steps / batches_per_epoch, steps, elapsed, log)


class GroupSort2Op(nn.Module):
    """deel's ``GroupSort2`` on (B, C) inputs, as lipcert's certified custom op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_sort2(x)


def export_deel(torchlip: Any, model: nn.Module, x_test: torch.Tensor, path: Path
                ) -> tuple[nn.Module, float]:
    """``vanilla_export()`` the trained net, swap every ``GroupSort2`` for ``GroupSort2Op``
    (asserting identical outputs on ``x_test``), and save a ``.pt2`` with a dynamic batch
    dimension. Returns the swapped module and the product of its layers' float64 σ_max."""
    vanilla = model.vanilla_export().eval()
    with torch.no_grad():
        before = vanilla(x_test)
        swapped = 0
        for name, child in list(vanilla.named_children()):
            if isinstance(child, torchlip.GroupSort2):
                setattr(vanilla, name, GroupSort2Op())
                swapped += 1
        if swapped != 2:
            raise RuntimeError(f"expected 2 GroupSort2 modules after vanilla_export, "
                               f"replaced {swapped}")
        after = vanilla(x_test)
        if not torch.equal(before, after):
            diff = float((before - after).abs().max())
            raise AssertionError(f"group_sort2 changed the outputs (max |Δ| {diff:.3g})")
        sigma = 1.0
        for module in vanilla.modules():
            if isinstance(module, nn.Linear):
                sigma *= float(torch.linalg.matrix_norm(module.weight.double(), ord=2))
    batch = torch.export.Dim("batch")
    program = torch.export.export(vanilla, (x_test[:2],), dynamic_shapes=({0: batch},))
    with torch.no_grad():  # the dynamic batch dimension really is dynamic
        if not torch.equal(program.module()(x_test[:5]), vanilla(x_test[:5])):
            raise AssertionError("the exported program's outputs differ from the module's")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.pt2")  # torch warns unless the name ends .pt2
    torch.export.save(program, tmp)
    os.replace(tmp, path)
    print(f"  outputs identical before and after the GroupSort2 swap on {len(x_test)} test "
          f"images; exported {path}", flush=True)
    return vanilla, sigma


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


def table_rows(results: list[ModelResult], eps: list[float]) -> tuple[list[str], list[list[str]]]:
    """The header and the formatted rows of the comparison table."""
    header = ["model", "clean", *(f"certified L2 @{e:g}" for e in eps),
              *(f"PGD-L2 robust @{e:g}" for e in eps), "violations", "train wall time (s)"]
    rows = [[r.name, f"{r.clean:.3f}", *(f"{r.certified[e]:.3f}" for e in eps),
             *(f"{r.robust[e]:.3f}" for e in eps), str(r.violations), f"{r.train_wall_s:.0f}"]
            for r in results]
    return header, rows


def format_text(header: list[str], rows: list[list[str]]) -> str:
    """The table as aligned plain text, for the terminal."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))

    return "\n".join([line(header), "-+-".join("-" * w for w in widths), *map(line, rows)])


def format_markdown(header: list[str], rows: list[list[str]], notes: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join([*out, "", *(f"- {n}" for n in notes)]) + "\n"


def format_csv(header: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


# --------------------------------------------------------------------------- main


def prepare_out(out: Path, overwrite: bool) -> None:
    """Create ``out``; an existing non-empty one is replaced only with ``--overwrite``, and
    only if it holds this script's output (never an unrelated directory)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            sys.exit(f"error: {out} exists and is not empty; pass --overwrite to replace it")
        if not any((out / marker).exists() for marker in (DEEL_NAME, "summary.json")):
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

    # 1. deel-torchlip baseline, trained here.
    print(f"[1/4] training the deel-torchlip dense baseline for {args.budget_s:.0f} s",
          flush=True)
    torch.manual_seed(args.seed)
    deel = build_deel(torchlip, channels * height * width, num_classes)
    training = train_deel(torchlip, deel, data.x_train, data.y_train, num_classes,
                          args.budget_s, args.batch_size, args.lr, args.seed)
    deel_dir = args.out / DEEL_NAME
    deel_pt2 = deel_dir / f"{DEEL_NAME}.pt2"
    _, sigma_product = export_deel(torchlip, deel, data.x_test, deel_pt2)
    write_text_atomic(deel_dir / "train_log.csv", format_csv(
        list(training.log[0]), [[f"{v:.6g}" for v in row.values()] for row in training.log]))

    # 2. lipcert ViT, trained by the CLI.
    vit_dir = args.out / args.preset
    train_args = ["train", "--preset", args.preset, "--out", str(vit_dir), "--seed",
                  str(args.seed), "--quiet", "--max-time-s", f"{args.budget_s:g}",
                  "--steps", str(UNBOUNDED_STEPS)]
    print(f"[2/4] training lipcert {args.preset} for {args.budget_s:.0f} s", flush=True)
    _, vit_process_s = run_lipcert(train_args, env)
    vit_config = json.loads((vit_dir / "config.json").read_text())
    vit_metrics = vit_config.get("metrics", {})
    vit_train_s = float(vit_metrics.get("train_time_s", vit_process_s))

    # 3-4. certify and attack both, through the CLI.
    print("[3/4] certifying and attacking the deel-torchlip baseline", flush=True)
    deel_cert, deel_attacks, deel_rc = certify_and_attack(deel_pt2, deel_dir, args, env)
    print(f"[4/4] certifying and attacking lipcert {args.preset}", flush=True)
    vit_cert, vit_attacks, vit_rc = certify_and_attack(vit_dir, vit_dir, args, env)

    results = [
        summarize(f"deel-torchlip dense {channels * height * width}-256-256-{num_classes}",
                  deel_cert, deel_attacks, training.wall_s, args.eps_list,
                  {"epochs": round(training.epochs, 3), "steps": training.steps,
                   "sigma_max_product_float64": sigma_product, "attack_exit_status": deel_rc}),
        summarize(f"lipcert {args.preset}", vit_cert, vit_attacks, vit_train_s, args.eps_list,
                  {"steps": vit_metrics.get("steps"), "val_acc": vit_metrics.get("val_acc"),
                   "train_process_wall_s": round(vit_process_s, 3),
                   "attack_exit_status": vit_rc}),
    ]
    deel_upper = results[0].lipschitz_upper
    bound_ok = deel_upper <= 1.0 + BOUND_TOLERANCE
    notes = [
        f"data: {args.dataset}, first {results[0].notes['n']} test images; certified accuracy "
        f"= fraction with radius r > eps, r = margin / (sqrt(2) L), global mode",
        f"PGD-L2: {args.steps} steps, {args.restarts} restarts, step 2.5*eps/{args.steps}; "
        "robust = per-sample worst case; violations = adversarial examples inside a "
        "certified radius (eps grid and per-sample radius audit)",
        f"deel-torchlip {torchlip.__version__}: certified Lipschitz upper bound "
        f"{deel_upper:.9g} (float64 product of the layers' sigma_max {sigma_product:.9g}); "
        f"{training.epochs:.2f} epochs, {training.steps} steps of batch {args.batch_size}, "
        f"Adam lr {args.lr:g}, HKRMulticlassLoss(alpha=0.98, min_margin=1.0)",
        f"lipcert {args.preset}: certified Lipschitz upper bound "
        f"{results[1].lipschitz_upper:.6g}; {vit_metrics.get('steps')} steps; train wall time "
        f"{vit_train_s:.0f} s (training loop), {vit_process_s:.0f} s (whole `lipcert train`)"
        + f"; --max-time-s {args.budget_s:g} --steps {UNBOUNDED_STEPS} (the budget ends "
        "training and its learning-rate decay)",
    ]
    header, rows = table_rows(results, args.eps_list)
    write_text_atomic(args.out / "table.csv", format_csv(header, rows))
    write_text_atomic(args.out / "table.md", format_markdown(header, rows, notes))
    write_json_atomic(args.out / "summary.json", {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": [{"name": r.name, "clean": r.clean,
                    "certified": {f"{e:g}": v for e, v in r.certified.items()},
                    "robust": {f"{e:g}": v for e, v in r.robust.items()},
                    "violations": r.violations, "train_wall_s": r.train_wall_s,
                    "lipschitz_upper": r.lipschitz_upper, **r.notes} for r in results],
        "deel_bound_check": {"upper": deel_upper, "tolerance": BOUND_TOLERANCE, "ok": bound_ok},
        "total_wall_s": time.perf_counter() - started,
    })

    print()
    print(format_text(header, rows))
    print()
    for note in notes:
        print(f"* {note}")
    print(f"deel bound check: certified upper bound {deel_upper:.9g} "
          f"{'<=' if bound_ok else '>'} 1 + {BOUND_TOLERANCE:g}: {'OK' if bound_ok else 'FAIL'}")
    print(f"written: {args.out / 'table.csv'}, {args.out / 'table.md'}, "
          f"{args.out / 'summary.json'}  (total {time.perf_counter() - started:.0f} s)")
    violations = sum(r.violations for r in results)
    if violations:
        print(f"CERTIFICATE VIOLATIONS: {violations} (see the *.violations.csv files)",
              file=sys.stderr)
    return 0 if bound_ok and not violations else 1


if __name__ == "__main__":
    sys.exit(main())

"""Overhead of the attack harness over a bare torchattacks loop.

Both attack the same model on the same 1,000 MNIST test images with PGD-L2 (50 steps,
ε = 0.5 by default), batch by batch, and count robust accuracy. The harness also computes
clean predictions, projects and measures every perturbation in float64, builds the
per-sample table and appends it to a CSV with fsync after each batch. Runs alternate
(bare, harness, bare, …) in one process; the medians are compared. The bar: ≤ 1.10×.

Two bare loops are timed: ``bare-all`` attacks every image (the usual loop), and
``bare-correct`` attacks only the correctly classified ones, as the harness (and
AutoAttack) do; the second does the same attack work as the harness, so its ratio is the
harness's own overhead.

    .venv/bin/python benchmarks/attack_overhead.py [--run RUN_DIR] [--repeats 3]
        [--steps 50] [--eps 0.5] [--batch-size 100] [--threads 1]

Without ``--run`` it trains ``vit-mnist-standard-tiny`` first (a few seconds).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torchattacks

from attacks import run_attacks
from attacks.harness import frozen
from lipcert.data import load_dataset


def bare_loop(model, x, y, eps: float, steps: int, step_fraction: float, batch_size: int,
              only_correct: bool) -> float:
    """A plain torchattacks evaluation loop; returns robust accuracy."""
    robust = 0
    with frozen(model):
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            if only_correct:
                with torch.no_grad():
                    keep = model(xb).argmax(1) == yb
                xb, yb = xb[keep], yb[keep]
            attack = torchattacks.PGDL2(model, eps=eps, alpha=step_fraction * eps, steps=steps)
            adv = attack(xb, yb)
            with torch.no_grad():
                robust += int((model(adv).argmax(1) == yb).sum())
    return robust / len(x)


def harness(model, x, y, eps: float, steps: int, step_fraction: float, batch_size: int,
            out: Path) -> float:
    df = run_attacks(model, x, y, ["pgdl2"], eps_l2=[eps], batch_size=batch_size,
                     params={"pgdl2": {"steps": steps, "step_fraction": step_fraction}},
                     output=out, overwrite=True)
    return 1.0 - float(df["success"].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="a ViT run directory")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eps", type=float, default=0.5)
    parser.add_argument("--step-fraction", type=float, default=2.5 / 50)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a busy 2-core host, torch's "
                        "default of 2 spin-waits and single runs vary by 2x; 0 = torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.run is not None:
        from lipcert.checkpoint import load_run

        model, _ = load_run(args.run)
        source = str(args.run)
    else:
        from lipcert.presets import preset
        from lipcert.train import train

        model = train(preset("vit-mnist-standard-tiny"), progress=False).model
        source = "vit-mnist-standard-tiny (trained now)"
    model.eval()
    data = load_dataset("mnist")
    x, y = data.x_test[:args.n], data.y_test[:args.n]
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    common = (args.eps, args.steps, args.step_fraction, args.batch_size)
    print(f"model: {source}; {len(x)} MNIST test images, clean accuracy {clean:.3f}; "
          f"PGD-L2 eps={args.eps}, {args.steps} steps, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")

    times: dict[str, list[float]] = {"bare-all": [], "bare-correct": [], "harness": []}
    accuracy: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "attacks.csv"
        runners = {
            "bare-all": lambda: bare_loop(model, x, y, *common, only_correct=False),
            "bare-correct": lambda: bare_loop(model, x, y, *common, only_correct=True),
            "harness": lambda: harness(model, x, y, *common, out=out),
        }
        bare_loop(model, x[:50], y[:50], *common, only_correct=False)  # warm-up
        for repeat in range(args.repeats):
            order = list(runners) if repeat % 2 == 0 else list(reversed(runners))
            for name in order:
                start = time.perf_counter()
                accuracy[name] = runners[name]()
                times[name].append(time.perf_counter() - start)
            print(f"repeat {repeat + 1}: " + ", ".join(
                f"{name} {times[name][-1]:.2f} s" for name in runners))
    median = {name: statistics.median(t) for name, t in times.items()}
    table = pd.DataFrame({"median (s)": median, "robust accuracy": accuracy})
    print(table.to_string(formatters={"median (s)": "{:.2f}".format,
                                      "robust accuracy": "{:.3f}".format}))
    same_work = median["harness"] / median["bare-correct"]
    usual = median["harness"] / median["bare-all"]
    print(f"ratio harness / bare-correct (same attack work): {same_work:.3f}x "
          f"({'within' if same_work <= 1.10 else 'ABOVE'} the 1.10x bar)")
    print(f"ratio harness / bare-all (the usual loop):       {usual:.3f}x")


if __name__ == "__main__":
    main()

"""Scale-out: ``lipcert attack`` and certify's exact weight norms at 1 vs 2 processes.

Side by side in one run, alternating so that both see the same machine load, every process
on one thread (``OMP_NUM_THREADS=1``), the two-process runs started by ``torchrun
--standalone --nproc-per-node 2`` (gloo):

* **attack**: ``lipcert attack`` with PGD-L2 (ε 1, 20 steps) and AutoAttack (L∞, ε 8/255,
  standard version) on the first N MNIST test images of a ``vit-mnist-standard-tiny`` run
  (trained here once, 100 steps). Wall time of the whole command (start-up and loading
  included). Target speed-up ≥ 1.7×. The two CSVs must be byte-identical. The CPU seconds
  of all its processes are printed too (torchrun's included): with 2 processes on a quiet
  2-core machine they are close to twice the wall time; much less means other jobs took
  cores, and the wall times (of 2 processes above all) say more about them than about
  lipcert.
* **norms**: certification (global mode, exact norms) of a GPT-2-medium-shaped ``.pt2``
  (``nn.TransformerEncoder``, ``--blocks`` pre-LN blocks (24), d 1,024, 16 heads, MLP
  4,096, unembedding to 50,257, random weights, one embedded sequence of ``--context``
  tokens), through ``certify_shared`` as ``lipcert certify`` runs it: with one sample, rank
  0 propagates and the other rank only helps with the weight norms. Time of that call on
  rank 0 after every rank has loaded the program (the norms, the helper's listing walk,
  the propagation and the layer table; start-up and loading excluded, and printed apart).
  Target speed-up ≥ 1.6×. The bounds (global, inf for this pre-LN model on its box, and
  every layer's) must be equal. Each rank's CPU seconds are printed too: on a machine whose
  cores other jobs share, a second process gets less than a core, and the CPU time shows
  how much work each rank was left with (the helper's wall time less its CPU time is how
  long it waited for rank 0's propagation and layer table at the end).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale_out.py [--n 1000] [--repeats 3]

and, for a quick look at the norms alone on a smaller model,

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale_out.py --only norms --blocks 8

``--run DIR`` attacks another run (the demo's ``vit-mnist-standard``, say) instead of the
tiny one. Writes ``summary.json`` under ``--out`` (default ``runs/scale-out``), reusing the
trained run and the exported ``.pt2`` found there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve()
LIPCERT = Path(sys.executable).with_name("lipcert")


class GPT2Medium(nn.Module):
    """Embedded sequence (B, T, 1024) → next-token logits at the last position (B, 50257),
    through ``blocks`` pre-LN blocks (24 in GPT-2-medium)."""

    def __init__(self, blocks: int = 24) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(1024, 16, 4096, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(1024)
        self.unembed = nn.Linear(1024, 50257, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.norm(self.blocks(x))[:, -1, :])


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _launch(procs: int, argv: list[str]) -> list[str]:
    """``argv`` (a Python script and its arguments) in one process, or under torchrun."""
    if procs == 1:
        return [sys.executable, *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={procs}", *argv]


def _prepare(out: Path, context: int, blocks: int, jobs: tuple[str, ...],
             run: Path | None) -> tuple[Path, Path]:
    if run is not None and "attack" in jobs and not (run / "model.safetensors").exists():
        raise SystemExit(f"--run {run}: no trained run there (model.safetensors)")
    run = run or out / "vit"
    pt2 = out / ("gpt2-medium.pt2" if (blocks, context) == (24, 16)
                 else f"gpt2-medium-{blocks}-blocks-{context}-tokens.pt2")
    if "attack" in jobs and not (run / "model.safetensors").exists():
        subprocess.run([str(LIPCERT), "train", "--preset", "vit-mnist-standard-tiny",
                        "--steps", "100", "--out", str(run), "--quiet"],
                       check=True, env=_env())
    if "norms" in jobs and not pt2.exists():
        torch.manual_seed(0)
        model = GPT2Medium(blocks).eval()
        example = torch.randn(2, context, 1024) * 0.5
        torch.export.save(torch.export.export(model, (example,)), pt2)
    return run, pt2


def _children_cpu_s() -> float:
    """CPU seconds of the finished child processes (and theirs: torchrun's workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _attack(procs: int, run: Path, n: int, csv: Path) -> tuple[float, float]:
    """Wall and CPU seconds of the whole ``lipcert attack`` command."""
    argv = [str(LIPCERT), "attack", str(run), "--data", "mnist", "-n", str(n),
            "--attacks", "pgdl2,autoattack", "--eps-l2", "1", "--eps-linf", "8/255",
            "--quiet", "--overwrite", "-o", str(csv)]
    started, cpu = time.perf_counter(), _children_cpu_s()
    subprocess.run(_launch(procs, argv), check=True, env=_env(), stdout=subprocess.DEVNULL)
    return time.perf_counter() - started, _children_cpu_s() - cpu


def _norms(procs: int, pt2: Path, context: int) -> dict[str, float]:
    argv = [str(HERE), "--norms-worker", str(pt2), "--context", str(context)]
    started = time.perf_counter()
    done = subprocess.run(_launch(procs, argv), check=True, env=_env(), capture_output=True,
                          text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    return {**json.loads(lines[-1]), "command_s": time.perf_counter() - started}


def norms_worker(pt2: Path, context: int) -> None:
    """One rank: load the program, wait for the others, certify as ``lipcert certify``
    does under torchrun (``certify_shared``), print rank 0's times and every rank's wall
    and CPU seconds."""
    from lipcert.certify_shards import certify_shared
    from lipcert.distributed import broadcast, gather, world
    from lipcert.loading import load_model

    started = time.perf_counter()
    program = load_model(str(pt2)).program
    torch.manual_seed(0)
    x = torch.randn(1, context, 1024) * 0.5
    label = program.module()(x.expand(2, -1, -1))[:1].argmax(1)
    load_s = time.perf_counter() - started
    broadcast(None)  # every rank has loaded
    started, cpu = time.perf_counter(), time.process_time()
    cert = certify_shared(program, x, label, indices=[0], eps=[1.0], domain=(-1e3, 1e3),
                          mode="global", method="exact")
    certify_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    ranks = gather([certify_s, cpu_s])
    if world().main:
        print(json.dumps({"certify_s": certify_s, "certify_cpu_s": cpu_s, "load_s": load_s,
                          "ranks_wall_cpu_s": ranks,
                          "global_bound_s": cert.timing_s["global_bound"],
                          "layers_s": cert.timing_s["layers"],
                          "lipschitz_upper": cert.lipschitz_upper,
                          "layers": [row.upper for row in cert.layers]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="MNIST images attacked")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--context", type=int, default=16, help="tokens of the sequence")
    parser.add_argument("--blocks", type=int, default=24,
                        help="blocks of the GPT-2-medium-shaped model (fewer: a quicker check)")
    parser.add_argument("--only", choices=("attack", "norms"), default=None,
                        help="run one of the two benchmarks")
    parser.add_argument("--run", type=Path, default=None,
                        help="attack this run directory instead of the tiny ViT trained "
                             "here (a larger model: more work per process)")
    parser.add_argument("--out", type=Path, default=Path("runs/scale-out"))
    parser.add_argument("--norms-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.norms_worker is not None:
        norms_worker(args.norms_worker, args.context)
        return
    jobs = ("attack", "norms") if args.only is None else (args.only,)
    args.out.mkdir(parents=True, exist_ok=True)
    run, pt2 = _prepare(args.out, args.context, args.blocks, jobs, args.run)
    attack_s: dict[int, list[float]] = {1: [], 2: []}
    attack_cpu_s: dict[int, list[float]] = {1: [], 2: []}
    norms: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for rep in range(args.repeats):
        for procs in (1, 2):
            line = f"run {rep + 1}, {procs} process(es):"
            if "attack" in jobs:
                csv = args.out / f"attacks-{procs}.csv"
                wall, cpu = _attack(procs, run, args.n, csv)
                attack_s[procs].append(wall)
                attack_cpu_s[procs].append(cpu)
                line += f" attack {wall:.1f} s (CPU {cpu:.1f} s)"
            if "norms" in jobs:
                r = _norms(procs, pt2, args.context)
                norms[procs].append(r)
                helpers = "".join(f", rank {k}: CPU {cpu:.1f} s of {wall:.1f} s"
                                  for k, (wall, cpu) in enumerate(r["ranks_wall_cpu_s"])
                                  if k > 0)
                line += (f" certify {r['certify_s']:.1f} s (rank 0: CPU {r['certify_cpu_s']:.1f}"
                         f" s, global bound {r['global_bound_s']:.1f} s, layer table "
                         f"{r['layers_s']:.1f} s{helpers}; command {r['command_s']:.1f} s)")
            print(line, flush=True)
        if "attack" in jobs and ((args.out / "attacks-1.csv").read_bytes()
                                 != (args.out / "attacks-2.csv").read_bytes()):
            raise SystemExit("the attack CSVs of 1 and 2 processes differ")
    summary: dict[str, object] = {"n": args.n, "repeats": args.repeats, "run": str(run),
                                  "context": args.context, "blocks": args.blocks}
    times = {"attack": attack_s,
             "norms": {p: [r["certify_s"] for r in rs] for p, rs in norms.items()}}
    cpu_times = {"attack": attack_cpu_s,  # all processes; norms: rank 0's
                 "norms": {p: [r["certify_cpu_s"] for r in rs] for p, rs in norms.items()}}
    for what in jobs:
        one, two = statistics.median(times[what][1]), statistics.median(times[what][2])
        summary[what] = {"median_1_s": one, "median_2_s": two, "speed_up": one / two,
                         "median_cpu_1_s": statistics.median(cpu_times[what][1]),
                         "median_cpu_2_s": statistics.median(cpu_times[what][2])}
        print(f"{what}: median {one:.1f} s with 1 process, {two:.1f} s with 2: "
              f"speed-up {one / two:.2f}x")
    if "norms" in jobs:
        # the global bound of a pre-LN model on this box is inf: compare every layer's too
        bounds = {json.dumps([r["lipschitz_upper"], r["layers"]]) for runs in norms.values()
                  for r in runs}
        if len(bounds) != 1:
            raise SystemExit("the certified bounds of 1 and 2 processes differ")
        summary["lipschitz_upper"], layers = json.loads(bounds.pop())
        summary["layer_bounds"] = len(layers)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

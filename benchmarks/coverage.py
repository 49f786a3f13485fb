"""Which models people already have lipcert certifies, how tightly and how fast.

For every architecture of ``tests/third_party_zoo.py`` (Hugging Face ViT, DeiT, Swin,
ConvNeXt, ResNet, BERT, DistilBERT, GPT-2, a Llama-style decoder, all with random weights
from tiny configs; deel-torchlip's dense and convolutional networks): export with
``torch.export`` (dynamic batch), ``torch.export.save``, then ``lipcert certify`` in-process
on the model's own samples (``--inputs``; labels = its predictions), globally (pixels on
``--domain box:0,1``, text on ``--embedding-table``), locally and in margin mode. One row per
model:

* ``ops``: distinct operators in the exported graph;
* ``global bound`` and its wall time; ``local median r``: the median certified L2 radius
  over the samples, and its wall time;
* ``max Jacobian norm``: the largest exact Jacobian spectral norm measured (float64, at the
  samples and after a few steps of gradient ascent inside the set each bound covers);
* ``margin median r`` and its wall time: margin mode (margin-gradient bounds with symbolic
  remainders), or the one-line reason it refuses the model;
* ``sound``: ``yes`` if no measured norm exceeds the bound that covers it (global: the
  global bound; local: each sample's L(x, r) on its certified ball) and gradient descent on
  the margins finds no other label inside any margin-mode radius.

A model lipcert cannot certify gets its one-line error in place of the numbers.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/coverage.py [--out runs/coverage]
        [--models vit,gpt2,...]

Writes ``coverage.csv`` and ``coverage.md`` under ``--out`` and prints the table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # shared hosts: see certified_vs_deel.py

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from third_party_zoo import ARCHS, Prepared, largest_jacobian_norm, prepare, smallest_margin

from lipcert.atomic import write_text_atomic
from lipcert.cli import main as lipcert

F64 = torch.float64


def certify(p: Prepared, mode: str, out: Path) -> tuple[dict | None, float, str]:
    """``lipcert certify`` in-process: (JSON or None, wall seconds, error line or "")."""
    args = ["certify", str(p.pt2), "--inputs", str(p.pt2.parent / "inputs.safetensors"),
            *p.domain_args, "--mode", mode, "--no-lower", "-o", str(out)]
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = lipcert(args)
    wall = time.perf_counter() - start
    if rc != 0:
        return None, wall, (err.getvalue().strip().splitlines() or [f"exit {rc}"])[-1]
    return json.loads(out.read_text()), wall, ""


def row(name: str, folder: Path) -> dict[str, str]:
    """One model's row of the table (module docstring)."""
    p = prepare(name, folder)
    program = torch.export.load(p.pt2)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    out = {"model": name, "ops": str(len(ops))}
    glob, t_glob, err = certify(p, "global", folder / "global.json")
    if glob is None:
        return {**out, "global bound": err, "global s": f"{t_glob:.1f}", "local median r": "",
                "local s": "", "margin median r": "", "margin s": "",
                "max Jacobian norm": "", "sound": ""}
    upper = float(glob["lipschitz"]["upper"])
    centre, searched = largest_jacobian_norm(p, p.x, None)
    measured = float(torch.maximum(centre, searched).max())
    sound = measured <= upper * (1 + 1e-6)
    local, t_loc, err = certify(p, "local", folder / "local.json")
    if local is None:
        median = err
    else:
        samples = local["samples"]
        radii = torch.tensor([float(s["radius_l2"]) for s in samples], dtype=F64)
        lips = torch.tensor([float(s["lipschitz"]) for s in samples], dtype=F64)
        median = f"{statistics.median(radii.tolist()):.4g}"
        centre, searched = largest_jacobian_norm(p, p.x, radii)
        local_max = torch.maximum(centre, searched)
        sound = sound and bool((local_max <= lips * (1 + 1e-6)).all())
        measured = max(measured, float(local_max.max()))
    margin, t_margin, err = certify(p, "margin", folder / "margin.json")
    if margin is None:
        margin_median = err
    else:
        radii = torch.tensor([float(s["radius_l2"]) for s in margin["samples"]], dtype=F64)
        margin_median = f"{statistics.median(radii.tolist()):.4g}"
        worst = smallest_margin(p, radii)
        sound = sound and bool((worst[radii > 0] > 0).all())
    return {**out, "global bound": f"{upper:.4g}", "global s": f"{t_glob:.1f}",
            "local median r": median, "local s": f"{t_loc:.1f}",
            "margin median r": margin_median, "margin s": f"{t_margin:.1f}",
            "max Jacobian norm": f"{measured:.4g}", "sound": "yes" if sound else "NO"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/coverage"))
    parser.add_argument("--models", default=",".join(ARCHS),
                        help="comma-separated, from: " + ", ".join(ARCHS))
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in ARCHS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(ARCHS)}")
    torch.set_num_threads(1)
    rows = []
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(row(name, Path(tmp)))
        print(" | ".join(rows[-1].values()), flush=True)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "coverage.csv", table.to_csv(index=False, lineterminator="\n"))
    markdown = table.to_markdown(index=False, disable_numparse=True)
    write_text_atomic(args.out / "coverage.md", markdown + "\n")
    print()
    print(markdown)
    unsound = [r["model"] for r in rows if r["sound"] == "NO"]
    if unsound:
        print(f"UNSOUND: {', '.join(unsound)}", file=sys.stderr)
    return 1 if unsound else 0


if __name__ == "__main__":
    sys.exit(main())

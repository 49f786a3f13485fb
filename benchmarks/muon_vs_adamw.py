"""Muon versus AdamW on ``vit-mnist-lipschitz`` under the same constraint and step budget.

The paper's claim: with Muon, a constrained model reaches the same accuracy at a lower
Lipschitz bound. Each row trains one model; all rows run in this one process, side by side.

    .venv/bin/python benchmarks/muon_vs_adamw.py [--steps 3000] [--w-max 1,2,4]
"""

from __future__ import annotations

import argparse

import pandas as pd

from lipcert.presets import preset
from lipcert.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vit-mnist-lipschitz")
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--w-max", default="1,2,4", help="comma-separated w_max values")
    parser.add_argument("--constraint", default=None, help="default: the preset's")
    args = parser.parse_args()

    rows = []
    for w_max in (float(w) for w in args.w_max.split(",")):
        for optimizer in ("muon", "adamw"):
            overrides = {"optimizer": optimizer, "w_max": w_max}
            if args.steps:
                overrides["steps"] = args.steps
            if args.constraint:
                overrides["constraint"] = args.constraint
            config = preset(args.preset, **overrides)
            result = train(config, progress=False)
            m = result.metrics
            rows.append({
                "w_max": w_max, "optimizer": optimizer, "constraint": config.constraint,
                "steps": config.steps, "val_acc": round(m["val_acc"], 4),
                "lipschitz_bound": m["lipschitz_paper_formula"],
                "train_s": round(m["train_time_s"], 1),
            })
            print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1),
                  flush=True)
    print()
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()

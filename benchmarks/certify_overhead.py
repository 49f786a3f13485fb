"""Per-sample global certification of MNIST test images against plain inference.

Issue 3's bar: certifying 1,000 images globally costs at most 1.5× plain inference on the
same batch. Measured side by side in one process, medians over ``--repeats`` rounds, each
round timing every row once (interleaved, so that load from other processes on a shared
machine falls on all rows alike):

* plain inference of the exported program (``model.pt2``) and of the eager module;
* ``certify`` of the exported program (the graph already exists);
* ``certify`` of the eager module, which pays for ``torch.export`` once per call;
* the phases of ``certify`` of the program (its ``timing_s``): the forward pass for the
  margins, the global bound propagation, the per-layer table.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/certify_overhead.py RUN_DIR \\
        [--n 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pandas as pd
import torch

from lipcert.certificate import certify
from lipcert.data import load_dataset
from lipcert.loading import load_model


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a ViT run directory (with model.pt2)")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    program = load_model(f"{args.run}/model.pt2")
    eager = load_model(args.run).module
    data = load_dataset(program.dataset or "mnist")
    x, y = data.x_test[: args.n], data.y_test[: args.n]

    def infer(module: torch.nn.Module) -> None:
        with torch.no_grad():
            module(x)

    calls: dict[str, Callable[[], object]] = {
        "inference (.pt2 program)": lambda: infer(program.module),
        "inference (eager module)": lambda: infer(eager),
        "certify (.pt2 program)": lambda: certify(program.program, x, y),
        "certify (eager module, exports)": lambda: certify(eager, x, y),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    phases: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, fn in calls.items():
            seconds, out = _timed(fn)
            times[name].append(seconds)
            if name == "certify (.pt2 program)":
                for phase, t in out.timing_s.items():
                    phases.setdefault(phase, []).append(t)
    base = statistics.median(times["inference (.pt2 program)"])
    print(f"{len(y)} images, torch threads {torch.get_num_threads()}, medians of {args.repeats}")
    table = pd.DataFrame({"median (s)": [statistics.median(v) for v in times.values()]},
                         index=pd.Index(list(times), name="call"))
    table["vs .pt2 inference"] = table["median (s)"] / base
    print(table.to_string(formatters={"median (s)": "{:.3f}".format,
                                      "vs .pt2 inference": "{:.2f}x".format}))
    print("phases of certify (.pt2 program): " + ", ".join(
        f"{phase} {statistics.median(values):.3f} s" for phase, values in phases.items()))


if __name__ == "__main__":
    main()

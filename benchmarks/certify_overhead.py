"""Per-sample global certification of MNIST test images against plain inference.

Issue 3's bar: certifying 1,000 images globally costs at most 1.5× plain inference on the
same batch. Measured side by side in one process, medians over ``--repeats``:

* plain inference of the exported program (``model.pt2``) and of the eager module;
* ``certify`` of the exported program (the graph already exists);
* ``certify`` of the eager module, which pays for ``torch.export`` once per call.

    .venv/bin/python benchmarks/certify_overhead.py RUN_DIR [--n 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lipcert.certificate import certify
from lipcert.data import load_dataset
from lipcert.loading import load_model


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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

    rows = {
        "inference (.pt2 program)": _median_time(lambda: infer(program.module), args.repeats),
        "inference (eager module)": _median_time(lambda: infer(eager), args.repeats),
        "certify (.pt2 program)": _median_time(lambda: certify(program.program, x, y),
                                               args.repeats),
        "certify (eager module, exports)": _median_time(lambda: certify(eager, x, y),
                                                        args.repeats),
    }
    base = rows["inference (.pt2 program)"]
    print(f"{len(y)} images, torch threads {torch.get_num_threads()}, medians of {args.repeats}")
    for name, seconds in rows.items():
        print(f"{name:<34} {seconds:8.3f} s   {seconds / base:5.2f}x")


if __name__ == "__main__":
    main()

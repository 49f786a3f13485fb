"""Certify a GPT-2-small-shaped model from a ``.pt2`` file, against the naive baseline.

Issue 3's speed bar: loading the ``.pt2``, building the graph, propagating bounds and
computing every certified weight norm must take no longer than exact float64 SVD of every
weight matrix on its own. The model: 12 pre-LN blocks (``nn.TransformerEncoder``), d 768,
12 heads, MLP 3,072, vocabulary 50,257 (the unembedding), random weights, certified in
embedding space on the logits at the last position. Both are measured in this one run,
alternating, so they see the same machine load.

The baseline is the faster of two configurations of ``torch.linalg.svdvals``: with torch's
default thread count and on one thread (on a busy machine many-threaded LAPACK can be
several times slower than one thread; the default-thread pass stops early once it is
slower than the one-thread pass, since it can no longer be the faster one). lipcert runs as
a user runs it, with the default thread count. Wall-clock seconds decide; CPU seconds
(all threads of the process) are printed alongside.

Accuracy bars: every weight matrix's certified norm (``lipcert.spectral.exact``) and every
per-layer ``Linear`` bound of the certificate within 0.1% of the exact spectral norm.

    .venv/bin/python benchmarks/certify_gpt2_speed.py [--context 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lipcert import spectral
from lipcert.certificate import certify
from lipcert.loading import load_model
from lipcert.threads import one_thread


class GPT2Small(nn.Module):
    """Embedded sequence (B, T, 768) → next-token logits at the last position (B, 50257)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(768)
        self.unembed = nn.Linear(768, 50257, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.norm(self.blocks(x))[:, -1, :])


def _matrices(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in model.parameters() if p.dim() == 2]


def svd_pass(model: nn.Module, limit: float = float("inf")) -> tuple[float, float, bool]:
    """(wall s, CPU s, finished) of float64 ``svdvals`` of every weight matrix; stops after
    the first matrix that brings the wall time past ``limit``."""
    wall, cpu = time.perf_counter(), time.process_time()
    for w in _matrices(model):
        torch.linalg.svdvals(w.double())
        if time.perf_counter() - wall > limit:
            return time.perf_counter() - wall, time.process_time() - cpu, False
    return time.perf_counter() - wall, time.process_time() - cpu, True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", choices=("exact", "gram"), default="exact")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT2Small().eval()
    x = torch.randn(1, args.context, 768) * 0.5
    label = model(x).argmax(1)
    baseline: list[float] = []
    lipcert_times: list[float] = []
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpt2.pt2"
        program = torch.export.export(model, (x.expand(2, -1, -1).clone(),))
        torch.export.save(program, path)
        for rep in range(args.repeats):
            with one_thread():
                one_wall, one_cpu, _ = svd_pass(model)
            many_wall, many_cpu, done = svd_pass(model, limit=one_wall)
            baseline.append(min(one_wall, many_wall) if done else one_wall)
            wall, cpu = time.perf_counter(), time.process_time()
            loaded = load_model(str(path))
            cert = certify(loaded.program, x, label,
                           domain=(-1e3, 1e3), mode="global", method=args.method)
            lipcert_times.append(time.perf_counter() - wall)
            lines.append(
                f"  run {rep + 1}: SVD 1 thread {one_wall:.2f} s (CPU {one_cpu:.2f}), "
                f"{torch.get_num_threads()} threads "
                + (f"{many_wall:.2f} s (CPU {many_cpu:.2f})" if done
                   else f"> {many_wall:.2f} s (stopped)")
                + f" | lipcert {lipcert_times[-1]:.2f} s (CPU {time.process_time() - cpu:.2f})"
            )
    exact = {n.rsplit(".", 1)[0]: torch.linalg.matrix_norm(p.detach().double(), 2).item()
             for n, p in model.named_parameters() if p.dim() == 2}
    worst_layer = 0.0
    for row in cert.layers:
        if row.kind_of_layer == "Linear" and row.name in exact:
            worst_layer = max(worst_layer, abs(row.upper / exact[row.name] - 1))
    worst_norm = 0.0
    for n, p in model.named_parameters():
        if p.dim() == 2:
            bound = spectral.exact(p).value
            true = exact[n.rsplit(".", 1)[0]]
            assert bound >= true, (n, bound, true)
            worst_norm = max(worst_norm, bound / true - 1)
    b, c = statistics.median(baseline), statistics.median(lipcert_times)
    print("\n".join(lines))
    print(f"exact float64 SVD of every weight matrix (faster configuration): median {b:.2f} s")
    print(f"lipcert load + graph + propagation + norms: median {c:.2f} s")
    print(f"ratio lipcert / SVD baseline: {c / b:.2f} (bar <= 1.0)")
    print(f"largest relative gap of a weight matrix's certified norm vs exact: {worst_norm:.2e}"
          " (bar <= 1e-3; every one an upper bound)")
    print(f"largest relative gap of a per-layer Linear bound vs exact: {worst_layer:.2e}"
          " (bar <= 1e-3)")
    print(f"timing breakdown of the last run: {cert.timing_s}")


if __name__ == "__main__":
    main()

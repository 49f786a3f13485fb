"""Certify a GPT-2-small-shaped model from a ``.pt2`` file, against the naive baseline.

Issue 3's speed bar: loading the ``.pt2``, building the graph, propagating bounds and
computing every certified weight norm must take no longer than exact float64 SVD of every
weight matrix on its own. The model: 12 pre-LN blocks (``nn.TransformerEncoder``), d 768,
12 heads, MLP 3,072, vocabulary 50,257 (the unembedding), random weights, certified in
embedding space on the logits at the last position. Both are measured in this one run; the
per-layer norms are also compared with the exact spectral norms (bar: within 0.1%).

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

from lipcert.certificate import certify
from lipcert.loading import load_model


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


def svd_baseline(model: nn.Module) -> float:
    start = time.perf_counter()
    for p in model.parameters():
        if p.dim() == 2:
            torch.linalg.svdvals(p.detach().double())
    return time.perf_counter() - start


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
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpt2.pt2"
        program = torch.export.export(model, (x.expand(2, -1, -1).clone(),))
        torch.export.save(program, path)
        baseline, lipcert_times = [], []
        for _ in range(args.repeats):
            baseline.append(svd_baseline(model))
            start = time.perf_counter()
            loaded = load_model(str(path))
            cert = certify(loaded.program, x, label,
                           domain=(-1e3, 1e3), mode="global", method=args.method)
            lipcert_times.append(time.perf_counter() - start)
        exact = {n.rsplit(".", 1)[0]: torch.linalg.matrix_norm(p.detach().double(), 2).item()
                 for n, p in model.named_parameters() if p.dim() == 2}
        worst = 0.0
        for row in cert.layers:
            if row.kind_of_layer == "Linear" and row.name in exact:
                worst = max(worst, abs(row.upper / exact[row.name] - 1))
    b, c = statistics.median(baseline), statistics.median(lipcert_times)
    print(f"exact float64 SVD of every weight matrix: median {b:.2f} s {baseline}")
    print(f"lipcert load + graph + propagation + norms: median {c:.2f} s {lipcert_times}")
    print(f"ratio lipcert / SVD baseline: {c / b:.2f} (bar <= 1.0)")
    print(f"largest relative gap of a per-layer Linear norm vs exact: {worst:.2e} (bar <= 1e-3)")
    print(f"timing breakdown of the last run: {cert.timing_s}")


if __name__ == "__main__":
    main()

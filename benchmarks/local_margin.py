"""Margin-gradient local certificates (``lipcert.bounds.backward``) against the existing
local mode, on the transformers whose local radii were ~1e-7 and ~1e-3.

Models: ``vit-mnist-standard`` and ``vit-mnist-lipschitz`` (preset defaults, seed 0; trained
into ``--runs`` if missing), and an ``nn.TransformerEncoder`` pre-LN classifier
(``norm_first=True``) on 7×7 MNIST patches, trained for ``--te-budget-s`` seconds here.

On the first ``--n`` MNIST test images, per model: clean accuracy; certified accuracy at
L2 ε ∈ {0.01, 0.02, 0.05, 0.1} and the median certified radius of the existing local mode
(``lipcert.certificate.certify(mode="local")``) and of ``margin_radii`` without
(``wrapped``) and with symbolic remainders (``new``, the default); seconds per sample
of each on one thread; and the median smallest adversarial L2 perturbation found by
DeepFool and PGD-L2 (``attacks.minimal``), with the ratio to the median new radius; and
the radius audit of the new radii (``attacks.audit.radius_audit``: PGD-L2 inside each
certified ball, 100 steps, 5 restarts), whose violations must be 0. Then a
scaling sweep over width and depth (standard ViTs briefly trained, ``--sweep-n`` images):
seconds per sample and median radius. Writes ``table.csv``, ``table.md``, ``sweep.csv`` and
``summary.json`` under ``--out``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/local_margin.py --n 200

``--models standard,lipschitz,encoder`` picks a subset (to run them in parallel processes,
each with its own ``--out``); ``--sweep-n 0`` skips the sweep.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

import lipcert
from attacks.audit import radius_audit
from attacks.minimal import minimal_perturbation
from lipcert.bounds.backward import margin_radii
from lipcert.certificate import certify
from lipcert.checkpoint import save_run
from lipcert.data import load_dataset
from lipcert.models import export_model
from lipcert.presets import preset
from lipcert.train import train

EPS = (0.01, 0.02, 0.05, 0.1)


class EncoderClassifier(nn.Module):
    """Patches → linear embedding + positions → pre-LN nn.TransformerEncoder → mean → head."""

    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(49, d)
        self.pos = nn.Parameter(torch.randn(16, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        p = x.reshape(b, 1, 4, 7, 4, 7).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, 49)
        return self.head(self.norm(self.encoder(self.embed(p) + self.pos)).mean(1))


def train_encoder(budget_s: float, seed: int = 0) -> nn.Module:
    """AdamW (lr 3e-3, batch 128) on the MNIST training split until the budget is spent."""
    torch.manual_seed(seed)
    data = load_dataset("mnist")
    model = EncoderClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    while time.perf_counter() - start < budget_s:
        idx = torch.randint(len(data.x_train), (128,), generator=g)
        loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def preset_model(name: str, run_dir: Path) -> nn.Module:
    if not (run_dir / "model.safetensors").exists():
        save_run(train(preset(name, seed=0), progress=False), run_dir)
    return lipcert.load(run_dir).eval()


def _accuracy(radius: Tensor) -> dict[str, float]:
    return {f"@{e}": float((radius > e).double().mean()) for e in EPS}


def measure(name: str, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, object]:
    torch.set_num_threads(1)
    program = export_model(model) if hasattr(model, "config") else torch.export.export(
        model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).double().mean())
    t = time.perf_counter()
    old = certify(program, x, y, mode="local", eps=EPS)
    t_old = (time.perf_counter() - t) / len(x)
    r_old = torch.tensor([s.radius_l2 for s in old.samples], dtype=torch.float64)
    t = time.perf_counter()
    wrapped = margin_radii(program, x, y, symbolic=False)
    t_wrapped = (time.perf_counter() - t) / len(x)
    t = time.perf_counter()
    new = margin_radii(program, x, y)
    t_new = (time.perf_counter() - t) / len(x)
    attack = minimal_perturbation(model, x, y, methods=("deepfool", "pgdl2"))
    audit = radius_audit(model, x, y, new.radius, model_name=name, steps=100, restarts=5)
    correct = new.pred == y
    adv = torch.tensor(attack["radius_l2"].to_numpy(), dtype=torch.float64)[correct]
    med_new = float(new.radius[correct].median()) if bool(correct.any()) else math.nan
    row: dict[str, object] = {"model": name, "clean": clean}
    row.update({f"old {k}": v for k, v in _accuracy(r_old).items()})
    row.update({f"wrapped {k}": v for k, v in _accuracy(wrapped.radius).items()})
    row.update({f"new {k}": v for k, v in _accuracy(new.radius).items()})
    row.update({
        "old median r": float(r_old[correct].median()) if bool(correct.any()) else math.nan,
        "wrapped median r": float(wrapped.radius[correct].median()) if bool(correct.any())
        else math.nan,
        "new median r": med_new,
        "median linear estimate m/|grad m|": float((new.margin / new.gradient_bound)[correct]
                                                   .median()),
        "median min adv l2": float(adv.nanmedian()),
        "adv / new": float(adv.nanmedian()) / med_new if med_new > 0 else math.inf,
        "old s/sample": t_old,
        "wrapped s/sample": t_wrapped,
        "new s/sample": t_new,
        "audited": len(audit),
        "audit violations": int(audit["violation"].sum()),
    })
    return row


def sweep(x: Tensor, y: Tensor, steps: int) -> pd.DataFrame:
    rows = []
    for d, layers in ((32, 2), (64, 2), (128, 2), (64, 1), (64, 4)):
        torch.manual_seed(0)
        cfg = preset("vit-mnist-standard", d_model=d, n_layers=layers, steps=steps, seed=0)
        model = train(cfg, progress=False).model.eval()
        torch.set_num_threads(1)
        t = time.perf_counter()
        res = margin_radii(export_model(model), x, y)
        rows.append({"d_model": d, "n_layers": layers,
                     "s/sample": (time.perf_counter() - t) / len(x),
                     "median r": float(res.radius.median()),
                     "median m/|grad m|": float((res.margin / res.gradient_bound).median())})
    return pd.DataFrame(rows)


MODELS: dict[str, tuple[str, Callable[[argparse.Namespace], nn.Module]]] = {
    "standard": ("vit-mnist-standard",
                 lambda a: preset_model("vit-mnist-standard", a.runs / "standard")),
    "lipschitz": ("vit-mnist-lipschitz",
                  lambda a: preset_model("vit-mnist-lipschitz", a.runs / "lipschitz")),
    "encoder": ("TransformerEncoder pre-LN", lambda a: train_encoder(a.te_budget_s)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--runs", type=Path, default=Path("runs/local-margin"))
    parser.add_argument("--te-budget-s", type=float, default=60.0)
    parser.add_argument("--sweep-n", type=int, default=16)
    parser.add_argument("--sweep-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("runs/local-margin"))
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {', '.join(MODELS)}")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("mnist")
    x, y = data.x_test[:args.n], data.y_test[:args.n]
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}")
    rows = []
    for key in chosen:
        name, make = MODELS[key]
        rows.append(measure(name, make(args), x, y))
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "table.csv", index=False)
    (args.out / "table.md").write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")
    print(table.to_markdown(index=False, floatfmt=".4g"))
    if args.sweep_n < 1:
        return
    scaling = sweep(x[:args.sweep_n], y[:args.sweep_n], args.sweep_steps)
    scaling.to_csv(args.out / "sweep.csv", index=False)
    print(scaling.to_markdown(index=False, floatfmt=".4g"))
    summary = {"n": args.n, "eps": EPS, "models": table.to_dict(orient="records"),
               "sweep": scaling.to_dict(orient="records")}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

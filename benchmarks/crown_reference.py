"""The field's linear-relaxation verifier (auto_LiRPA's CROWN) beside lipcert's margin mode,
on the same trained ViTs and the same images.

For each run directory given (a lipcert ViT run: the demo's ``vit-mnist-standard`` and
``vit-mnist-lipschitz``), on the first ``--n`` MNIST test images that the model classifies
correctly: lipcert's margin-mode radius (``margin_radii``), the smallest adversarial L2
perturbation that DeepFool and PGD-L2 find (``attacks.minimal``), and CROWN's certified
radius, searched from lipcert's radius: CROWN's lower bound of every margin z_y − z_j over
B₂(x, ε) ∩ [0, 1]^784 is computed at ε = lipcert's radius; from there ε grows (if it
certifies) or shrinks (if not) by 4× per step, up to 5 steps, until the answer changes,
then ``--midpoints`` geometric bisection steps (default 1) narrow the bracket to 2× (√2×
with 2). Each row gives the bracket [lo, hi]:
CROWN certifies lo and does not certify hi. Writes ``crown.csv`` and ``crown.md`` under
``--out``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/crown_reference.py \\
        runs/demo/vit-mnist-standard runs/demo/vit-mnist-lipschitz --n 5

``--at-ours`` replaces the search by one evaluation at lipcert's radius (the bracket is then
[radius, ∞) or [0, radius]): whether CROWN certifies what lipcert certifies, at a sixth of
the cost. CROWN's answer at a radius does not depend on where a search started, so brackets
from several runs combine (the largest certified lo, the smallest failing hi).

``--widths RADIUS`` prints instead, for test image ``--image``, the median interval width of
each activation over the ball in lipcert's forward intervals and in CROWN's intermediate
bounds: where the margin mode loses its radius.

auto_LiRPA's only PyPI release (0.3, 2022) pins torch < 1.13, which has no wheel for this
Python, so this script downloads that wheel (and its dependency appdirs) with pip into
``--cache``, unpacks it, and applies the five compatibility edits of ``COMPAT_EDITS`` for
torch 2.x and numpy 2 (renamed imports and signatures only; each must match exactly once,
or the script stops). None of its bounding code is changed.

CROWN needs the model in ops its graph parser knows: ``CrownViT`` rebuilds lipcert's ViT
from the same modules with explicit attention (exp, sum, reciprocal: auto_LiRPA's softmax
export goes through a max it cannot bound), LayerNorm with 1/√v written as exp(−½·log v)
(its Sqrt has no linear relaxation in 0.3), the token ball as x·(1 − relu(1 − R/‖x‖)), and
GELU in its tanh form (0.3 has no GELU; the exact form has no erf rule). The tanh form moves
the logits by at most ~5e-3 on these models (printed per model), against margins of order
1 to 10, so both verifiers certify essentially the same function.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

import lipcert
from attacks.minimal import minimal_perturbation
from lipcert.bounds.backward import margin_radii
from lipcert.data import load_dataset
from lipcert.models import export_model

WHEELS = ("auto-lirpa==0.3", "appdirs==1.4.4")

# (file inside the unpacked wheel, text of auto_LiRPA 0.3, replacement for torch 2.x/numpy 2)
COMPAT_EDITS = (
    ("auto_LiRPA/operators/base.py", "from numpy.lib.arraysetops import isin",
     "from numpy import isin"),
    ("auto_LiRPA/bound_general.py", "torch._six.string_classes", "str"),
    ("auto_LiRPA/bound_general.py",
     "def _named_members(self, get_members_fn, prefix='', recurse=True):",
     "def _named_members(self, get_members_fn, prefix='', recurse=True,"
     " remove_duplicate=True):"),
    ("auto_LiRPA/parse_graph.py",
     "from torch.onnx.symbolic_helper import _set_opset_version",
     "from torch.onnx._internal.torchscript_exporter._globals import GLOBALS\n\n\n"
     "def _set_opset_version(v):\n    GLOBALS.export_onnx_opset_version = v"),
    ("auto_LiRPA/parse_graph.py", "attrs = {k: n[k] for k in n.attributeNames()}",
     "attrs = {k: getattr(n, n.kindOf(k))(k) for k in n.attributeNames()}"),
)


def install_auto_lirpa(cache: Path) -> None:
    """Download, unpack and edit auto_LiRPA 0.3 into ``cache`` once (in a temporary folder
    renamed into place, so that processes started together do not collide); put it on
    sys.path."""
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
            staging = Path(tmp) / "auto_lirpa"
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                            str(staging / "wheels"), *WHEELS], check=True)
            for wheel in sorted((staging / "wheels").glob("*.whl")):
                with zipfile.ZipFile(wheel) as archive:
                    archive.extractall(staging)
            for name, old, new in COMPAT_EDITS:
                path = staging / name
                text = path.read_text()
                if text.count(old) != 1:
                    raise SystemExit(f"{name}: expected one {old!r}; not auto_LiRPA 0.3?")
                path.write_text(text.replace(old, new))
            with contextlib.suppress(OSError):  # another process got there first
                staging.rename(cache)
    sys.path.insert(0, str(cache))


def _rsqrt(v: Tensor) -> Tensor:
    return torch.exp(-0.5 * torch.log(v))


def _layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    c = x - x.mean(-1, keepdim=True)
    return c * _rsqrt((c * c).mean(-1, keepdim=True) + norm.eps) * norm.weight + norm.bias


def _gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def _token_ball(x: Tensor, radius: float) -> Tensor:
    """x·min(1, R/‖x‖) = x·(1 − relu(1 − R/‖x‖)), per token."""
    return x * (1 - torch.relu(1 - radius * _rsqrt((x * x).sum(-1, keepdim=True))))


class CrownViT(nn.Module):
    """lipcert's ViT (both families, same modules and weights) in ops auto_LiRPA 0.3 bounds;
    ``exact_gelu=True`` gives lipcert's function exactly (for the printed check)."""

    def __init__(self, vit: nn.Module, exact_gelu: bool = False) -> None:
        super().__init__()
        self.vit, self.exact_gelu = vit, exact_gelu

    def forward(self, images: Tensor) -> Tensor:
        v, c, b = self.vit, self.vit.config, images.shape[0]
        g, p = c.image_size // c.patch_size, c.patch_size
        tokens = g * g
        x = images.reshape(b, c.channels, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        x = v.patch_embed(x.reshape(b, tokens, -1)) + v.pos_embed
        standard = c.family == "standard"
        if not standard:
            x = _token_ball(x, math.sqrt(c.d_model))
        for block in v.blocks:
            a, heads = block.attn, block.attn.n_heads
            h = _layer_norm(x, block.ln_attn) if standard else x
            q, k, val = (m(h).reshape(b, tokens, heads, -1).transpose(1, 2)
                         for m in (a.q, a.k, a.v))
            e = torch.exp(torch.matmul(q, k.transpose(2, 3)) * a.score_scale)
            att = e * torch.reciprocal(e.sum(-1, keepdim=True))
            y = a.o(torch.matmul(att, val).transpose(1, 2).reshape(b, tokens, -1))
            x = _residual(block, x, y * a.output_scale, standard)
            h = _layer_norm(x, block.ln_mlp) if standard else x
            u = block.mlp.up(h)
            u = nn.functional.gelu(u) if self.exact_gelu else _gelu_tanh(u)
            x = _residual(block, x, block.mlp.down(u * block.mlp.gelu_scale), standard)
        pooled = (_layer_norm(x, v.norm) if standard else x).mean(1)
        return v.head(pooled) * c.final_scale


def _residual(block: nn.Module, x: Tensor, y: Tensor, standard: bool) -> Tensor:
    return x + y if standard else (1 - block.alpha) * x + block.alpha * y


class Crown:
    """CROWN lower bounds of the margins z_y − z_j, j ≠ y, over B₂(x, ε) ∩ [0, 1]ⁿ."""

    def __init__(self, model: nn.Module, example: Tensor) -> None:
        from auto_LiRPA import BoundedModule

        self.module = BoundedModule(model, torch.zeros_like(example), device="cpu",
                                    bound_opts={"conv_mode": "matrix"})
        self.calls: list[float] = []

    def margin_lower_bounds(self, x: Tensor, label: int, eps: float) -> Tensor:
        """(1, 9) CROWN lower bounds of the margins; every intermediate node whose bounds
        the relaxations needed keeps them in ``.lower`` / ``.upper``."""
        from auto_LiRPA import BoundedTensor, PerturbationLpNorm

        others = [j for j in range(10) if j != label]
        spec = torch.zeros(1, len(others), 10)
        spec[0, :, label] = 1
        spec[0, range(len(others)), others] = -1
        ball = PerturbationLpNorm(norm=2, eps=eps, x_L=torch.zeros_like(x),
                                  x_U=torch.ones_like(x))
        start = time.perf_counter()
        with torch.no_grad():
            lower, _ = self.module.compute_bounds(x=(BoundedTensor(x, ball),), method="CROWN",
                                                  C=spec, bound_upper=False)
        self.calls.append(time.perf_counter() - start)
        return lower

    def certifies(self, x: Tensor, label: int, eps: float) -> bool:
        lower = self.margin_lower_bounds(x, label, eps)
        return bool(torch.isfinite(lower).all() and (lower > 0).all())

    def radius_bracket(self, x: Tensor, label: int, start: float, midpoints: int = 1
                       ) -> tuple[float, float]:
        """(lo, hi): CROWN certifies lo (0: nothing found) and not hi (inf: not reached);
        ×4 or ÷4 steps from ``start`` until the answer changes, then ``midpoints``
        geometric bisection steps (hi/lo = 4^(1/2^midpoints))."""
        up = self.certifies(x, label, start)
        lo, hi = (start, math.inf) if up else (0.0, start)
        for _ in range(5):
            eps = lo * 4 if up else hi / 4
            if self.certifies(x, label, eps) == up:
                lo, hi = (eps, hi) if up else (lo, eps)
                continue
            lo, hi = (lo, eps) if up else (eps, hi)
            for _ in range(midpoints):
                mid = math.sqrt(lo * hi)
                lo, hi = (mid, hi) if self.certifies(x, label, mid) else (lo, mid)
            return lo, hi
        return lo, hi


def measure(run: Path, n: int, midpoints: int = 1, at_ours: bool = False) -> pd.DataFrame:
    vit = lipcert.load(run).eval()
    crown_model = CrownViT(vit).eval()
    data = load_dataset("mnist")
    x, y = data.x_test[:10 * n], data.y_test[:10 * n]
    with torch.no_grad():
        logits, crown_logits = vit(x), crown_model(x)
        right = (logits.argmax(1) == y) & (crown_logits.argmax(1) == y)
        shift = (crown_logits - logits).abs().max().item()
        exact = (CrownViT(vit, exact_gelu=True)(x) - logits).abs().max().item()
    print(f"{run}: max |logit change| of the CROWN-ready model {shift:.1e} "
          f"(with exact GELU {exact:.1e})", flush=True)
    x, y = x[right][:n], y[right][:n]
    start = time.perf_counter()
    ours = margin_radii(export_model(vit), x, y)
    ours_s = (time.perf_counter() - start) / len(x)
    adversarial = minimal_perturbation(vit, x, y, methods=("deepfool", "pgdl2"))["radius_l2"]
    crown = Crown(crown_model, x[:1])
    with torch.no_grad():
        parsed = torch.cat([crown.module(x[i:i + 1]) for i in range(len(x))])
        parse_error = (parsed - crown_model(x)).abs().max().item()
    if parse_error > 1e-4:
        raise SystemExit(f"auto_LiRPA's graph computes another function ({parse_error:.1e})")
    print(f"auto_LiRPA's graph reproduces the CROWN-ready model to {parse_error:.1e}")
    rows = []
    for i in range(len(x)):
        calls = len(crown.calls)
        r = float(ours.radius[i])
        if at_ours:
            lo, hi = (r, math.inf) if crown.certifies(x[i:i + 1], int(y[i]), r) else (0.0, r)
        else:
            lo, hi = crown.radius_bracket(x[i:i + 1], int(y[i]), r, midpoints)
        rows.append({"model": run.name, "image": i, "lipcert margin radius":
                     float(ours.radius[i]), "CROWN lo": lo, "CROWN hi": hi,
                     "smallest adversarial": float(adversarial.iloc[i]),
                     "lipcert s": ours_s, "CROWN s/call": sum(crown.calls[calls:])
                     / (len(crown.calls) - calls)})
        print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def interval_widths(run: Path, image: int, radius: float) -> pd.DataFrame:
    """Median interval width per activation over B₂(x, radius) ∩ [0, 1]ⁿ: lipcert's forward
    intervals (Taylor models with symbolic remainders, as the margin mode uses them) beside
    CROWN's intermediate bounds, for every CROWN-bounded node whose centre values match a
    lipcert node's (same layout, to 1e-2: the tanh GELU)."""
    from lipcert.bounds.backward.interval import Box
    from lipcert.bounds.backward.margins import MarginCertifier

    vit = lipcert.load(run).eval()
    data = load_dataset("mnist")
    x, y = data.x_test[image:image + 1], data.y_test[image:image + 1]
    ours = MarginCertifier(export_model(vit), example=x)
    if not ours.intervals.prepare_symbolic(x, y, ours.logits_name):
        raise SystemExit(f"{run}: the symbolic remainders do not apply to this model")
    env = ours.intervals(x, torch.tensor([radius], dtype=torch.float64))
    boxes = [(name, box) for name, box in env.items() if isinstance(box, Box)]
    crown = Crown(CrownViT(vit).eval(), x)
    with torch.no_grad():
        crown.module(x)  # centre values of every node (a bound computation clears them)
    centre = {name: node.forward_value for name, node in crown.module._modules.items()}
    crown.margin_lower_bounds(x, int(y[0]), radius)
    rows, used = [], set()
    for name, node in crown.module._modules.items():
        lo, hi, value = getattr(node, "lower", None), getattr(node, "upper", None), centre[name]
        if not all(isinstance(t, Tensor) for t in (lo, hi, value)) or bool((hi == lo).all()):
            continue
        match = next((ours_name for ours_name, box in boxes if ours_name not in used
                      and box.value.numel() == value.numel()
                      and torch.allclose(box.value.flatten(), value.double().flatten(),
                                         atol=1e-2)), None)
        if match is None:
            continue
        used.add(match)
        box = dict(boxes)[match]
        ours_w, crown_w = float((box.hi - box.lo).median()), float((hi - lo).median())
        rows.append({"lipcert node": match, "elements": value.numel(),
                     "lipcert width": ours_w, "CROWN width": crown_w,
                     "lipcert / CROWN": ours_w / crown_w})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="lipcert ViT run directories")
    parser.add_argument("--n", type=int, default=5, help="correctly classified images each")
    parser.add_argument("--cache", type=Path, default=Path("runs/auto_lirpa-0.3"))
    parser.add_argument("--out", type=Path, default=Path("runs/crown-reference"))
    parser.add_argument("--widths", type=float, metavar="RADIUS",
                        help="instead: per-activation interval widths of lipcert and CROWN "
                        "at this radius, on test image --image")
    parser.add_argument("--image", type=int, default=0)
    parser.add_argument("--midpoints", type=int, default=1,
                        help="geometric bisection steps of CROWN's radius search after the "
                        "×4 steps: its radius is known to 4^(1/2^midpoints) (default 2×)")
    parser.add_argument("--at-ours", action="store_true",
                        help="instead of the search: CROWN at lipcert's radius only")
    args = parser.parse_args()
    for run in args.runs:
        if not (run / "model.safetensors").exists():
            parser.error(f"{run}: no lipcert run (model.safetensors) there")
    install_auto_lirpa(args.cache)
    torch.set_num_threads(1)
    if args.widths is not None:
        for run in args.runs:
            print(f"{run}, test image {args.image}, radius {args.widths}")
            print(interval_widths(run, args.image, args.widths)
                  .to_markdown(index=False, floatfmt=".3g"))
        return
    table = pd.concat([measure(run, args.n, args.midpoints, args.at_ours) for run in args.runs],
                      ignore_index=True)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "crown.csv", index=False)
    (args.out / "crown.md").write_text(table.to_markdown(index=False, floatfmt=".3g") + "\n")
    print(table.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()

"""Certificates set against attacks: any adversarial example inside a certified ball is a
soundness violation.

A certificate JSON (``lipcert certify``; read with ``lipcert.certificate.Certificate``)
holds ``samples``, a list of ``{"index", "label", "pred", "margin", "radius_l2",
"radius_linf", "lipschitz"}`` where ``index`` is the sample's position in the dataset's
split, and names the model by the sha256 of its weights (``model.weights_sha256``). It
claims that every input within ``radius_l2`` (L2) of sample ``index``, or
within ``radius_linf`` (L∞), is classified as ``label``.

A violation is a result row with ``success`` (the prediction differs from the label) and
‖δ‖₂ < ``certified_radius_l2``, or ‖δ‖∞ < the certified L∞ radius. A sample misclassified
clean is a success with δ = 0, so a certificate that gives it a positive radius is caught
too. With no violation, certified accuracy at ε can never exceed robust accuracy at ε.

The ε-grid attacks only test the radii that happen to lie above a grid point.
``radius_audit`` tests every claim at its own size: for each sample i with certified radius
r_i > 0 it runs PGD-L2 with budget exactly r_i (``BallPGDL2``: ``restarts`` random starts
drawn uniformly from the ball, ``steps`` steps each) inside the set the certificate covers,
B(x_i, r_i) ∩ domain (images: [0, 1]^n, in the global and the local mode alike, because the
local bound L(x, r) is also propagated from the ball intersected with the domain; text: the
embedding-norm domain of ``attacks.embedding``). Every point it reports has been projected
into that set and measured in float64, and any such point with ‖δ‖₂ ≤ r_i whose
prediction differs from the label is a violation. The inequality is not strict: projected
PGD ends on the sphere ‖δ‖₂ = r_i, which a strict test would wave through, and the
certificate (margin > √2·L·‖δ‖ for ‖δ‖ < r, and the float64 safety factor on L) leaves no
room for a flip at the sphere itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from torch import nn

from attacks.harness import attackable, frozen, key_seed
from attacks.minimal import PerSamplePGDL2
from attacks.space import AttackSpace, ImageSpace, measure, project
from lipcert.certificate import Certificate as CertificateDocument
from lipcert.errors import LipcertError

__all__ = ["RADIUS_AUDIT_COLUMNS", "VIOLATION_COLUMNS", "BallPGDL2", "Certificate",
           "certified_vs_robust", "find_violations", "load_certificate", "minimal_violations",
           "print_violations", "radius_audit", "radius_violations"]

VIOLATION_COLUMNS = ["model", "attack", "norm", "eps", "index", "label", "pred_adv",
                     "delta_l2", "delta_linf", "certified_radius_l2", "certified_radius_linf",
                     "violation"]
RADIUS_AUDIT_COLUMNS = ["model", "index", "label", "pred_clean", "certified_radius_l2",
                        "margin_clean", "pred_adv", "margin_adv", "delta_l2", "delta_linf",
                        "steps", "restarts", "violation"]
RADIUS_ATTACK = "radius-audit:pgdl2"


@dataclass
class Certificate:
    """A certificate read for an audit: the document (``lipcert.certificate.Certificate``)
    and its per-sample radii and labels keyed by dataset index."""

    path: str
    document: CertificateDocument = field(repr=False)
    radius_l2: dict[int, float]
    radius_linf: dict[int, float]
    label: dict[int, int]

    @property
    def weights_sha256(self) -> str | None:
        """The sha256 of the certified weights (None when the certificate does not say)."""
        return self.document.weights_sha256

    def check_model(self, sha256: str | None, model: str) -> None:
        """Raise ``LipcertError`` if the certificate names other weights than ``model``'s."""
        if self.weights_sha256 and sha256 and self.weights_sha256 != sha256:
            raise LipcertError(
                f"certificate {self.path} is for the weights with sha256 "
                f"{self.weights_sha256[:12]}…, but {model} has {sha256[:12]}…: it certifies "
                "a different model"
            )

    def radii(self, indices: list[int], labels: list[int]
              ) -> tuple[np.ndarray, np.ndarray]:
        """L2 and L∞ radii for the samples ``indices`` (NaN where the certificate is silent),
        after checking that the certificate's labels are the data's."""
        for index, label in zip(indices, labels, strict=True):
            if index in self.label and self.label[index] != label:
                raise LipcertError(
                    f"certificate {self.path}: sample {index} has label {self.label[index]} "
                    f"there but {label} in the data: it was made on different data"
                )
        nan = math.nan
        return (np.array([self.radius_l2.get(i, nan) for i in indices], dtype=np.float64),
                np.array([self.radius_linf.get(i, nan) for i in indices], dtype=np.float64))


def load_certificate(path: str | Path) -> Certificate:
    """Read and validate a certificate JSON (``lipcert.certificate.Certificate.load``);
    errors are ``LipcertError``s naming the file."""
    document = CertificateDocument.load(path)
    samples = document.samples
    return Certificate(str(path), document, {s.index: s.radius_l2 for s in samples},
                       {s.index: s.radius_linf for s in samples},
                       {s.index: s.label for s in samples})


def find_violations(df: pd.DataFrame, certificate: Certificate | None = None) -> pd.DataFrame:
    """The rows of a results table that contradict their certified radii.

    Uses ``certified_radius_l2`` from the table and, when ``certificate`` is given, its L∞
    radii too. Returns ``VIOLATION_COLUMNS``; ``violation`` says which radius was broken.
    """
    linf = (df["index"].map(certificate.radius_linf).astype("float64")
            if certificate is not None else pd.Series(np.nan, index=df.index))
    out = df.assign(certified_radius_linf=linf)
    in_l2 = out["success"] & (out["delta_l2"] < out["certified_radius_l2"])
    in_linf = out["success"] & (out["delta_linf"] < out["certified_radius_linf"])
    out = out[in_l2 | in_linf].copy()
    out["violation"] = np.where(in_l2[out.index] & in_linf[out.index], "l2,linf",
                                np.where(in_l2[out.index], "l2", "linf"))
    return out[VIOLATION_COLUMNS].reset_index(drop=True)


def minimal_violations(minimal: pd.DataFrame) -> pd.DataFrame:
    """Violations among minimal perturbations (``attacks.minimal``): an empirical radius
    below the certified one. Returned with ``VIOLATION_COLUMNS`` (attack
    ``minimal:<method>``, norm ``l2``, no ε)."""
    bad = minimal[minimal["radius_l2"] < minimal["certified_radius_l2"]]
    return pd.DataFrame({
        "model": bad["model"], "attack": "minimal:" + bad["method"].astype(str),
        "norm": "l2", "eps": np.nan, "index": bad["index"], "label": bad["label"],
        "pred_adv": -1, "delta_l2": bad["radius_l2"], "delta_linf": np.nan,
        "certified_radius_l2": bad["certified_radius_l2"], "certified_radius_linf": np.nan,
        "violation": "l2",
    }, columns=VIOLATION_COLUMNS).reset_index(drop=True)


def print_violations(violations: pd.DataFrame, console: Console | None = None,
                     limit: int = 20) -> None:
    """Print violations loudly (to stderr); nothing when there are none."""
    if violations.empty:
        return
    console = console or Console(stderr=True, soft_wrap=True)
    console.print(f"[bold red]CERTIFICATE VIOLATION: {len(violations)} adversarial example(s) "
                  "lie inside their certified radius. The certificate is unsound (or was "
                  "made for another model or data).[/bold red]")
    for row in violations.head(limit).itertuples():
        eps = "" if pd.isna(row.eps) else f" {row.norm} ε={row.eps:.4g}"
        pred = f" → {row.pred_adv}" if row.pred_adv >= 0 else ""
        size = (f"‖δ‖₂ = {row.delta_l2:.6g} ≤ certified {row.certified_radius_l2:.6g}"
                if "l2" in row.violation else
                f"‖δ‖∞ = {row.delta_linf:.6g} ≤ certified {row.certified_radius_linf:.6g}")
        console.print(f"[red]  {row.model} {row.attack}{eps} sample {row.index}: label "
                      f"{row.label}{pred}, {size}[/red]")
    if len(violations) > limit:
        console.print(f"[red]  … and {len(violations) - limit} more[/red]")


def certified_vs_robust(df: pd.DataFrame, certificate: Certificate | None = None
                        ) -> pd.DataFrame:
    """Per (model, norm, ε): certified accuracy (radius > ε; L∞ rows use the certificate's
    L∞ radii) next to robust accuracy (worst case over attacks). Samples without a
    certified radius are left out of both. ``consistent`` is certified ≤ robust."""
    per_sample = df.groupby(["model", "norm", "eps", "index"], sort=False).agg(
        broken=("success", "any"), r2=("certified_radius_l2", "first")).reset_index()
    if certificate is not None:
        per_sample["rinf"] = per_sample["index"].map(certificate.radius_linf).astype(float)
    else:
        per_sample["rinf"] = np.nan
    per_sample["radius"] = np.where(per_sample["norm"] == "l2", per_sample["r2"],
                                    per_sample["rinf"])
    per_sample = per_sample[per_sample["radius"].notna()]
    per_sample = per_sample.assign(certified=per_sample["radius"] > per_sample["eps"],
                                   robust=~per_sample["broken"])
    table = per_sample.groupby(["model", "norm", "eps"], sort=False).agg(
        n=("index", "size"), certified_accuracy=("certified", "mean"),
        robust_accuracy=("robust", "mean")).reset_index()
    table["consistent"] = table["certified_accuracy"] <= table["robust_accuracy"]
    return table


class BallPGDL2(PerSamplePGDL2):
    """PGD-L2 that searches each sample's whole ball B(x, ε) (one ε per sample), for audits.

    Three changes to ``PerSamplePGDL2``. The random start is uniform over the ball's volume
    (direction g/‖g‖ with g Gaussian, length ε·U^{1/n} with U uniform on [0, 1] and n the
    number of input elements). Each step ascends the margin loss max_{j≠y} z_j − z_y, the
    quantity whose sign is the violation, or, given per-sample ``targets`` t, z_t − z_y
    (one target class per restart is the MultiTargeted attack of Gowal et al., 2019); on a
    linear model either loss's gradient is the normal of a decision boundary, where
    cross-entropy's mixes several and can stall short of the nearest one. And ``forward``
    returns, per sample, the iterate of smallest margin z_y − max_{j≠y} z_j seen over all
    ``steps`` + 1 iterates, not the last one. Every iterate lies in the ball (up to float32
    rounding of the projection) and in [0, 1]^n; callers project the result again in
    float64 (``attacks.space.project``).
    """

    def __init__(self, model: nn.Module, step_fraction: float = 0.1, steps: int = 100
                 ) -> None:
        super().__init__(model, step_fraction=step_fraction, steps=steps, random_start=True)
        self.targets: torch.Tensor | None = None

    def _start(self, images: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        direction = torch.empty_like(images).normal_()
        direction = direction / direction.flatten(1).norm(dim=1).view(eps.shape)
        u = torch.rand(eps.shape, dtype=torch.float64, device=images.device)
        length = (u ** (1.0 / images[0].numel())).to(images.dtype) * eps
        return torch.clamp(images + direction * length, 0, 1).detach()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        own = logits.gather(1, labels.view(-1, 1)).squeeze(1)
        if self.targets is None:
            other = logits.scatter(1, labels.view(-1, 1), -math.inf).amax(dim=1)
        else:
            other = logits.gather(1, self.targets.view(-1, 1)).squeeze(1)
        return (other - own).sum()

    def forward(self, images: torch.Tensor, labels: torch.Tensor, eps: torch.Tensor,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        images, labels, eps = self._prepare(images, labels, eps)
        self.targets = None if targets is None else targets.to(self.device)
        adv = self._start(images, eps)
        best = adv.clone()
        best_margin = torch.full((len(images),), math.inf, dtype=torch.float64,
                                 device=images.device)

        def keep(point: torch.Tensor, logits: torch.Tensor) -> None:
            m = _margins(logits, labels)
            better = m < best_margin
            best[better], best_margin[better] = point[better], m[better]

        try:
            for _ in range(self.steps):
                logits, following = self._step(images, labels, adv, eps)
                keep(adv, logits)
                adv = following
        finally:
            self.targets = None
        with torch.no_grad():
            keep(adv, self.get_logits(adv))
        return best


def _margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_y − max_{j≠y} z_j per row, in float64."""
    z = logits.detach().double()
    own = z.gather(1, labels.view(-1, 1)).squeeze(1)
    return own - z.scatter(1, labels.view(-1, 1), -math.inf).amax(dim=1)


def radius_audit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    radius_l2: Sequence[float] | torch.Tensor | np.ndarray,
    *,
    model_name: str = "model",
    space: AttackSpace | None = None,
    steps: int = 100,
    restarts: int = 5,
    step_fraction: float = 0.1,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    seed: int = 0,
    indices: Sequence[int] | torch.Tensor | None = None,
) -> pd.DataFrame:
    """Attack every sample with a positive certified radius inside exactly that radius.

    For sample i with r_i = ``radius_l2[i]`` > 0 (0 and NaN claim nothing and are skipped):
    ``restarts`` runs of ``BallPGDL2`` with ``steps`` steps of α = ``step_fraction``·r_i,
    each from a fresh uniform start in the ball. Run 0 ascends the untargeted margin loss;
    run k ≥ 1 targets the class ranked k-th after the label by the clean logits (runs past
    the last class are untargeted again). The budget is min(r_i, D) with
    D = √n / ``space.box_eps(1)`` the diameter of the attack box, which holds the whole
    domain, so the searched set is B(x_i, r_i) ∩ domain either way. Each run's result is
    projected into that set (``attacks.space.project``, float64) and classified; the point
    of smallest margin over the runs is kept, and a sample stops being attacked once it is
    misclassified. A sample misclassified clean is a violation at δ = 0.

    Returns one row per audited sample with the columns ``RADIUS_AUDIT_COLUMNS``: the clean
    margin z_y − max_{j≠y} z_j, the prediction and margin at the kept point, its ‖δ‖₂ and
    ‖δ‖∞, the settings, and ``violation`` (prediction ≠ label and ‖δ‖₂ ≤ r_i).
    """
    if steps < 1 or restarts < 1 or batch_size < 1:
        raise LipcertError("the radius audit needs steps, restarts and batch size >= 1")
    if not step_fraction > 0:
        raise LipcertError(f"step_fraction must be > 0, got {step_fraction}")
    space = space or ImageSpace()
    n = len(x)
    y = torch.as_tensor(y, dtype=torch.long).cpu()
    index = torch.arange(n) if indices is None else torch.as_tensor(indices).long().cpu()
    radius = torch.as_tensor(radius_l2, dtype=torch.float64).cpu()
    if y.shape != (n,) or index.shape != (n,) or radius.shape != (n,):
        raise LipcertError(f"labels, indices and radii need one value per sample ({n})")
    if bool((radius < 0).any()):
        raise LipcertError("certified radii must be >= 0")
    audited = (radius > 0).nonzero().flatten()  # NaN > 0 is False: no claim, no audit
    diameter = math.sqrt(x[0].numel()) / space.box_eps(1.0) if n else 0.0
    frames = []
    model = attackable(model)
    with frozen(model.to(device)):
        wrapped = space.wrap(model, tuple(x.shape[1:]))
        attack = BallPGDL2(wrapped, step_fraction=step_fraction, steps=steps)
        for number, start in enumerate(range(0, len(audited), batch_size)):
            rows = audited[start:start + batch_size]
            seeds = [key_seed(seed, "radius-audit", number, k) for k in range(restarts)]
            frame = _audit_batch(model, attack, space, x[rows].to(device), y[rows].to(device),
                                 radius[rows].to(device), diameter, seeds)
            frames.append(frame.assign(model=model_name, index=index[rows].numpy(),
                                       steps=steps, restarts=restarts))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in _RADIUS_DTYPES.items()})
    return pd.concat(frames, ignore_index=True)[RADIUS_AUDIT_COLUMNS].astype(_RADIUS_DTYPES)


_RADIUS_DTYPES = {"model": str, "index": "int64", "label": "int64", "pred_clean": "int64",
                  "certified_radius_l2": "float64", "margin_clean": "float64",
                  "pred_adv": "int64", "margin_adv": "float64", "delta_l2": "float64",
                  "delta_linf": "float64", "steps": "int64", "restarts": "int64",
                  "violation": bool}


@torch.no_grad()
def _audit_batch(model: nn.Module, attack: BallPGDL2, space: AttackSpace, x: torch.Tensor,
                 y: torch.Tensor, radius: torch.Tensor, diameter: float, seeds: list[int]
                 ) -> pd.DataFrame:
    """One batch of ``radius_audit`` (one restart per seed): the kept point per sample."""
    clean = model(x)
    pred_clean = clean.argmax(dim=1)
    margin_clean = _margins(clean, y)
    best, best_margin, best_pred = x.clone(), margin_clean.clone(), pred_clean.clone()
    budget = torch.clamp(radius, max=diameter)
    ranked = clean.scatter(1, y.view(-1, 1), -math.inf).argsort(dim=1, descending=True)
    todo = pred_clean == y
    for restart, seed in enumerate(seeds):
        idx = todo.nonzero().flatten()
        if not len(idx):
            break
        torch.manual_seed(seed)
        target = ranked[idx, restart - 1] if 0 < restart < clean.shape[1] else None
        u = space.encode(x[idx])
        with torch.enable_grad():
            u_adv = attack(u, y[idx], budget[idx] * space.box_eps(1.0), target).detach()
        cand = project(x[idx], space.decode(x[idx], u, u_adv), "l2", budget[idx], space)
        logits = model(cand)
        margin = _margins(logits, y[idx])
        better = margin <= best_margin[idx]  # ties: the attacked point, not the clean one
        best[idx[better]] = cand[better]
        best_margin[idx[better]] = margin[better]
        best_pred[idx[better]] = logits.argmax(dim=1)[better]
        todo[idx[best_pred[idx] != y[idx]]] = False
    l2, linf = measure(x, best)
    return pd.DataFrame({
        "label": y.cpu().numpy(), "pred_clean": pred_clean.cpu().numpy(),
        "certified_radius_l2": radius.cpu().numpy(), "margin_clean": margin_clean.cpu().numpy(),
        "pred_adv": best_pred.cpu().numpy(), "margin_adv": best_margin.cpu().numpy(),
        "delta_l2": l2.cpu().numpy(), "delta_linf": linf.cpu().numpy(),
        "violation": ((best_pred != y) & (l2 <= radius)).cpu().numpy(),
    })


def radius_violations(audit: pd.DataFrame) -> pd.DataFrame:
    """The violations of a ``radius_audit`` table, with ``VIOLATION_COLUMNS`` (attack
    ``radius-audit:pgdl2``, norm ``l2``, ε = the certified radius)."""
    bad = audit[audit["violation"]]
    return pd.DataFrame({
        "model": bad["model"], "attack": RADIUS_ATTACK, "norm": "l2",
        "eps": bad["certified_radius_l2"], "index": bad["index"], "label": bad["label"],
        "pred_adv": bad["pred_adv"], "delta_l2": bad["delta_l2"],
        "delta_linf": bad["delta_linf"], "certified_radius_l2": bad["certified_radius_l2"],
        "certified_radius_linf": np.nan, "violation": "l2",
    }, columns=VIOLATION_COLUMNS).reset_index(drop=True)

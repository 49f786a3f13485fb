"""The smallest adversarial L2 perturbation found per sample: the empirical radius.

For each correctly classified sample, three searches run and the smallest verified
adversarial perturbation wins:

* ``deepfool``: torchattacks' DeepFool, batched (``attacks.deepfool``; a minimal-norm
  attack by construction);
* ``fab``: torchattacks' FAB, L2, untargeted (minimises the norm; it works without
  torchvision);
* ``pgdl2``: bisection over ε with PGD-L2, each sample with its own ε. The upper end starts
  at the best DeepFool/FAB result (or at ``eps_max``); each success lowers it to the norm of
  the perturbation found, each failure raises the lower end.

Every candidate is decoded into the model's input space, clamped to the domain, and counted
only if the model's prediction there differs from the label; its norm is measured in
float64. The result is therefore an upper bound on the true minimal adversarial radius, and
a sound certificate's radius can never exceed it (``attacks.audit``). A sample misclassified
clean has radius 0; one where nothing was found up to ``eps_max`` has an empty radius.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch
import torchattacks
from torch import nn

from attacks.deepfool import BatchedDeepFool
from attacks.harness import attackable, frozen, key_seed, predict
from attacks.space import AttackSpace, ImageSpace, measure, project
from lipcert.errors import LipcertError

__all__ = ["METHODS", "MINIMAL_COLUMNS", "PerSamplePGDL2", "minimal_perturbation"]

METHODS = ("deepfool", "fab", "pgdl2")
MINIMAL_COLUMNS = ["model", "index", "label", "pred_clean", "radius_l2", "method",
                   "deepfool_l2", "fab_l2", "pgdl2_l2", "certified_radius_l2"]


class PerSamplePGDL2(torchattacks.PGDL2):
    """``torchattacks.PGDL2`` with one ε per sample, given to ``forward`` as a (B,) tensor.

    PGDL2 takes one scalar ε per batch, and bisection needs one per sample. This is
    PGDL2's update step for step (random start in the ball, normalised gradient step of
    α = ``step_fraction``·ε, projection onto the ball, clamp to [0, 1]), with ε and α per
    sample.
    """

    def __init__(self, model: nn.Module, step_fraction: float = 0.125, steps: int = 20,
                 random_start: bool = True) -> None:
        super().__init__(model, eps=1.0, alpha=step_fraction, steps=steps,
                         random_start=random_start)
        self.step_fraction = step_fraction

    def forward(self, images: torch.Tensor, labels: torch.Tensor, eps: torch.Tensor
                ) -> torch.Tensor:
        images, labels, eps = self._prepare(images, labels, eps)
        adv = self._start(images, eps) if self.random_start else images.clone()
        for _ in range(self.steps):
            adv = self._step(images, labels, adv, eps)[1]
        return adv

    def _prepare(self, images: torch.Tensor, labels: torch.Tensor, eps: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs and labels on the attack's device, ε as a (B, 1, …) column."""
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        shape = (len(images),) + (1,) * (images.dim() - 1)
        return images, labels, eps.to(self.device, images.dtype).view(shape)

    def _start(self, images: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """PGDL2's random start: a Gaussian direction, a length uniform in [0, ε], then the
        clamp to [0, 1] (a projection onto a convex set holding x: it never lengthens δ)."""
        delta = torch.empty_like(images).normal_()
        length = delta.flatten(1).norm(dim=1).view(eps.shape)
        radius = torch.zeros_like(length).uniform_(0, 1)
        return torch.clamp(images + delta * radius / length * eps, 0, 1).detach()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """What each step ascends: the cross-entropy, as in PGDL2."""
        return nn.CrossEntropyLoss()(logits, labels)

    def _step(self, images: torch.Tensor, labels: torch.Tensor, adv: torch.Tensor,
              eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from ``adv``: the logits at ``adv`` and the next iterate
        clamp(x + P(adv + α·g/‖g‖ − x)), P scaling δ by min(1, ε/‖δ‖), α = fraction·ε."""
        adv = adv.clone().detach().requires_grad_(True)
        logits = self.get_logits(adv)
        grad = torch.autograd.grad(self._loss(logits, labels), adv)[0]
        grad = grad / (grad.flatten(1).norm(dim=1).view(eps.shape) + self.eps_for_division)
        delta = adv.detach() + self.step_fraction * eps * grad - images
        factor = torch.clamp(eps / delta.flatten(1).norm(dim=1).view(eps.shape), max=1.0)
        return logits.detach(), torch.clamp(images + delta * factor, 0, 1).detach()


class _Search:
    """Best verified adversarial example per sample, over several methods."""

    def __init__(self, model: nn.Module, space: AttackSpace, x: torch.Tensor,
                 y: torch.Tensor) -> None:
        self.model, self.space, self.x, self.y = model, space, x, y
        self.wrapped = space.wrap(model, tuple(x.shape[1:]))
        self.best = torch.full((len(x),), math.inf, dtype=torch.float64, device=x.device)
        self.best_x = x.clone()
        self.method = ["none"] * len(x)
        self.per_method = {m: torch.full_like(self.best, math.nan) for m in METHODS}

    @torch.no_grad()
    def offer(self, method: str, idx: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Record the candidates ``cand`` for samples ``idx``; returns their L2 norms, inf
        where a candidate does not change the prediction."""
        cand = self.space.clamp(cand)
        fooled = self.model(cand).argmax(dim=1) != self.y[idx]
        norms = measure(self.x[idx], cand)[0]
        norms = torch.where(fooled, norms, torch.full_like(norms, math.inf))
        seen = self.per_method[method][idx]
        self.per_method[method][idx] = torch.fmin(seen, torch.where(
            fooled, norms, torch.full_like(norms, math.nan)))
        better = norms < self.best[idx]
        for i in idx[better].tolist():
            self.method[i] = method
        self.best[idx[better]] = norms[better]
        self.best_x[idx[better]] = cand[better]
        return norms

    def run(self, attack, idx: torch.Tensor, *args) -> torch.Tensor:
        u = self.space.encode(self.x[idx])
        u_adv = attack(u, self.y[idx], *args).detach()
        return self.space.decode(self.x[idx], u, u_adv)


def minimal_perturbation(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    model_name: str = "model",
    space: AttackSpace | None = None,
    methods: Sequence[str] = METHODS,
    eps_max: float | None = None,
    bisection_steps: int = 10,
    pgd_steps: int = 20,
    deepfool_steps: int = 50,
    fab_steps: int = 20,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    seed: int = 0,
    indices: Sequence[int] | torch.Tensor | None = None,
    certified_radius_l2: Sequence[float] | torch.Tensor | None = None,
    return_examples: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, torch.Tensor]:
    """The smallest L2 perturbation that any of ``methods`` finds, per sample.

    ``eps_max``: the largest radius searched (default: the diameter √n of [0, 1]^n for
    images, the box half-width for an ``EmbeddingBox``). Returns a table with the columns
    ``MINIMAL_COLUMNS`` (``radius_l2`` is the best norm, ``method`` the method that found
    it, and ``<method>_l2`` each method's own result), and with ``return_examples`` also
    the best adversarial inputs (the clean input where none was found).
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise LipcertError(f"unknown minimal-attack methods {unknown}; known: {METHODS}")
    space = space or ImageSpace()
    if eps_max is None:
        eps_max = getattr(space, "half_width", None) or math.sqrt(x[0].numel())
    if not eps_max > 0:
        raise LipcertError(f"eps_max must be > 0, got {eps_max}")
    n = len(x)
    y = torch.as_tensor(y, dtype=torch.long).cpu()
    index = torch.arange(n) if indices is None else torch.as_tensor(indices).long()
    radius_cert = (torch.full((n,), math.nan, dtype=torch.float64)
                   if certified_radius_l2 is None
                   else torch.as_tensor(certified_radius_l2, dtype=torch.float64))
    rows, examples = [], []
    model = attackable(model)
    with frozen(model.to(device)):
        pred_clean, n_classes = predict(model, x, batch_size, device)
        for b, start in enumerate(range(0, n, batch_size)):
            sl = slice(start, start + batch_size)
            xb, yb = x[sl].to(device), y[sl].to(device)
            search = _Search(model, space, xb, yb)
            wrong = (pred_clean[sl] != y[sl]).to(device)
            search.best[wrong] = 0.0
            for i in wrong.nonzero().flatten().tolist():
                search.method[i] = "clean"
            idx = (~wrong).nonzero().flatten()
            if len(idx):
                _search_batch(search, idx, methods, eps_max, n_classes, bisection_steps,
                              pgd_steps, deepfool_steps, fab_steps,
                              lambda *k, b=b: key_seed(seed, "minimal", b, *k))
            best = search.best.cpu()
            frame = pd.DataFrame({
                "model": model_name, "index": index[sl].numpy(), "label": y[sl].numpy(),
                "pred_clean": pred_clean[sl].numpy(),
                "radius_l2": torch.where(best.isinf(), math.nan, best).numpy(),
                "method": search.method,
                **{f"{m}_l2": search.per_method[m].cpu().numpy() for m in METHODS},
                "certified_radius_l2": radius_cert[sl].numpy(),
            }, columns=MINIMAL_COLUMNS)
            rows.append(frame)
            examples.append(search.best_x.cpu())
    df = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=MINIMAL_COLUMNS)
    if return_examples:
        return df, (torch.cat(examples) if examples else x[:0].clone())
    return df


def _search_batch(search: _Search, idx: torch.Tensor, methods: Sequence[str], eps_max: float,
                  n_classes: int, bisection_steps: int, pgd_steps: int, deepfool_steps: int,
                  fab_steps: int, seed_of) -> None:
    space, wrapped = search.space, search.wrapped
    if "deepfool" in methods:
        torch.manual_seed(seed_of("deepfool"))
        attack = BatchedDeepFool(wrapped, steps=deepfool_steps, overshoot=0.02)
        search.offer("deepfool", idx, search.run(attack, idx))
    if "fab" in methods:
        s = seed_of("fab") % 2**31
        attack = torchattacks.FAB(wrapped, norm="L2", eps=space.box_eps(eps_max),
                                  steps=fab_steps, n_restarts=1, seed=s, n_classes=n_classes)
        search.offer("fab", idx, search.run(attack, idx))
    if "pgdl2" not in methods:
        return
    attack = PerSamplePGDL2(wrapped, steps=pgd_steps)
    hi = search.best[idx].clone()  # inf where nothing was found yet
    lo = torch.zeros_like(hi)

    def pgd(active: torch.Tensor, eps: torch.Tensor, tag: object) -> torch.Tensor:
        sub = idx[active]
        torch.manual_seed(seed_of("pgdl2", tag))
        cand = search.run(attack, sub, eps * space.box_eps(1.0))
        return search.offer("pgdl2", sub, project(search.x[sub], cand, "l2", eps, space))

    need = hi > eps_max  # nothing found within eps_max: try PGD at eps_max first
    if need.any():
        hi[need] = torch.minimum(hi[need], pgd(need, torch.full_like(hi[need], eps_max), -1))
    for step in range(bisection_steps):
        active = hi.isfinite() & (hi > lo)
        if not active.any():
            break
        mid = (lo[active] + hi[active]) / 2
        norms = pgd(active, mid, step)
        found = norms.isfinite()
        hi[active] = torch.where(found, torch.minimum(hi[active], norms), hi[active])
        lo[active] = torch.where(found, lo[active], mid)

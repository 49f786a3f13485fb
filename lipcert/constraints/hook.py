"""The constraint object and the optimizer post-step hook that applies it.

Attach the constraint to each optimizer (:meth:`WeightConstraint.attach`): through
``Optimizer.register_step_post_hook`` it reads every param group's current ``lr`` after
each ``optimizer.step()`` and projects the constrained matrices that optimizer owns, so an
lr schedule needs nothing more. At the end of training :meth:`WeightConstraint.finalize`
measures every matrix and makes the declared bound hold exactly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from lipcert import spectral
from lipcert.constraints.coupling import default_update_scale, soft_cap_coupling
from lipcert.constraints.limits import check_weight, matrix_shape, spectral_limit
from lipcert.constraints.projections import get_method, spectral_cap
from lipcert.errors import LipcertError, TrainingError


class _Entry:
    __slots__ = ("limit", "name", "param", "state")

    def __init__(self, name: str, param: torch.nn.Parameter, limit: float | None) -> None:
        self.name = name
        self.param = param
        self.limit = limit
        self.state: dict[str, torch.Tensor] = {}


class WeightConstraint:
    """Keeps a set of weight matrices within ``‖W‖_RMS ≤ w_max`` during training.

    Args:
        method: one of :data:`~lipcert.constraints.CONSTRAINT_METHODS`.
        w_max: the bound in the RMS→RMS norm (ignored, and may be ``None``, for ``"none"``).
        params: ``(name, parameter)`` pairs of 2-D weights ``(fan_out, fan_in)``.
        weight_decay: λ for the ``"weight_decay"`` method (``W ← (1 − lr·λ) W``).
        alpha: a fixed soft cap strength (limit-1 units); ``None`` couples it to the lr
            (:mod:`lipcert.constraints.coupling`).
        update_scale: spectral norm of one optimizer update per unit lr, for the soft cap
            coupling; ``None`` picks it per optimizer.
        power_iters: power-iteration steps per optimizer step for ``"spectral_hammer"``.
        norm: ``"rms"`` (the paper's RMS→RMS norm) or ``"spectral"``: ``w_max`` is then the
            limit on σ_max itself, the same for every shape.

    Call :meth:`attach` on each optimizer (Muon for hidden matrices, AdamW for the rest):
    after every ``optimizer.step()`` the hook projects the constrained matrices that this
    optimizer owns, with its current lr. At the end, :meth:`finalize`.
    """

    def __init__(
        self,
        method: str,
        w_max: float | None,
        params: Iterable[tuple[str, torch.nn.Parameter]],
        *,
        weight_decay: float = 0.0,
        alpha: float | None = None,
        update_scale: float | None = None,
        power_iters: int = 4,
        norm: str = "rms",
    ) -> None:
        if norm not in ("rms", "spectral"):
            raise LipcertError(f"unknown weight norm {norm!r}; expected 'rms' or 'spectral'")
        self.norm = norm
        self.fn = get_method(method)
        self.method = method
        if method == "none":
            self.w_max: float | None = None if w_max is None else float(w_max)
        else:
            if w_max is None:
                raise LipcertError(f"constraint method {method!r} needs a bound w_max")
            spectral_limit((1, 1), w_max)  # validates w_max
            self.w_max = float(w_max)
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise LipcertError(f"weight_decay must be a finite number ≥ 0, got {weight_decay!r}")
        if alpha is not None and not (math.isfinite(alpha) and alpha >= 0):
            raise LipcertError(f"alpha must be a finite number ≥ 0, got {alpha!r}")
        if update_scale is not None and not (math.isfinite(update_scale) and update_scale >= 0):
            raise LipcertError(f"update_scale must be a finite number ≥ 0, got {update_scale!r}")
        self.weight_decay = float(weight_decay)
        self.alpha = alpha
        self.update_scale = update_scale
        self.power_iters = int(power_iters)
        self._entries: dict[int, _Entry] = {}
        for name, p in params:
            if p.ndim != 2:
                raise LipcertError(
                    f"parameter {name!r} has shape {tuple(p.shape)}; constraints apply to 2-D "
                    "weight matrices (fan_out, fan_in) only"
                )
            if id(p) in self._entries:
                continue
            limit = (
                None
                if self.w_max is None or method == "none"
                else spectral_limit(p.shape, self.w_max) if norm == "rms" else self.w_max
            )
            self._entries[id(p)] = _Entry(name, p, limit)
        self._handles: list[Any] = []

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-matrix state (the spectral hammer's power-iteration vectors)."""
        return {
            e.name: {k: v.detach().cpu().clone() for k, v in e.state.items()}
            for e in self._entries.values()
            if e.state
        }

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore :meth:`state_dict` (unknown names are ignored)."""
        by_name = {e.name: e for e in self._entries.values()}
        for name, st in state.items():
            if name in by_name:
                by_name[name].state = {k: v.clone() for k, v in st.items()}

    # -- the hook ---------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Register the projection with ``optimizer.register_step_post_hook``.

        After each ``optimizer.step()`` every constrained matrix owned by *this* optimizer is
        projected, using its param group's current ``lr``. Returns the hook handle (also kept
        for :meth:`detach`).
        """
        owned = [p for g in optimizer.param_groups for p in g["params"] if id(p) in self._entries]
        if not owned and self._entries:
            warnings.warn(
                "WeightConstraint.attach: this optimizer owns none of the constrained matrices",
                RuntimeWarning,
                stacklevel=2,
            )

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._project_optimizer(opt)

        handle = optimizer.register_step_post_hook(hook)
        self._handles.append(handle)
        return handle

    def detach(self) -> None:
        """Remove every hook registered by :meth:`attach`."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _project_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            lr = float(group.get("lr", 0.0))
            for p in group["params"]:
                entry = self._entries.get(id(p))
                if entry is not None:
                    self._project_entry(entry, lr, group, optimizer)

    def _project_entry(
        self,
        entry: _Entry,
        lr: float,
        group: dict[str, Any],
        optimizer: torch.optim.Optimizer,
    ) -> None:
        if entry.limit is None:
            return
        alpha = 0.0
        if self.method == "soft_cap":
            alpha = self._alpha(entry.param, entry.limit, lr, group, optimizer)
        try:
            self.fn(
                entry.param,
                entry.limit,
                lr=lr,
                decay=self.weight_decay,
                alpha=alpha,
                state=entry.state,
                power_iters=self.power_iters,
            )
        except TrainingError as exc:
            raise TrainingError(f"{entry.name}: {exc}") from None

    def _alpha(
        self,
        param: torch.Tensor,
        limit: float,
        lr: float,
        group: dict[str, Any],
        optimizer: torch.optim.Optimizer,
    ) -> float:
        """Soft cap strength for one matrix this step: fixed, or coupled to the lr."""
        if self.alpha is not None:
            return float(self.alpha)
        shape = matrix_shape(param.shape)
        scale = (
            self.update_scale
            if self.update_scale is not None
            else default_update_scale(optimizer, group, shape)
        )
        decay = lr * float(group.get("weight_decay", 0.0) or 0.0)
        return soft_cap_coupling(lr * scale, limit, decay)

    # -- the end of training ----------------------------------------------------------
    @torch.no_grad()
    def finalize(self) -> list[dict[str, Any]]:
        """Measure every matrix and make the declared bound hold.

        σ̄ below is :func:`lipcert.spectral.exact`, a verified upper value of σ_max (within
        about 1e-8 of it). For every method but ``"none"``, a matrix whose σ̄ exceeds its
        limit is capped exactly (``spectral_cap``; for ``spectral_normalize`` and
        ``spectral_cap`` this only happens if no step was taken), and, should rounding to the
        weight's dtype leave σ̄ a hair above, rescaled until σ̄ is within the limit, so the
        limit bounds the true σ_max. Returns one record per matrix: ``name``, ``shape``,
        ``method``, ``w_max``, ``limit`` (spectral; ``None`` for ``"none"``),
        ``sigma_before``, ``sigma_after`` (σ̄), ``rms_norm_after`` (= σ_after·√(fan_in/fan_out))
        and ``capped`` (whether finalize changed the matrix).
        """
        records: list[dict[str, Any]] = []
        for entry in self._entries.values():
            p = entry.param
            fan_out, fan_in = matrix_shape(p.shape)
            try:
                check_weight(p)
            except TrainingError as exc:
                raise TrainingError(f"{entry.name}: {exc}") from None
            before = spectral.exact(p).value
            after = before
            capped = False
            if entry.limit is not None and before > entry.limit:
                spectral_cap(p, entry.limit)
                capped = True
                after = spectral.exact(p).value
                for _ in range(8):
                    if after <= entry.limit:
                        break
                    p.mul_((entry.limit / after) * (1.0 - 2.0**-20))
                    after = spectral.exact(p).value
            records.append(
                {
                    "name": entry.name,
                    "shape": [fan_out, fan_in],
                    "method": self.method,
                    "w_max": self.w_max,
                    "limit": entry.limit,
                    "sigma_before": before,
                    "sigma_after": after,
                    "rms_norm_after": after * math.sqrt(fan_in / fan_out),
                    "capped": capped,
                }
            )
        return records

"""The attack registry: one entry per short name, mapping to a torchattacks class.

Each entry says which norm its budget ε is measured in, which torchattacks class runs it,
and its default parameters. Step sizes are stored as a fraction of ε (``step_fraction``),
so one entry serves every ε of a grid. Adding an attack is one ``AttackSpec`` in
``REGISTRY``; users override parameters with a dict::

    resolve("pgd", {"steps": 50, "step_fraction": 0.05, "restarts": 3})

``norm=None`` marks a *minimal* attack (CW, DeepFool): it takes no budget and returns the
perturbation it finds; the harness evaluates it at every L2 ε by projecting that
perturbation onto the ε-ball, so its rows are L2 rows like the others.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from lipcert.errors import LipcertError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "DEFAULT_ATTACKS",
    "DEFAULT_EPS_L2",
    "DEFAULT_EPS_LINF",
    "REGISTRY",
    "AttackSpec",
    "Norm",
    "parse_attacks",
    "parse_eps",
    "resolve",
]

Norm = Literal["linf", "l2"]
DEFAULT_ATTACKS = ("fgsm", "pgd", "pgdl2")
DEFAULT_EPS_L2 = (0.25, 0.5, 1.0, 1.5)
DEFAULT_EPS_LINF = (0.05, 0.1, 0.2)
_HARNESS_KEYS = ("step_fraction", "restarts")


@dataclass(frozen=True)
class AttackSpec:
    """One registered attack.

    ``cls``: a torchattacks class by name (``"PGD"``), another ``torchattacks.Attack``
    subclass as ``"module:Class"`` (``"attacks.deepfool:BatchedDeepFool"``), or a class.
    Names are imported only when an attack is built.
    ``norm``: the budget's norm, or ``None`` for a minimal (unbounded) L2 attack.
    ``params``: keyword arguments for the torchattacks constructor (besides the model,
    ``eps`` and ``alpha``, which the harness fills in). ``step_fraction``: the step size
    ``alpha = step_fraction · ε`` for classes that take one. ``restarts``: how many times
    the harness runs the attack from fresh random starts, keeping per sample the first
    success. ``seeded``/``needs_n_classes``: the class takes ``seed`` / ``n_classes``.
    """

    name: str
    cls: str | type
    norm: Norm | None
    params: Mapping[str, Any] = field(default_factory=dict)
    step_fraction: float | None = None
    restarts: int = 1
    seeded: bool = False
    needs_n_classes: bool = False
    description: str = ""

    @property
    def grid_norm(self) -> Norm:
        """The norm of the ε grid this attack is evaluated on (minimal attacks: L2)."""
        return self.norm or "l2"

    def with_overrides(self, overrides: Mapping[str, Any]) -> AttackSpec:
        """A copy with ``overrides`` applied: ``step_fraction`` and ``restarts`` go to the
        harness, everything else to the torchattacks constructor."""
        harness = {k: overrides[k] for k in _HARNESS_KEYS if k in overrides}
        params = {k: v for k, v in overrides.items() if k not in _HARNESS_KEYS}
        for reserved in ("model", "eps", "alpha", "seed", "n_classes"):
            if reserved in params:
                raise LipcertError(f"attack {self.name}: {reserved!r} is set by the harness "
                                   "and cannot be overridden")
        if "step_fraction" in harness and self.step_fraction is None:
            raise LipcertError(f"attack {self.name} has no step size to override")
        spec = replace(self, params={**self.params, **params}, **harness)
        if spec.restarts < 1 or (spec.step_fraction is not None and not spec.step_fraction > 0):
            raise LipcertError(f"attack {self.name}: restarts must be >= 1 and "
                               "step_fraction > 0")
        return spec

    def build(self, model: nn.Module, eps: float | None, *, n_classes: int, seed: int):
        """The torchattacks attack for ``model`` at budget ``eps`` (in the attacked space)."""
        import torchattacks

        kwargs: dict[str, Any] = dict(self.params)
        if self.norm is not None:
            kwargs["eps"] = eps
        if self.step_fraction is not None:
            kwargs["alpha"] = self.step_fraction * eps
        if self.seeded:
            kwargs["seed"] = seed
        if self.needs_n_classes:
            kwargs["n_classes"] = n_classes
        if isinstance(self.cls, type):
            cls = self.cls
        elif ":" in self.cls:
            module, _, attr = self.cls.partition(":")
            cls = getattr(importlib.import_module(module), attr)
        else:
            cls = getattr(torchattacks, self.cls)
        try:
            return cls(model, **kwargs)
        except TypeError as err:
            raise LipcertError(f"attack {self.name}: bad parameters for "
                               f"{self.class_name}: {err}") from err

    @property
    def class_name(self) -> str:
        """The attack class's qualified name, e.g. ``torchattacks.PGD``."""
        if isinstance(self.cls, type):
            return f"{self.cls.__module__}.{self.cls.__qualname__}"
        return self.cls.replace(":", ".") if ":" in self.cls else f"torchattacks.{self.cls}"

    def to_dict(self) -> dict[str, Any]:
        """The resolved settings, as recorded next to the results."""
        return {"name": self.name, "cls": self.class_name, "norm": self.norm,
                "params": dict(self.params), "step_fraction": self.step_fraction,
                "restarts": self.restarts}


def _entry(spec: AttackSpec) -> tuple[str, AttackSpec]:
    return spec.name, replace(spec, params=MappingProxyType(dict(spec.params)))


# Step sizes follow Madry et al.: α = 2.5·ε / steps, so the iterates can cross the ball.
# torchattacks' AutoAttack builds its own APGD/APGD-T/FAB/Square with torchattacks'
# defaults (APGD: 10 steps; Square: 5,000 queries); only ε, norm, seed and the number of
# classes are passed through.
REGISTRY: dict[str, AttackSpec] = dict(map(_entry, [
    AttackSpec("fgsm", "FGSM", "linf", description="fast gradient sign, one step"),
    AttackSpec("pgd", "PGD", "linf", {"steps": 20, "random_start": True},
               step_fraction=0.125, description="projected gradient descent, L∞"),
    AttackSpec("pgdl2", "PGDL2", "l2", {"steps": 20, "random_start": True},
               step_fraction=0.125, description="projected gradient descent, L2"),
    AttackSpec("apgd", "APGD", "linf", {"norm": "Linf", "steps": 50, "n_restarts": 1,
                                         "loss": "ce"},
               seeded=True, description="auto-PGD with cross-entropy loss, L∞"),
    AttackSpec("apgdl2", "APGD", "l2", {"norm": "L2", "steps": 50, "n_restarts": 1,
                                         "loss": "ce"},
               seeded=True, description="auto-PGD with cross-entropy loss, L2"),
    AttackSpec("autoattack", "AutoAttack", "linf", {"norm": "Linf", "version": "standard"},
               seeded=True, needs_n_classes=True,
               description="AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square), L∞"),
    AttackSpec("autoattackl2", "AutoAttack", "l2", {"norm": "L2", "version": "standard"},
               seeded=True, needs_n_classes=True,
               description="AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square), L2"),
    AttackSpec("cw", "CW", None, {"c": 1.0, "kappa": 0.0, "steps": 100, "lr": 0.01},
               description="Carlini-Wagner L2 (minimal; projected onto each L2 ball)"),
    AttackSpec("deepfool", "attacks.deepfool:BatchedDeepFool", None,
               {"steps": 50, "overshoot": 0.02},
               description="DeepFool, torchattacks' algorithm batched (minimal L2; "
               "projected onto each L2 ball)"),
]))


def resolve(name: str | AttackSpec, overrides: Mapping[str, Any] | None = None) -> AttackSpec:
    """The registry entry ``name`` (or a given spec) with ``overrides`` applied."""
    if isinstance(name, AttackSpec):
        spec = name
    elif name in REGISTRY:
        spec = REGISTRY[name]
    else:
        raise LipcertError(f"unknown attack {name!r}; known attacks: {', '.join(REGISTRY)}")
    return spec.with_overrides(overrides) if overrides else spec


def parse_attacks(text: str | Iterable[str]) -> list[str]:
    """``"fgsm,pgd"`` → ``["fgsm", "pgd"]``, each checked against ``REGISTRY``."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if not names:
        raise LipcertError("no attack given; known attacks: " + ", ".join(REGISTRY))
    for name in names:
        resolve(name)
    if len(set(names)) != len(names):
        raise LipcertError(f"attack listed twice in {','.join(names)}")
    return names


_NUMBER = re.compile(r"\s*([^/\s]+)\s*(?:/\s*([^/\s]+)\s*)?")


def parse_eps(text: str | Iterable[float], what: str = "eps") -> list[float]:
    """Parse an ε grid: ``"8/255,0.1"`` → ``[0.0313…, 0.1]``.

    Each item is a number or a fraction ``a/b``; every ε must be finite and > 0. Values
    keep the order given; duplicates are an error. An empty string gives an empty grid.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    values: list[float] = []
    for item in items:
        if isinstance(item, str):
            if not item.strip():
                continue
            match = _NUMBER.fullmatch(item)
            try:
                if match is None:
                    raise ValueError
                num, den = match.groups()
                value = float(Fraction(num) / Fraction(den)) if den else float(num)
            except (ValueError, ZeroDivisionError):
                raise LipcertError(f"{what}: cannot parse {item.strip()!r} as a number or a "
                                   "fraction like 8/255") from None
        else:
            value = float(item)
        if not math.isfinite(value) or value <= 0:
            raise LipcertError(f"{what}: every ε must be a finite number > 0, got {value}")
        values.append(value)
    if len(set(values)) != len(values):
        raise LipcertError(f"{what}: ε listed twice in {values}")
    return values


"""The demo pipeline on the embedded MNIST data, as Python calls: train, certify, attack,
report.

Train ``vit-mnist-lipschitz``, ``vit-mnist-standard`` and ``vit-mnist-certified`` (finished
runs in the output directory are reused), each within its share of a wall-clock training
budget; certify each globally (with the empirical lower bound, under its default budget)
and locally; attack each with FGSM, PGD and PGD-L2 with the local certificate's audit on
and the minimal-perturbation search; and build the report from the run directories. Every
stage is the function its ``lipcert`` subcommand calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attacks.run import attack_models
from lipcert.certify_run import certify_model
from lipcert.checkpoint import save_run
from lipcert.errors import LipcertError
from lipcert.presets import preset
from lipcert.train import train
from reports.build import BuiltReport, make_report

__all__ = ["MARGIN_PRESETS", "PRESETS", "TRAIN_SHARES", "DemoResult", "DemoSettings", "Stage",
           "demo_stages", "run_demo"]

# The certified ViT (d 128) costs about four times a step of the d-64 ViTs and needs the
# most steps to reach its certified accuracy, so it gets half of the training budget.
TRAIN_SHARES = {"vit-mnist-lipschitz": 0.25, "vit-mnist-standard": 0.25,
                "vit-mnist-certified": 0.5}
PRESETS = tuple(TRAIN_SHARES)
EPS_L2 = (0.1, 0.25, 0.5, 1.0)  # attacked and certified
# Certified only: the standard and paper-family ViTs' margin radii are of order 1e-2 and below.
EPS_L2_CERTIFIED = (0.001, 0.003, 0.01, 0.03, *EPS_L2)
# Margin certificates (symbolic remainders) for the two families whose local radii are small;
# the certified ViT's global radii already exceed them.
MARGIN_PRESETS = ("vit-mnist-lipschitz", "vit-mnist-standard")
EPS_LINF = (0.02, 0.05, 0.1)
ATTACKS = ("fgsm", "pgd", "pgdl2")


@dataclass(frozen=True)
class DemoSettings:
    """Where the runs and report go, how many samples each step uses, and the wall-clock
    seconds that the three trainings share (``TRAIN_SHARES``)."""

    out: Path = Path("runs/demo")
    n_certify: int = 1000
    n_local: int = 100
    n_margin: int = 30
    train_budget_s: float = 240.0

    def __post_init__(self) -> None:
        if self.n_certify < 1 or self.n_local < 1 or self.n_margin < 1:
            raise LipcertError("--n-certify, --n-local and --n-margin must be >= 1")
        if not self.train_budget_s > 0:
            raise LipcertError("the training budget must be > 0 seconds")


@dataclass(frozen=True)
class Stage:
    """One step of the demo: its name and the call that does it."""

    name: str
    run: Callable[[], Any]


@dataclass
class DemoResult:
    """The report, each stage's seconds, and the certificate violations the attacks found
    (one line per model; a sound pipeline has none)."""

    report: BuiltReport
    seconds: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def demo_stages(settings: DemoSettings, failures: list[str] | None = None) -> list[Stage]:
    """The demo's stages in order; the attack stages append violations to ``failures``."""
    out = settings.out
    found = failures if failures is not None else []
    stages = [Stage(f"train {name}", _trainer(name, out / name,
                                              settings.train_budget_s * share))
              for name, share in TRAIN_SHARES.items()
              if not (out / name / "config.json").is_file()]
    for name in PRESETS:
        run = out / name
        stages.append(Stage(f"certify {name} (global)", lambda run=run: certify_model(
            run, n=settings.n_certify, eps=EPS_L2_CERTIFIED,
            output=run / "certificate-global.json")))
        # The local certificate's radii are at least the global ones (certify keeps the
        # larger of the two, both sound), so the audit checks the stronger claim.
        stages.append(Stage(f"certify {name} (local)", lambda run=run: certify_model(
            run, n=settings.n_local, eps=EPS_L2_CERTIFIED, mode="local", lower=False,
            output=run / "certificate-local.json")))
        if name in MARGIN_PRESETS:
            stages.append(Stage(f"certify {name} (margin)", lambda run=run: certify_model(
                run, n=settings.n_margin, eps=EPS_L2_CERTIFIED, mode="margin", lower=False,
                output=run / "certificate-margin.json")))
        stages.append(Stage(f"attack {name}", lambda run=run, name=name: _attack(
            run, name, settings.n_local, found)))
    stages.append(Stage("report", lambda: make_report([out / p for p in PRESETS],
                                                      out / "report")))
    return stages


def run_demo(settings: DemoSettings,
             on_stage: Callable[[int, int, str, float | None], None] | None = None
             ) -> DemoResult:
    """Run every stage. ``on_stage(number, total, name, seconds)`` is called as stage
    ``number`` (from 1) starts, with ``seconds`` None, and as it ends, with its seconds."""
    failures: list[str] = []
    stages = demo_stages(settings, failures)
    seconds: dict[str, float] = {}
    report = None
    for number, stage in enumerate(stages, start=1):
        if on_stage is not None:
            on_stage(number, len(stages), stage.name, None)
        start = time.perf_counter()
        report = stage.run()
        seconds[stage.name] = time.perf_counter() - start
        if on_stage is not None:
            on_stage(number, len(stages), stage.name, seconds[stage.name])
    assert isinstance(report, BuiltReport)  # the last stage builds the report
    return DemoResult(report, seconds, failures)


def _trainer(name: str, run: Path, seconds: float) -> Callable[[], None]:
    def train_and_save() -> None:
        result = train(preset(name, max_time_s=seconds), progress=False)
        save_run(result, run, overwrite=True)
        if result.status != "finished":
            raise LipcertError(f"demo stage 'train {name}' failed: {result.status}")

    return train_and_save


def _attack(run: Path, name: str, n: int, failures: list[str]) -> None:
    outcome = attack_models(
        [run], data="mnist", attacks=ATTACKS, eps_l2=EPS_L2, eps_linf=EPS_LINF, n=n,
        certificates=[run / "certificate-local.json"], minimal=True, overwrite=True,
        output=run / "attacks.csv")
    if outcome.violation_count:
        failures.append(f"attack {name}: {outcome.violation_count} certificate violations "
                        f"(see {outcome.files['violations']})")

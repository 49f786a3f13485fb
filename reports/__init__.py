"""lipcert reports: certified radii set against empirical robustness, as a self-contained
HTML page, Markdown, CSV tables and PNG figures.

    from reports import build_report
    build_report(["runs/vit-mnist-lipschitz", "runs/vit-mnist-standard"], "report")

Names are imported on first use, so that ``import reports`` does not load matplotlib,
pandas and scipy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reports.build import BuiltReport, build_report, make_report
    from reports.runs import RunData, load_run, load_runs
    from reports.stats import clopper_pearson

_EXPORTS = {
    "BuiltReport": "reports.build", "build_report": "reports.build",
    "make_report": "reports.build", "RunData": "reports.runs", "load_run": "reports.runs",
    "load_runs": "reports.runs", "clopper_pearson": "reports.stats",
}
__all__ = ["BuiltReport", "RunData", "build_report", "clopper_pearson", "load_run",
           "load_runs", "make_report"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'reports' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

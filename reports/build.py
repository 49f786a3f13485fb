"""``build_report``: from run directories to a report directory, written atomically.

Output layout (``OUT_DIR``)::

    report.html        self-contained: inline CSS, figures as PNG data URIs, no scripts
    report.md          the same content in Markdown, figures linked from figures/
    figures/*.png      accuracy_vs_eps, layer_bounds, radius_vs_perturbation, tightness,
                       training (those the inputs allow)
    tables/*.csv       summary, robustness (long form), layers, samples, metadata, inputs
    .lipcert-report    marker: lets a later build replace this directory

The directory is built in a temporary directory beside ``OUT_DIR`` and renamed into place;
an existing report is replaced only once the new one is complete. Building twice from the
same inputs gives byte-identical files except for the one "Generated …" line of
``report.html`` and ``report.md`` (set ``SOURCE_DATE_EPOCH`` to fix that one too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd

from lipcert.atomic import atomic_directory
from lipcert.errors import LipcertError
from reports.figures import draw_all, model_colors
from reports.fmt import NORM_LABEL
from reports.render import ReportContent, render_html, render_markdown
from reports.runs import RunData, load_runs
from reports.stats import analyse, report_eps
from reports.tables import (
    accuracy_grid,
    inputs_table,
    layers_table,
    metadata_table,
    summary_table,
)

__all__ = ["BuiltReport", "build_report", "make_report"]

MARKER = ".lipcert-report"
CONVENTIONS = [
    "Norm: certificates are in the L2 norm of the whole input tensor, flattened (for text "
    "models, the embedded sequence); r∞ = r₂ / √n with n the number of input elements.",
    "Certified radius: r = (z_y − max_{j≠y} z_j) / (√2 · L), with L the logits' Lipschitz "
    "bound in L2; 0 for a misclassified input. Certified accuracy at ε: the fraction of "
    "samples with r > ε.",
    "Kinds of numbers: 'upper' is a certified (sound) upper bound; 'lower' an empirical "
    "witness (a Jacobian norm measured at some input); the paper formula is as recorded at "
    "training time and is not a certificate.",
    "Robust accuracy of an attack at ε: the fraction of samples on which it failed "
    "(misclassified samples count as broken at every ε). Worst case: a sample is robust "
    "only if no attack at that norm and ε succeeded (AutoAttack / RobustBench).",
    "Intervals: exact 95% Clopper–Pearson intervals for binomial proportions (scipy).",
    "Soundness violation: a successful adversarial example with ‖δ‖₂ < r₂ or ‖δ‖∞ < r∞ for "
    "its sample (or flagged by attacks.csv's violation column). A sound certificate has none.",
]


@dataclass
class BuiltReport:
    """What ``make_report`` wrote: the directory, the HTML page and the summary table."""

    out_dir: Path
    html: Path
    summary: pd.DataFrame


def build_report(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """Build the report of ``run_dirs`` in ``out_dir`` (see the module docstring) and return
    the path of its ``report.html``. Raises ``LipcertError`` on unusable input."""
    return make_report(run_dirs, out_dir).html


def make_report(run_dirs: list[str | Path], out_dir: str | Path, *,
                eps_l2: list[float] | None = None, eps_linf: list[float] | None = None,
                title: str = "lipcert report", now: datetime | None = None) -> BuiltReport:
    """``build_report`` with options: the report's ε values (default: those of the
    certificates and attacks), the title, and the time stamped on the report (default:
    ``SOURCE_DATE_EPOCH`` if set, else now)."""
    runs = load_runs(list(run_dirs))
    out = Path(out_dir)
    _check_out_dir(out, runs)
    default_l2, default_linf = report_eps(runs)
    eps_l2 = sorted(set(default_l2 if eps_l2 is None else eps_l2))
    eps_linf = sorted(set(default_linf if eps_linf is None else eps_linf))
    analyses = [analyse(run, eps_l2, eps_linf) for run in runs]
    colors = model_colors([r.name for r in runs])
    figures, skipped = draw_all(analyses, colors)
    summary = summary_table(analyses, eps_l2, eps_linf)
    robustness = pd.concat([a.robustness for a in analyses], ignore_index=True)
    samples = pd.concat([a.samples for a in analyses if len(a.samples)] or
                        [analyses[0].samples], ignore_index=True)
    grids = {f"{NORM_LABEL[n]} threat model": accuracy_grid(robustness, n)
             for n in ("l2", "linf")}
    content = ReportContent(
        title=title, generated=_generated_line(now), colors=colors, summary=summary,
        accuracy_grids={k: v for k, v in grids.items() if not v.empty},
        layers=layers_table(runs), metadata=metadata_table(runs), inputs=inputs_table(runs),
        figures=figures, skipped=skipped, notices=_notices(runs), eps_l2=eps_l2,
        eps_linf=eps_linf, conventions=CONVENTIONS,
    )
    tables = {"summary": summary, "robustness": robustness, "layers": content.layers,
              "samples": samples, "metadata": content.metadata, "inputs": content.inputs}
    with atomic_directory(out, f"the report to {out}") as tmp:
        _write(tmp, content, tables)
    return BuiltReport(out, out / "report.html", summary)


def _generated_line(now: datetime | None) -> str:
    if now is None:
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        now = (datetime.fromtimestamp(int(epoch), tz=timezone.utc) if epoch and epoch.isdigit()
               else datetime.now(timezone.utc))
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    try:
        version = metadata.version("lipcert")
    except metadata.PackageNotFoundError:
        version = "unknown"
    stamp = now.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"Generated {stamp} by lipcert {version}"


def _notices(runs: list[RunData]) -> list[str]:
    notes = []
    for run in runs:
        notes += [f"{run.name}: {w}" for w in run.warnings]
        if run.missing:
            notes.append(f"{run.name}: missing " + "; ".join(run.missing))
    return notes


def _check_out_dir(out: Path, runs: list[RunData]) -> None:
    target = out.resolve()
    for run in runs:
        src = run.path.resolve()
        if target == src or target in src.parents:
            raise LipcertError(f"the output directory {out} would replace the run directory "
                               f"{run.path}; choose another -o")
    if out.exists() and not out.is_dir():
        raise LipcertError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise LipcertError(f"{out} exists and is not a lipcert report directory; refusing to "
                           "replace it (choose a new or empty directory)")


def _write(root: Path, content: ReportContent, tables: dict[str, pd.DataFrame]) -> None:
    (root / "figures").mkdir()
    (root / "tables").mkdir()
    for fig in content.figures:
        (root / "figures" / fig.filename).write_bytes(fig.png)
    for name, df in tables.items():
        with open(root / "tables" / f"{name}.csv", "w", encoding="utf-8", newline="") as f:
            df.to_csv(f, index=False, lineterminator="\n")
    (root / "report.html").write_text(render_html(content), encoding="utf-8")
    (root / "report.md").write_text(render_markdown(content), encoding="utf-8")
    (root / MARKER).write_text("lipcert report directory (safe to replace by "
                               "`lipcert report`)\n", encoding="utf-8")

"""The report's figures (matplotlib, Agg, no pyplot state), as reproducible PNG bytes.

Each model keeps one colour in every figure (``model_colors``); red is kept for soundness
violations. Every figure function returns a ``Figure`` (PNG bytes, title, caption), or
``None`` when no run has the data it needs; ``skipped`` then says why.

Reproducibility: figures are drawn under matplotlib's default style with the settings of
``STYLE`` (so a user's matplotlibrc changes nothing), and saved without the ``Software``
PNG text chunk; with the same inputs the PNG bytes are identical.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MplFigure
from matplotlib.lines import Line2D

from reports.fmt import NORM_LABEL, num
from reports.stats import ModelAnalysis, certified_counts, certified_sources, clopper_pearson

__all__ = ["FIGURES", "Figure", "draw_all", "model_colors"]

# tab10 without its red, which marks violations.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
VIOLATION = "#d62728"
DPI = 100
STYLE = {
    "font.family": "DejaVu Sans", "font.size": 10, "axes.titlesize": 11,
    "axes.labelsize": 10, "legend.fontsize": 9, "axes.grid": True, "grid.alpha": 0.3,
    "axes.spines.top": False, "axes.spines.right": False, "svg.hashsalt": "lipcert",
    "savefig.facecolor": "white", "figure.facecolor": "white",
}
ATTACK_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


@dataclass
class Figure:
    """One rendered figure."""

    name: str
    title: str
    caption: str
    png: bytes

    @property
    def filename(self) -> str:
        """The file name under ``figures/``."""
        return f"{self.name}.png"


def model_colors(names: list[str]) -> dict[str, str]:
    """One colour per model, in the order the models were given."""
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def _png(fig: MplFigure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _model_legend(fig: MplFigure, colors: dict[str, str]) -> None:
    handles = [Line2D([], [], color=c, lw=6, solid_capstyle="butt") for c in colors.values()]
    fig.legend(handles, list(colors), loc="upper center", ncol=min(len(colors), 4),
               frameon=False, title="model", title_fontsize=9, bbox_to_anchor=(0.5, 1.0))


def _top(fig: MplFigure, n_models: int) -> float:
    """Fraction of the figure height left for the panels under the model legend."""
    rows = (n_models - 1) // 4 + 1
    return 1 - (0.28 + 0.24 * rows) / fig.get_figheight()


# (a) ------------------------------------------------------------------------------------

def accuracy_vs_eps(analyses: list[ModelAnalysis], colors: dict[str, str]) -> MplFigure | None:
    """Certified accuracy against ε as curves (with 95% bands), robust accuracy per attack as
    points with 95% error bars; L2 on the left, L∞ (when attacked) on the right."""
    attacks = pd.concat([a.run.attacks for a in analyses if a.run.attacks is not None] or
                        [pd.DataFrame(columns=["norm", "eps", "attack"])])
    has_cert = any(certified_sources(a.run, a.samples) for a in analyses)
    if not has_cert and attacks.empty:
        return None
    norms = ["l2"] + (["linf"] if (attacks["norm"] == "linf").any() else [])
    names = sorted(set(attacks["attack"]))
    markers = {n: ATTACK_MARKERS[i % len(ATTACK_MARKERS)] for i, n in enumerate(names)}
    fig = MplFigure(figsize=(6.2 * len(norms) if len(norms) > 1 else 8.5, 5.2))
    axes = fig.subplots(1, len(norms), squeeze=False)[0]
    styles: dict[str, Line2D] = {}
    for ax, norm in zip(axes, norms, strict=True):
        styles.update(_accuracy_panel(ax, norm, analyses, colors, attacks, markers))
    _model_legend(fig, colors)
    _style_legend(fig, styles)
    fig.tight_layout(rect=(0, _bottom(fig), 1, _top(fig, len(colors))))
    return fig


def _style_legend(fig: MplFigure, styles: dict[str, Line2D]) -> None:
    if styles:
        fig.legend(list(styles.values()), list(styles), loc="lower center",
                   ncol=min(len(styles), 5), frameon=False, bbox_to_anchor=(0.5, 0.0))


def _bottom(fig: MplFigure) -> float:
    """Fraction of the figure height kept for a one-row legend under the panels."""
    return 0.42 / fig.get_figheight()


def _eps_max(norm: str, analyses: list[ModelAnalysis], attacks: pd.DataFrame) -> float:
    grid = attacks.loc[attacks["norm"] == norm, "eps"]
    values = list(grid) + [e for a in analyses for e in
                           a.robustness.loc[a.robustness["norm"] == norm, "eps"]]
    if values and max(values) > 0:
        return float(max(values))
    radii = pd.concat([a.samples[f"radius_{norm}"] for a in analyses]).astype(float)
    radii = radii[np.isfinite(radii) & (radii > 0)]
    return float(radii.quantile(0.95)) * 1.2 if len(radii) else 1.0


def _accuracy_panel(ax: Axes, norm: str, analyses: list[ModelAnalysis], colors: dict[str, str],
                    attacks: pd.DataFrame, markers: dict[str, str]) -> dict[str, Line2D]:
    top = _eps_max(norm, analyses, attacks) * 1.05
    grid = np.unique(np.concatenate([np.linspace(0, top, 400),
                                     attacks.loc[attacks["norm"] == norm, "eps"].to_numpy(
                                         dtype=float)]))
    styles: dict[str, Line2D] = {}
    dodge = top * 0.008
    for i, a in enumerate(analyses):
        color = colors[a.name]
        sources = certified_sources(a.run, a.samples)
        shown = [s for s in sources if s != "certified (best)"] or list(sources)
        for s in shown:
            counts, n = certified_counts(sources[s][f"radius_{norm}"].to_numpy(), grid)
            if n == 0:
                continue
            ls = "--" if s.endswith("(global)") else "-"
            ax.plot(grid, 100 * counts / n, color=color, ls=ls, lw=2, drawstyle="steps-post")
            if s == shown[-1]:
                lo, hi = clopper_pearson(counts, n)
                ax.fill_between(grid, 100 * lo, 100 * hi, color=color, alpha=0.13, lw=0,
                                step="post")
            styles[s] = Line2D([], [], color="black", ls=ls, lw=2)
        r = a.robustness
        r = r[(r["norm"] == norm) & (r["kind"] == "attack")]
        offset = (i - (len(analyses) - 1) / 2) * dodge
        for attack, g in r.groupby("source", sort=True):
            acc = 100 * g["accuracy"].to_numpy()
            yerr = np.vstack([acc - 100 * g["ci_low"].to_numpy(),
                              100 * g["ci_high"].to_numpy() - acc])
            ax.errorbar(g["eps"].to_numpy() + offset, acc, yerr=yerr, color=color, ls=":",
                        lw=1.2, marker=markers[attack], ms=6, capsize=3, mfc="white",
                        mew=1.5)
            styles[f"robust: {attack}"] = Line2D([], [], color="black", ls=":",
                                                 marker=markers[attack], mfc="white")
    ax.set_xlim(-top * 0.02, top * 1.04)
    ax.set_ylim(-3, 103)
    label = NORM_LABEL[norm]
    sub = "2" if norm == "l2" else "∞"
    ax.set_xlabel(f"perturbation budget ε  (‖δ‖{sub}, input units)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{label} threat model: certified vs robust accuracy")
    return styles


# (b) ------------------------------------------------------------------------------------

def _union_order(lists: list[list[str]]) -> list[str]:
    order: list[str] = []
    for names in lists:
        pos = -1
        for n in names:
            if n in order:
                pos = order.index(n)
            else:
                order.insert(pos + 1, n)
                pos += 1
    return order


def layer_bounds(analyses: list[ModelAnalysis], colors: dict[str, str]) -> MplFigure | None:
    """Per-layer certified Lipschitz upper bounds (log scale), one series per model, with each
    model's global bound of the logits as a dashed line."""
    tables = [(a, a.run.certificate.layers) for a in analyses
              if a.run.certificate is not None and len(a.run.certificate.layers)]
    if not tables:
        return None
    order = _union_order([list(t["layer"]) for _, t in tables])
    pos = {n: i for i, n in enumerate(order)}
    fig = MplFigure(figsize=(max(8.5, 3 + 0.42 * len(order)), 5.6))
    ax = fig.subplots()
    finite_max = 1.0
    for a, t in tables:
        color = colors[a.name]
        values = t["upper"].to_numpy(dtype=float)
        finite = np.isfinite(values) & (values > 0)
        x = t["layer"].map(pos).to_numpy()
        order_ = np.argsort(x, kind="stable")
        y = np.where(finite, values, np.nan)
        ax.plot(x[order_], y[order_], color=color, marker="o", lw=1.5, ms=6)
        if finite.any():
            finite_max = max(finite_max, float(values[finite].max()))
        upper = a.run.certificate.upper
        if math.isfinite(upper) and upper > 0:
            ax.axhline(upper, color=color, ls="--", lw=1.2)
            finite_max = max(finite_max, upper)
        for xi in x[~finite]:
            ax.plot([xi], [0.97], marker="^", color=color, ms=9, ls="",
                    transform=ax.get_xaxis_transform(), clip_on=False)
            ax.annotate("∞", (xi, 0.97), xytext=(8, -4), textcoords="offset points",
                        xycoords=ax.get_xaxis_transform(), color=color, fontsize=12)
    ax.set_yscale("log")
    ax.set_xticks(range(len(order)), order, rotation=40, ha="right", fontsize=8.5)
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.set_xlabel("layer (module of the model)")
    ax.set_ylabel("Lipschitz upper bound (L2 → L2, certified)")
    ax.set_title("Per-layer Lipschitz upper bounds, one series per model")
    handles = [Line2D([], [], color="black", marker="o"), Line2D([], [], color="black",
                                                                  ls="--")]
    labels = ["layer bound", "global bound (logits)"]
    if any((~np.isfinite(t["upper"].to_numpy(dtype=float))).any() for _, t in tables):
        handles.append(Line2D([], [], color="black", marker="^", ls=""))
        labels.append("no finite bound (∞)")
    _style_legend(fig, dict(zip(labels, handles, strict=True)))
    _model_legend(fig, colors)
    fig.tight_layout(rect=(0, _bottom(fig), 1, _top(fig, len(colors))))
    return fig


# (c) ------------------------------------------------------------------------------------

def radius_vs_perturbation(analyses: list[ModelAnalysis], colors: dict[str, str]
                           ) -> MplFigure | None:
    """Per sample: certified radius (y) against the smallest adversarial perturbation found
    (x), log–log, with y = x. Points above the line are soundness violations (red)."""
    frames = [a.samples.assign(model=a.name) for a in analyses
              if len(a.samples) and a.samples["radius_l2"].notna().any()
              and a.samples["min_adv_l2"].notna().any()]
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    r = df["radius_l2"].astype(float)
    d = df["min_adv_l2"].astype(float)
    shown = r.notna() & (r > 0) & ~(d <= 0)
    hidden = int((r.notna() & ~shown).sum())
    violations = int(df.groupby("model")["violation"].sum().sum())
    pos = pd.concat([r[shown], d[shown & d.notna()]])
    lo = float(pos.min()) / 3 if len(pos) else 1e-3
    hi = float(pos.max()) * 3 if len(pos) else 1.0
    edge = hi
    fig = MplFigure(figsize=(8.5, 6.4))
    ax = fig.subplots()
    ax.fill_between([lo, hi * 10], [lo, hi * 10], [hi * 10, hi * 10], color=VIOLATION,
                    alpha=0.06, lw=0)
    ax.plot([lo, hi * 10], [lo, hi * 10], color="black", lw=1.2)
    for a in analyses:
        m = shown & (df["model"] == a.name)
        ok = m & ~df["violation"].astype(bool)
        found = ok & d.notna()
        ax.scatter(d[found], r[found], s=18, color=colors[a.name], alpha=0.75, lw=0)
        none = ok & d.isna()
        if none.any():
            ax.scatter(np.full(int(none.sum()), edge), r[none], s=28, marker=">",
                       facecolors="none", edgecolors=colors[a.name], lw=1)
    bad = shown & df["violation"].astype(bool)
    ax.scatter(d[bad].fillna(edge), r[bad], s=70, marker="X", color=VIOLATION, zorder=5,
               edgecolors="black", lw=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi * 1.3)
    ax.set_ylim(lo, hi * 1.3)
    ax.set_xlabel("smallest adversarial perturbation found, ‖δ‖₂ (input units)")
    ax.set_ylabel("certified radius r₂ (input units)")
    title = f"Certified radius vs smallest adversarial perturbation: {violations} violation" \
        + ("" if violations == 1 else "s")
    ax.set_title(title, color=VIOLATION if violations else "black", fontweight="bold")
    handles = [Line2D([], [], color="black", lw=1.2),
               Line2D([], [], ls="", marker="o", color="grey", ms=5),
               Line2D([], [], ls="", marker=">", mfc="none", color="grey", ms=6),
               Line2D([], [], ls="", marker="X", color=VIOLATION, mec="black", ms=9)]
    labels = ["y = x (a sound certificate keeps every point on or under it)",
              "sample", "no adversarial example found (drawn at the right edge)",
              "violation: adversarial example inside the certified radius"]
    ax.legend(handles, labels, loc="upper left", framealpha=0.9, fontsize=8.5)
    if hidden:
        ax.text(0.99, 0.01, f"{hidden} sample(s) with radius 0 (misclassified) not shown",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=8.5, color="dimgray")
    _model_legend(fig, colors)
    fig.tight_layout(rect=(0, 0, 1, _top(fig, len(colors))))
    return fig


# (d) ------------------------------------------------------------------------------------

def tightness(analyses: list[ModelAnalysis], colors: dict[str, str]) -> MplFigure | None:
    """Global certified upper bound against the empirical lower bound, per model (log x)."""
    rows = []
    for a in analyses:
        cert = a.run.certificate
        metrics = ((a.run.config or {}).get("metrics") or {})
        paper = metrics.get("lipschitz_paper_formula")
        paper = float(paper) if isinstance(paper, int | float) else math.nan
        if cert is not None or math.isfinite(paper):
            rows.append((a.name, cert.upper if cert else math.nan,
                         cert.lower if cert else math.nan, paper))
    if not rows:
        return None
    values = [v for _, *vs in rows for v in vs if math.isfinite(v) and v > 0]
    lo = min(values) / 4 if values else 0.1
    hi = max(values) * 40 if values else 10.0
    fig = MplFigure(figsize=(8.5, 1.6 + 0.75 * len(rows) + 0.6))
    ax = fig.subplots()
    for y, (name, upper, lower, paper) in enumerate(rows):
        color = colors[name]
        up = upper if math.isfinite(upper) else hi
        if math.isfinite(lower) and lower > 0:
            ax.plot([lower, up], [y, y], color=color, lw=3, alpha=0.5)
            ax.plot([lower], [y], "o", color=color, mfc="white", mew=2, ms=10)
        if not math.isnan(upper):
            ax.plot([up], [y], "s" if math.isfinite(upper) else ">", color=color, ms=10,
                    clip_on=False)
            gap = upper / lower if lower > 0 else math.nan
            text = "upper = ∞ (no finite bound)" if math.isinf(upper) else (
                f"gap ×{num(gap)}" if math.isfinite(gap) else "no lower bound")
            at = max(up, paper) if math.isfinite(paper) else up
            ax.annotate(text, (at, y), xytext=(12, 0) if math.isfinite(upper) else (0, 12),
                        textcoords="offset points", va="center", fontsize=9,
                        ha="left" if math.isfinite(upper) else "right")
        if math.isfinite(paper):
            ax.plot([paper], [y], "D", color=color, mfc="none", mew=1.5, ms=8)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(len(rows) - 0.4, -0.6)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    for tick, (name, *_) in zip(ax.get_yticklabels(), rows, strict=True):
        tick.set_color(colors[name])
    ax.set_xlabel("Lipschitz constant of the logits (L2 → L2, log scale)")
    ax.set_title("Tightness: certified upper bound vs empirical lower bound")
    handles = [Line2D([], [], ls="", marker="s", color="black", ms=8),
               Line2D([], [], ls="", marker="o", color="black", mfc="white", ms=8),
               Line2D([], [], ls="", marker="D", color="black", mfc="none", ms=7)]
    labels = ["upper (certified, global)", "lower (empirical witness)",
              "paper formula (config.json)"]
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    ax.grid(True, axis="x", which="both", alpha=0.2)
    fig.tight_layout(rect=(0, _bottom(fig), 1, 1))
    return fig


# (e) ------------------------------------------------------------------------------------

def training_curves(analyses: list[ModelAnalysis], colors: dict[str, str]) -> MplFigure | None:
    """Training loss and accuracy (smoothed, raw faint) and validation points, per model."""
    logs = [(a, a.run.train_log) for a in analyses
            if a.run.train_log is not None and len(a.run.train_log)]
    if not logs:
        return None
    fig = MplFigure(figsize=(12.4, 4.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for a, log in logs:
        color = colors[a.name]
        window = max(1, len(log) // 25)
        for ax, train, val, scale in ((ax_loss, "loss", "val_loss", 1.0),
                                      (ax_acc, "train_acc", "val_acc", 100.0)):
            t = log[["step", train]].dropna()
            if len(t):
                ax.plot(t["step"], scale * t[train], color=color, alpha=0.2, lw=0.8)
                smooth = t[train].rolling(window, min_periods=1).mean()
                ax.plot(t["step"], scale * smooth, color=color, lw=1.8)
            v = log[["step", val]].dropna()
            if len(v):
                ax.plot(v["step"], scale * v[val], color=color, ls="--", marker="o", ms=4,
                        lw=1.2)
    ax_loss.set_ylabel("cross-entropy loss (nats)")
    ax_acc.set_ylabel("accuracy (%)")
    ax_loss.set_title("Loss")
    ax_acc.set_title("Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("training step")
        ax.legend([Line2D([], [], color="black", lw=1.8),
                   Line2D([], [], color="black", ls="--", marker="o", ms=4)],
                  ["train (moving average; raw faint)", "validation"], framealpha=0.9)
    _model_legend(fig, colors)
    fig.tight_layout(rect=(0, 0, 1, _top(fig, len(colors))))
    return fig


Draw = Callable[[list[ModelAnalysis], dict[str, str]], "MplFigure | None"]
FIGURES: list[tuple[str, str, Draw, str, str]] = [
    ("accuracy_vs_eps", "Certified and robust accuracy against ε", accuracy_vs_eps,
     "Lines: certified accuracy (fraction of samples whose certified radius exceeds ε; dashed "
     "global, solid local certificate), with its 95% Clopper–Pearson band. Points: robust "
     "accuracy under each attack at each ε, with 95% Clopper–Pearson error bars (points of "
     "different models are shifted slightly sideways so that their bars do not overlap). "
     "A sound certificate keeps each model's certified curve at or below its robust points.",
     "no certificate with per-sample radii and no attacks.csv in any run"),
    ("layer_bounds", "Per-layer Lipschitz upper bounds", layer_bounds,
     "Certified upper bound of each layer's Lipschitz constant on its own (log scale; "
     "nested modules are listed after their parent); the dashed line is the model's global "
     "bound of the logits.",
     "no certificate with a per-layer table in any run"),
    ("radius_vs_perturbation", "Certified radius vs smallest adversarial perturbation",
     radius_vs_perturbation,
     "Each point is one sample: its certified L2 radius (largest over the certificates) "
     "against the smallest L2 perturbation that changed its prediction (minimal.csv and the "
     "successful rows of attacks.csv). Every point must lie on or under y = x; a point above "
     "it is an adversarial example inside a certified ball, a soundness violation (red).",
     "needs per-sample certified radii and adversarial perturbations (attacks.csv or "
     "minimal.csv) for the same model"),
    ("tightness", "Tightness of the global bound", tightness,
     "Squares: certified global upper bound of the logits' Lipschitz constant; circles: the "
     "empirical lower bound (a Jacobian norm measured at some input); the true constant lies "
     "between them, and the gap is their ratio. Diamonds: the paper's formula as recorded "
     "at training time.",
     "no certificate in any run"),
    ("training", "Training curves", training_curves,
     "Training loss and accuracy per step (moving average, raw values faint) and the "
     "validation evaluations (dashed, dots).",
     "no train_log.csv in any run"),
]


def draw_all(analyses: list[ModelAnalysis], colors: dict[str, str]
             ) -> tuple[list[Figure], dict[str, str]]:
    """Every figure that the data allows, and for the others the reason they are missing."""
    drawn, skipped = [], {}
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(STYLE)
        for name, title, draw, caption, why in FIGURES:
            fig = draw(analyses, colors)
            if fig is None:
                skipped[title] = why
            else:
                drawn.append(Figure(name, title, caption, _png(fig)))
    return drawn, skipped

"""Writing the report as self-contained HTML (inline CSS, figures as data URIs, no scripts,
no network) and as Markdown, plus the plain-text summary for the terminal."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass

import pandas as pd

from reports.figures import Figure
from reports.fmt import cell, num, pct
from reports.tables import summary_groups

__all__ = ["ReportContent", "render_html", "render_markdown", "summary_cells", "summary_text"]

CSS = """
:root { --ink: #1d232b; --muted: #5b6673; --line: #d8dee6; --bg: #f6f8fa; --bad: #c62828;
        --good: #2e7d32; --warn-bg: #fff8e1; --warn-line: #f0c36d; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
       color: var(--ink); margin: 0; background: white; }
main { max-width: 1480px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 28px; margin: 0 0 4px; }
h2 { font-size: 21px; margin: 36px 0 10px; padding-bottom: 4px;
     border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; }
p.generated, p.lede { color: var(--muted); margin: 2px 0; }
.notice { background: var(--warn-bg); border: 1px solid var(--warn-line); border-radius: 6px;
          padding: 8px 14px; margin: 14px 0; }
.notice ul { margin: 4px 0; padding-left: 20px; }
.scroll { overflow-x: auto; margin: 8px 0 4px; }
table { border-collapse: collapse; font-size: 13.5px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 4px 8px; }
th { background: var(--bg); font-weight: 600; text-align: center; vertical-align: bottom; }
td { text-align: right; white-space: nowrap; }
td.text { text-align: left; }
tbody tr:nth-child(even) td { background: #fbfcfd; }
td.bad { color: var(--bad); font-weight: 700; }
td.good { color: var(--good); }
td.sha { font-family: monospace; font-size: 12px; }
td.wrap { white-space: normal; min-width: 320px; text-align: left; }
td.yes { text-align: center; color: var(--good); }
table.fields td { text-align: left; white-space: normal; overflow-wrap: anywhere;
                  max-width: 420px; }
table.fields td:first-child { font-weight: 600; white-space: nowrap; }
#summary td:first-child, #summary th:first-child { position: sticky; left: 0; z-index: 1;
  background: white; box-shadow: 1px 0 0 var(--line); }
#summary th:first-child { background: var(--bg); }
#summary th, #summary td { padding: 4px 6px; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px;
          margin-right: 6px; vertical-align: -1px; }
figure { margin: 18px 0 30px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line);
             border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 6px; max-width: 960px; }
figcaption b { color: var(--ink); }
.note { color: var(--muted); font-size: 13.5px; max-width: 960px; }
code { background: var(--bg); padding: 1px 4px; border-radius: 3px; }
"""


@dataclass
class ReportContent:
    """Everything the writers need, already computed."""

    title: str
    generated: str
    colors: dict[str, str]
    summary: pd.DataFrame
    accuracy_grids: dict[str, pd.DataFrame]
    layers: pd.DataFrame
    metadata: pd.DataFrame
    inputs: pd.DataFrame
    figures: list[Figure]
    skipped: dict[str, str]
    notices: list[str]
    eps_l2: list[float]
    eps_linf: list[float]
    conventions: list[str]


def _is_accuracy(column: str) -> bool:
    return column == "clean acc" or bool(summary_groups([column])[0][0])


def summary_cells(summary: pd.DataFrame) -> list[list[str]]:
    """The summary table's cells as text: accuracies in %, bounds to 4 significant digits."""
    rows = []
    for _, rec in summary.iterrows():
        row = []
        for c in summary.columns:
            v = rec[c]
            text = pct(v) if _is_accuracy(c) else num(v) if c in (
                "Lipschitz upper", "Lipschitz lower", "ratio") else cell(v)
            row.append(text or ("—" if c != "model" else text))
        rows.append(row)
    return rows


def summary_text(summary: pd.DataFrame) -> str:
    """The summary for a terminal: one column per model, one line per quantity (accuracies
    in %; quantities that no model has are left out)."""
    cells = summary_cells(summary)
    labels = [c + (" (%)" if _is_accuracy(c) else "") for c in summary.columns]
    rows = [[label, *(row[i] for row in cells)] for i, label in enumerate(labels)
            if i and any(row[i] not in ("", "—") for row in cells)]
    return pd.DataFrame(rows).to_markdown(
        index=False, headers=[labels[0], *(row[0] for row in cells)], tablefmt="simple",
        disable_numparse=True, colalign=("left", *("right",) * len(cells)))


# HTML -----------------------------------------------------------------------------------

def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _td(value: str, column: str) -> str:
    cls = []
    if column in ("model", "family", "arch", "dataset", "source", "layer", "kind_of_layer",
                  "kind", "certificate", "missing", "run directory", "status", "preset",
                  "optimizer", "constraint", "certificates", "certified data", "device",
                  "date (UTC)") or column.startswith("version"):
        cls.append("text")
    if column == "weights sha256":
        cls.append("sha text")
    if column == "missing":
        cls = ["wrap"]
    if value == "✓":
        cls = ["yes"]
    if column == "violations" and value not in ("", "—"):
        cls.append("bad" if value != "0" else "good")
    attr = f' class="{" ".join(cls)}"' if cls else ""
    return f"<td{attr}>{_e(value)}</td>"


def _swatch(color: str | None) -> str:
    return f'<span class="swatch" style="background:{color}"></span>' if color else ""


def _model_td(name: str, colors: dict[str, str]) -> str:
    return f'<td class="text">{_swatch(colors.get(name))}{_e(name)}</td>'


def _html_table(df: pd.DataFrame, colors: dict[str, str], table_id: str,
                cells: list[list[str]] | None = None, grouped: bool = False) -> str:
    if df.empty:
        return '<p class="note">(nothing to show)</p>'
    columns = [str(c) for c in df.columns]
    cells = cells or [[cell(v) for v in rec] for rec in df.itertuples(index=False)]
    head = []
    if grouped:
        groups = summary_groups(columns)
        top, i = [], 0
        while i < len(groups):
            g = groups[i][0]
            j = i
            while j < len(groups) and groups[j][0] == g:
                j += 1
            if g:
                top.append(f'<th colspan="{j - i}">{_e(g)}</th>')
            else:
                top += [f'<th rowspan="2">{_e(groups[k][1])}'
                        f'{" (%)" if groups[k][1] == "clean acc" else ""}</th>'
                        for k in range(i, j)]
            i = j
        head.append("<tr>" + "".join(top) + "</tr>")
        head.append("<tr>" + "".join(f"<th>{_e(s)}</th>" for g, s in groups if g) + "</tr>")
    else:
        head.append("<tr>" + "".join(
            f"<th>{_swatch(colors.get(c))}{_e(c)}</th>" for c in columns) + "</tr>")
    body = []
    for row in cells:
        tds = [(_model_td(v, colors) if c == "model" else _td(v, c))
               for c, v in zip(columns, row, strict=True)]
        body.append("<tr>" + "".join(tds) + "</tr>")
    cls = ' class="fields"' if columns[0] == "field" else ""
    return (f'<div class="scroll"><table id="{table_id}"{cls}><thead>{"".join(head)}</thead>'
            f'<tbody>\n{chr(10).join(body)}\n</tbody></table></div>')


def fields_by_model(df: pd.DataFrame) -> pd.DataFrame:
    """A one-row-per-model table turned around: one row per field, one column per model
    (easier to read for many fields, such as the run metadata)."""
    if df.empty:
        return df
    out = {"field": [str(c) for c in df.columns[1:]]}
    for rec in df.itertuples(index=False):
        out[str(rec[0])] = [cell(v) for v in rec[1:]]
    return pd.DataFrame(out)


def _figure_html(fig: Figure, letter: str) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (f'<figure id="fig-{fig.name}"><img src="data:image/png;base64,{data}" '
            f'alt="{_e(fig.title)}">\n<figcaption><b>Figure {letter}. {_e(fig.title)}.</b> '
            f"{_e(fig.caption)}</figcaption></figure>")


def render_html(c: ReportContent) -> str:
    """The whole report as one self-contained HTML page."""
    models = ", ".join(
        f'<span class="swatch" style="background:{col}"></span>{_e(m)}'
        for m, col in c.colors.items())
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        'img-src data:; style-src \'unsafe-inline\'">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(c.title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{_e(c.title)}</h1>",
        f'<p class="generated">{_e(c.generated)}</p>',
        f'<p class="lede">Models: {models}</p>',
    ]
    if c.notices:
        items = "".join(f"<li>{_e(n)}</li>" for n in c.notices)
        parts.append(f'<div class="notice"><b>Notes on the inputs</b><ul>{items}</ul></div>')
    parts += ["<h2>Model summary</h2>",
              _html_table(c.summary, c.colors, "summary", summary_cells(c.summary),
                          grouped=True),
              f'<p class="note">{_e(_summary_note(c))}</p>', "<h2>Figures</h2>"]
    letters = "abcdefghij"
    parts += [_figure_html(f, letters[i]) for i, f in enumerate(c.figures)]
    if c.skipped:
        items = "".join(f"<li>{_e(t)}: {_e(w)}</li>" for t, w in c.skipped.items())
        parts.append(f'<div class="notice"><b>Figures not drawn</b><ul>{items}</ul></div>')
    parts.append("<h2>Accuracy at each ε (%, with 95% Clopper–Pearson interval)</h2>")
    if not c.accuracy_grids:
        parts.append('<p class="note">(no certified or robust accuracies)</p>')
    for norm, grid in c.accuracy_grids.items():
        parts += [f"<h3>{_e(norm)}</h3>", _html_table(grid, c.colors, f"accuracy-{norm}")]
    parts += ["<h2>Per-layer Lipschitz upper bounds</h2>",
              _html_table(c.layers, c.colors, "layers"),
              "<h2>Run metadata</h2>",
              _html_table(fields_by_model(c.metadata), c.colors, "metadata"),
              "<h2>Inputs</h2>", _html_table(_inputs(c), c.colors, "inputs"),
              f'<p class="note">{_e(INPUTS_NOTE)}</p>',
              "<h2>Conventions</h2><ul>"
              + "".join(f'<li class="note">{_e(x)}</li>' for x in c.conventions) + "</ul>",
              "</main></body></html>", ""]
    return "\n".join(parts)


INPUTS_NOTE = ("✓: the file was found in the run directory. What each missing file leaves "
               "out of this report is listed under 'Notes on the inputs' at the top.")


def _inputs(c: ReportContent) -> pd.DataFrame:
    return c.inputs.drop(columns=["missing"], errors="ignore")


def _summary_note(c: ReportContent) -> str:
    return ("One row per model. Accuracies in %: clean accuracy; under each threat model and "
            "ε, 'certified' is the certified accuracy (largest sound radius per sample), each "
            "attack's robust accuracy, and 'worst case' the per-sample worst case over the "
            "attacks (a sample counts as robust only if no attack succeeded). Lipschitz upper "
            "is the certified global bound of the logits (L2), lower an empirical witness, "
            "ratio their quotient. Violations: samples with an adversarial example inside "
            "their certified radius (must be 0). The CSV files in tables/ hold every number "
            "at full precision.")


# Markdown -------------------------------------------------------------------------------

def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(df: pd.DataFrame, cells: list[list[str]] | None = None,
              header: list[str] | None = None) -> str:
    """``df`` as a Markdown (pipe) table of ``cells`` (default: each value through ``cell``)
    under ``header`` (default: the column names)."""
    if df.empty:
        return "(nothing to show)"
    header = header or [str(c) for c in df.columns]
    cells = cells or [[cell(v) for v in rec] for rec in df.itertuples(index=False)]
    text = pd.DataFrame([[_md_escape(v) for v in row] for row in cells])
    return text.to_markdown(index=False, headers=[_md_escape(h) for h in header],
                            disable_numparse=True)


def render_markdown(c: ReportContent) -> str:
    """The report in Markdown; figures are linked from ``figures/``."""
    out = [f"# {c.title}", "", c.generated, "", "Models: " + ", ".join(c.colors), ""]
    if c.notices:
        out += ["**Notes on the inputs**", ""] + [f"- {n}" for n in c.notices] + [""]
    header = [f"{s} {g}".strip() + (" (%)" if s == "clean acc" else "")
              for g, s in summary_groups(list(c.summary.columns))]
    out += ["## Model summary", "", _md_table(c.summary, summary_cells(c.summary), header), "",
            _summary_note(c), "", "## Figures", ""]
    for i, f in enumerate(c.figures):
        out += [f"![{f.title}](figures/{f.filename})", "",
                f"*Figure {'abcdefghij'[i]}. {f.title}.* {f.caption}", ""]
    if c.skipped:
        out += ["Figures not drawn:", ""] + [f"- {t}: {w}" for t, w in c.skipped.items()]
        out.append("")
    out += ["## Accuracy at each ε (%, with 95% Clopper–Pearson interval)", ""]
    for norm, grid in c.accuracy_grids.items():
        out += [f"### {norm}", "", _md_table(grid), ""]
    out += ["## Per-layer Lipschitz upper bounds", "", _md_table(c.layers), "",
            "## Run metadata", "", _md_table(fields_by_model(c.metadata)), "",
            "## Inputs", "", _md_table(_inputs(c)), "", INPUTS_NOTE, "",
            "## Conventions", ""] + [f"- {x}" for x in c.conventions] + [""]
    return "\n".join(out)

"""The report generator: contents, reproducibility, partial and bad input, atomic output, CLI.

Run directories are synthetic (tests/test_reports_data.py); the full report is built once
per session, other tests replace the figure drawing with a stub where figures do not matter.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_reports_data import (  # noqa: F401  (fixtures)
    EPS_L2,
    EPS_LINF,
    built_report,
    make_run,
    report_inputs,
)

import reports.build
from lipcert.commands.report import add_parser as add_report_parser
from lipcert.errors import LipcertError
from reports import build_report, clopper_pearson, load_run, make_report
from reports.runs import ATTACK_COLUMNS
from reports.stats import analyse, robustness_table, sample_table

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def no_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip drawing (the slow part) where a test does not look at figures."""
    monkeypatch.setattr(reports.build, "draw_all", lambda analyses, colors: ([], {}))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# statistics -----------------------------------------------------------------------------

def test_clopper_pearson_matches_scipy_binomtest() -> None:
    for k, n in [(0, 10), (3, 10), (10, 10), (57, 60), (1, 1000)]:
        lo, hi = clopper_pearson(k, n)
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert lo == pytest.approx(ci.low, abs=1e-12)
        assert hi == pytest.approx(ci.high, abs=1e-12)
    lo, hi = clopper_pearson(0, 0)
    assert np.isnan(lo) and np.isnan(hi)


def test_robust_accuracy_is_the_per_sample_worst_case(tmp_path: Path) -> None:
    """Sample 0 resists both attacks, 1 falls to fgsm only, 2 to pgd only, 3 is misclassified:
    each attack leaves 2 of 4 robust, the worst case only 1."""
    run = tmp_path / "m"
    run.mkdir()
    rows = []
    for attack, broken in (("fgsm", {1}), ("pgd", {2})):
        for i in range(4):
            hit = i in broken or i == 3
            rows.append({"model": "m", "attack": attack, "norm": "linf", "eps": 8 / 255,
                         "index": i, "label": 1, "pred_clean": 0 if i == 3 else 1,
                         "pred_adv": 0 if hit else 1, "success": hit,
                         "delta_l2": 0.5 if hit and i != 3 else 0.0,
                         "delta_linf": 8 / 255, "certified_radius_l2": ""})
    pd.DataFrame(rows).to_csv(run / "attacks.csv", index=False)
    data = load_run(run)
    table = robustness_table(data, sample_table(data), [], [8 / 255])
    acc = dict(zip(table["source"], table["accuracy"], strict=True))
    assert acc == {"fgsm": 0.5, "pgd": 0.5, "worst case": 0.25}
    assert set(table["n"]) == {4}


def test_violations_are_found_and_counted(tmp_path: Path) -> None:
    bad = make_run(tmp_path, "bad", violation=True, files=("local", "attacks", "minimal"))
    good = make_run(tmp_path, "good", seed=4, files=("local", "attacks"))
    a_bad = analyse(load_run(bad), EPS_L2, EPS_LINF)
    a_good = analyse(load_run(good), EPS_L2, EPS_LINF)
    assert a_bad.violations == 1
    assert a_bad.samples.loc[a_bad.samples["index"] == 0, "violation"].item()
    assert a_good.violations == 0


def test_violation_column_of_attacks_csv_counts(tmp_path: Path) -> None:
    run = make_run(tmp_path, "m", files=("attacks",))
    df = pd.read_csv(run / "attacks.csv")
    df["violation"] = ""
    df.loc[df["index"] == 5, "violation"] = "l2"
    df.to_csv(run / "attacks.csv", index=False)
    assert analyse(load_run(run), EPS_L2, EPS_LINF).violations == 1


def test_certified_accuracy_uses_r_greater_than_eps(tmp_path: Path) -> None:
    run = make_run(tmp_path, "m", files=("global", "local"))
    data = load_run(run)
    table = analyse(data, EPS_L2, []).robustness
    for mode, cert in data.certificates.items():
        mine = table[table["source"] == f"certified ({mode})"]
        theirs = dict(cert.certified_accuracy)
        for eps, acc in zip(mine["eps"], mine["accuracy"], strict=True):
            assert acc == pytest.approx(theirs[eps])


# the full report ------------------------------------------------------------------------

def test_report_layout_and_contents(built_report, report_inputs) -> None:  # noqa: F811
    out = built_report.out_dir
    assert built_report.html == out / "report.html"
    names = {p.name for p in (out / "figures").iterdir()}
    assert names == {"accuracy_vs_eps.png", "layer_bounds.png", "radius_vs_perturbation.png",
                     "tightness.png", "training.png"}
    for p in (out / "figures").iterdir():
        assert p.read_bytes().startswith(PNG)
    tables = {p.stem for p in (out / "tables").iterdir()}
    assert tables == {"summary", "robustness", "layers", "samples", "metadata", "inputs"}

    summary = pd.read_csv(out / "tables" / "summary.csv")
    assert list(summary["model"]) == [p.name for p in report_inputs]
    lip, std, partial = summary.to_dict("records")
    assert lip["family"] == "lipschitz" and std["family"] == "standard"
    assert lip["Lipschitz upper"] == 12.0 and lip["ratio"] == pytest.approx(12 / 3.5)
    assert partial["Lipschitz upper"] == np.inf
    assert lip["violations"] == 0 and np.isnan(partial["violations"])
    for column in ("certified L2 ε=0.25", "pgdl2 L2 ε=0.5", "pgd L∞ ε=8/255",
                   "fgsm L∞ ε=2/255", "worst case L∞ ε=8/255"):
        assert column in summary.columns
    # Sound certificates: certified accuracy never exceeds robust accuracy at the same ε.
    for eps in ("0.25", "0.5", "1"):
        assert (summary[f"certified L2 ε={eps}"][:2] <= summary[f"pgdl2 L2 ε={eps}"][:2]).all()
    assert lip["certified L2 ε=0.25"] > std["certified L2 ε=0.25"]

    layers = pd.read_csv(out / "tables" / "layers.csv")
    assert set(layers["model"]) == {p.name for p in report_inputs}
    assert set(layers["kind"]) == {"upper"}
    meta = pd.read_csv(out / "tables" / "metadata.csv", dtype={"weights sha256": str})
    assert list(meta["weights sha256"]) == [f"{s:02d}" * 32 for s in (1, 2, 3)]
    assert list(meta["seed"]) == [1, 2, 3] and set(meta["device"]) == {"cpu"}
    assert "version torch" in meta.columns


def test_html_is_self_contained(built_report) -> None:  # noqa: F811
    text = built_report.html.read_text()
    assert "<script" not in text.lower()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 5
    figures = built_report.out_dir / "figures"
    assert {base64.b64decode(i) for i in images} == {p.read_bytes() for p in
                                                     figures.iterdir()}
    summary = re.search(r'<table id="summary">.*?</table>', text, re.S).group(0)
    assert summary.count("<tr>") == 2 + 3  # two header rows, one row per model
    md = (built_report.out_dir / "report.md").read_text()
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (built_report.out_dir / link).is_file()


def test_report_says_what_is_missing(built_report) -> None:  # noqa: F811
    text = built_report.html.read_text()
    assert "vit-standard-partial: missing train_log.csv" in text
    assert "attacks.csv (no robust accuracy under attack)" in text
    inputs = pd.read_csv(built_report.out_dir / "tables" / "inputs.csv", keep_default_na=False)
    row = inputs[inputs["model"] == "vit-standard-partial"].iloc[0]
    assert row["certificate-global.json"] == "✓" and row["attacks.csv"] == ""


def test_building_twice_is_identical_but_for_the_timestamp(report_inputs, built_report,  # noqa: F811
                                                           tmp_path: Path) -> None:
    later = datetime(2026, 6, 7, 8, 9, 10, tzinfo=timezone.utc)
    second = make_report(report_inputs, tmp_path / "again", now=later)
    a, b = _files(built_report.out_dir), _files(second.out_dir)
    assert a.keys() == b.keys()
    for name in a:
        if name in ("report.html", "report.md"):
            lines_a, lines_b = a[name].splitlines(), b[name].splitlines()
            assert len(lines_a) == len(lines_b)
            differ = [(x, y) for x, y in zip(lines_a, lines_b, strict=True) if x != y]
            assert len(differ) == 1 and b"Generated 2026-06-07 08:09:10 UTC" in differ[0][1]
        else:
            assert a[name] == b[name], name


def test_source_date_epoch_fixes_the_timestamp(tmp_path: Path, no_figures,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run(tmp_path, "m", files=("global",))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "86400")
    build_report([run], tmp_path / "r")
    assert "Generated 1970-01-02 00:00:00 UTC" in (tmp_path / "r" / "report.md").read_text()


# partial and bad input ------------------------------------------------------------------

def test_partial_runs_give_a_report_of_what_exists(tmp_path: Path) -> None:
    only_log = make_run(tmp_path, "log-only", files=("config", "log"))
    only_attacks = make_run(tmp_path, "attacks-only", seed=2, files=("attacks",))
    built = make_report([only_log, only_attacks], tmp_path / "r")
    figures = {p.name for p in (tmp_path / "r" / "figures").iterdir()}
    # attacks.csv carries certified radii, so the radius figure can be drawn from it alone
    assert figures == {"training.png", "accuracy_vs_eps.png", "tightness.png",
                       "radius_vs_perturbation.png"}
    text = built.html.read_text()
    assert "Figures not drawn" in text and "no certificate with a per-layer table" in text
    assert "log-only: missing" in text and "attacks-only: missing config.json" in text
    assert list(built.summary["model"]) == ["log-only", "attacks-only"]
    assert built.summary.loc[0, "clean acc"] == 0.9  # config.json's validation accuracy


def test_empty_run_directory_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(LipcertError, match="holds nothing lipcert can report on"):
        build_report([tmp_path / "empty"], tmp_path / "r")
    with pytest.raises(LipcertError, match="is not a directory"):
        build_report([tmp_path / "nope"], tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("column", ["success", "delta_l2", "eps"])
def test_attacks_csv_missing_a_column_is_a_clear_error(tmp_path: Path, column: str) -> None:
    run = make_run(tmp_path, "m", files=("attacks",))
    df = pd.read_csv(run / "attacks.csv")
    df.drop(columns=column).to_csv(run / "attacks.csv", index=False)
    with pytest.raises(LipcertError, match=f"attacks.csv is not a valid attack results table: "
                                           f"it lacks the column.s. {column}"):
        build_report([run], tmp_path / "r")


@pytest.mark.parametrize(("filename", "text", "message"), [
    ("train_log.csv", "step,acc\n1,0.5\n", "lacks the column.s. loss"),
    ("minimal.csv", "model,index,label\nm,0,1\n", "lacks the column min_delta_l2"),
    ("attacks.csv", "", "is empty"),
    ("certificate-global.json", "{not json", "is not valid JSON"),
    ("certificate.json", '{"norm": "l2"}', "no 'lipschitz.upper'"),
    ("certificate-local.json", '{"lipschitz": {"upper": "big"}}', "expected a number"),
])
def test_malformed_files_are_clear_errors(tmp_path: Path, filename: str, text: str,
                                          message: str) -> None:
    run = tmp_path / "m"
    run.mkdir()
    (run / filename).write_text(text)
    with pytest.raises(LipcertError, match=message):
        build_report([run], tmp_path / "r")


def test_attack_values_are_validated(tmp_path: Path) -> None:
    run = make_run(tmp_path, "m", files=("attacks",))
    df = pd.read_csv(run / "attacks.csv")
    df.loc[0, "norm"] = "l7"
    df.to_csv(run / "attacks.csv", index=False)
    with pytest.raises(LipcertError, match="unknown norm 'l7'"):
        load_run(run)


def test_both_minimal_formats_and_inf_numbers_are_read(tmp_path: Path) -> None:
    brief = load_run(make_run(tmp_path, "a", files=("minimal",)))
    cli = load_run(make_run(tmp_path, "b", files=("minimal",), minimal_format="attack-cli"))
    for run in (brief, cli):
        assert list(run.minimal.columns) == ["model", "index", "min_delta_l2", "attack"]
        assert run.minimal["min_delta_l2"].isna().sum() == 2
    inf = load_run(make_run(tmp_path, "c", files=("global",), upper="inf"))
    assert inf.certificates["global"].upper == float("inf")
    assert inf.certificates["global"].layers["upper"].isin([float("inf")]).sum() == 1


def test_attacks_csv_with_several_models_keeps_this_runs_rows(tmp_path: Path) -> None:
    run = make_run(tmp_path, "mine", files=("attacks",))
    df = pd.read_csv(run / "attacks.csv")
    pd.concat([df, df.assign(model="other")]).to_csv(run / "attacks.csv", index=False)
    assert set(load_run(run).attacks["model"]) == {"mine"}
    (tmp_path / "x").mkdir()
    pd.concat([df.assign(model="p"), df.assign(model="q")]).to_csv(
        tmp_path / "x" / "attacks.csv", index=False)
    with pytest.raises(LipcertError, match="none of which is this run"):
        load_run(tmp_path / "x")


def test_certificate_for_other_weights_is_flagged(tmp_path: Path) -> None:
    run = make_run(tmp_path, "m", files=("config", "global"))
    config = json.loads((run / "config.json").read_text())
    config["weights_sha256"] = "f" * 64
    (run / "config.json").write_text(json.dumps(config))
    assert any("may be for another model" in w for w in load_run(run).warnings)


# atomic output --------------------------------------------------------------------------

def test_output_replaces_an_old_report_only_after_success(tmp_path: Path, no_figures,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    run = make_run(tmp_path, "m", files=("global",))
    out = tmp_path / "r"
    build_report([run], out)
    before = _files(out)

    def boom(content):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(reports.build, "render_markdown", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_report([run], out)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "r"]  # no temporary left
    monkeypatch.undo()
    make_run(tmp_path, "n", seed=3, files=("global",))
    build_report([run, tmp_path / "n"], out)
    assert "n" in set(pd.read_csv(out / "tables" / "summary.csv")["model"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "n", "r"]


def test_output_directory_is_checked(tmp_path: Path, no_figures) -> None:
    run = make_run(tmp_path, "m", files=("global",))
    with pytest.raises(LipcertError, match="would replace the run directory"):
        build_report([run], run)
    with pytest.raises(LipcertError, match="would replace the run directory"):
        build_report([run], tmp_path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(LipcertError, match="not a lipcert report directory"):
        build_report([run], precious)
    assert (precious / "thesis.tex").read_text() == "years of work"
    (tmp_path / "empty").mkdir()
    assert build_report([run], tmp_path / "empty").is_file()


# command line ---------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipcert")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_prints_the_summary_and_the_path(tmp_path: Path, no_figures,
                                             capsys: pytest.CaptureFixture) -> None:
    runs = [make_run(tmp_path, "lip", seed=1), make_run(tmp_path, "std", family="standard",
                                                          seed=2, upper=3e9)]
    args = _parser().parse_args(["report", *map(str, runs), "-o", str(tmp_path / "out"),
                                 "--eps-linf", "8/255"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["model", "lip", "std"]
    assert "certified L2 ε=0.25 (%)" in out and "pgd L∞ ε=8/255 (%)" in out
    assert "pgd L∞ ε=2/255" not in out
    assert f"report written to {tmp_path / 'out' / 'report.html'}" in out


def test_cli_user_errors_raise_lipcert_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    args = _parser().parse_args(["report", str(tmp_path / "empty"), "-o", str(tmp_path / "o")])
    with pytest.raises(LipcertError):
        args.handler(args)
    with pytest.raises(SystemExit):
        _parser().parse_args(["report", str(tmp_path), "-o", "x", "--eps-l2", "a"])


def test_attack_columns_match_the_harness() -> None:
    from attacks.results import COLUMNS

    assert set(ATTACK_COLUMNS) <= set(COLUMNS)


def test_generic_certificate_json_fills_its_mode(tmp_path: Path) -> None:
    run = make_run(tmp_path, "m", files=("global",))
    (run / "certificate-global.json").rename(run / "certificate.json")
    assert list(load_run(run).certificates) == ["global"]
    make_run(tmp_path, "n", files=("global",))
    (tmp_path / "n" / "certificate.json").write_bytes(
        (tmp_path / "n" / "certificate-global.json").read_bytes())
    both = load_run(tmp_path / "n")
    assert list(both.certificates) == ["global"]
    assert both.certificates["global"].path.name == "certificate-global.json"
    assert any("certificate.json ignored" in w for w in both.warnings)


def test_radius_figure_counts_violations_in_red_in_its_title(tmp_path: Path) -> None:
    from reports.figures import VIOLATION, model_colors, radius_vs_perturbation

    runs = [make_run(tmp_path, "bad", violation=True, files=("local", "minimal")),
            make_run(tmp_path, "good", seed=3, files=("local", "minimal"))]
    analyses = [analyse(load_run(r), EPS_L2, []) for r in runs]
    fig = radius_vs_perturbation(analyses, model_colors(["bad", "good"]))
    title = fig.axes[0].title
    assert title.get_text().endswith(": 1 violation")
    assert title.get_color() == VIOLATION

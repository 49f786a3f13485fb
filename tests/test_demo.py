"""``lipcert demo`` end to end, on a few seconds of training and a few samples."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lipcert.cli import main
from lipcert.demo import MARGIN_PRESETS, PRESETS, DemoSettings, demo_stages


@pytest.mark.slow
def test_demo_runs_every_stage_and_reports_without_gaps(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    code = main(["demo", "-o", str(out), "--n-certify", "8", "--n-local", "6",
                 "--n-margin", "3", "--train-budget-s", "4"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    # Not a terminal: one line per stage (name, seconds, running total), then the summary.
    stages = re.findall(r"^\[(\d+)/(\d+)\] (.+): [\d.]+ s \(total [\d.]+ s\)$", stdout, re.M)
    assert [int(s[0]) for s in stages] == list(range(1, 16)) and stages[0][1] == "15"
    assert [s[2] for s in stages][:3] == [f"train {p}" for p in PRESETS]
    assert stages[-1][2] == "report"
    summary = stdout[stdout.index("model "):]
    assert all(p in summary.splitlines()[0] for p in PRESETS)  # one line, not wrapped
    assert f"report: {(out / 'report' / 'report.html').resolve()}" in stdout

    for preset, share in zip(PRESETS, (0.25, 0.25, 0.5), strict=True):
        run = out / preset
        config = json.loads((run / "config.json").read_text())
        assert config["training"]["max_time_s"] == pytest.approx(4 * share)
        lower = json.loads((run / "certificate-global.json").read_text())["lipschitz"]
        assert lower["lower_search"]["stopped"] in ("finished", "budget")
        assert (run / "attacks.minimal.csv").is_file() and (run / "attacks.csv").is_file()
        margin = run / "certificate-margin.json"
        assert margin.is_file() == (preset in MARGIN_PRESETS)
        if margin.is_file():
            samples = json.loads(margin.read_text())["samples"]
            assert len(samples) == 3 and {s["radius_method"] for s in samples} <= {
                "global", "local", "margin"}
    report = (out / "report" / "report.md").read_text()
    assert "certified (margin)" in report
    assert "**Notes on the inputs**" not in report  # the notes: missing files, warnings
    assert not [p for p in PRESETS if f"{p}: missing" in report]
    # Finished runs are reused: a second demo would not train again.
    names = [s.name for s in demo_stages(DemoSettings(out=out, n_certify=8, n_local=6))]
    assert not [n for n in names if n.startswith("train")] and len(names) == 12

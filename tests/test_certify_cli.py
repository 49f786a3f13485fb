"""``lipcert certify``: the JSON document, the accepted MODEL forms, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lipcert.cli import main

KEYS = {"norm", "radius_convention", "mode", "lipschitz", "layers", "samples",
        "certified_accuracy", "timing_s", "versions", "model"}


def _certify(args: list[str]) -> int:
    return main(["certify", *args])


@pytest.mark.parametrize("mode", ["global", "local"])
def test_certificate_json_from_a_run(tiny_runs, tmp_path: Path, mode: str) -> None:
    out = tmp_path / "cert.json"
    code = _certify([str(tiny_runs["vit-mnist-lipschitz-tiny"]), "--n", "20", "--mode", mode,
                     "--eps", "0.05,0.1", "-o", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert set(doc) >= KEYS
    assert doc["norm"] == "l2" and doc["mode"] == mode
    lip = doc["lipschitz"]
    assert lip["lower"] <= lip["upper"] and lip["ratio"] >= 1
    assert len(doc["samples"]) == 20 and [s["index"] for s in doc["samples"]] == list(range(20))
    for s in doc["samples"]:
        assert s["radius_linf"] == pytest.approx(s["radius_l2"] / 28)
        if s["pred"] != s["label"]:
            assert s["radius_l2"] == 0
    radii = [s["radius_l2"] for s in doc["samples"]]
    for row in doc["certified_accuracy"]:
        assert row["accuracy"] == pytest.approx(sum(r > row["eps"] for r in radii) / 20)
    assert len(doc["model"]["weights_sha256"]) == 64
    search = lip["lower_search"]
    assert search["budget_s"] == max(5.0, doc["timing_s"]["total"])  # the default budget
    assert search["stopped"] in ("finished", "budget") and 1 <= search["samples_scanned"] <= 20
    assert doc["timing_s"]["lower_search"] == search["elapsed_s"] > 0


def test_certify_a_pt2_file_and_a_gpt_run(tiny_runs, tmp_path: Path) -> None:
    out = tmp_path / "pt2.json"
    run = tiny_runs["vit-mnist-standard-tiny"]
    assert _certify([str(run / "model.pt2"), "--data", "mnist", "--n", "8", "-o", str(out),
                     "--mode", "local", "--no-lower"]) == 0
    assert json.loads(out.read_text())["model"]["kind"] == "pt2"
    out = tmp_path / "gpt.json"
    assert _certify([str(tiny_runs["gpt-shakespeare-lipschitz-tiny"]), "--n", "4",
                     "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["data"]["dataset"] == "shakespeare" and len(doc["samples"]) == 4


def test_bad_inputs_write_nothing(tiny_runs, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cert.json"
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    pickle_file = tmp_path / "model.pt"
    pickle_file.write_bytes(b"\x80\x04K\x01.")
    run = str(tiny_runs["vit-mnist-standard-tiny"])
    cases = [
        [str(corrupt), "--data", "mnist"],
        [str(tmp_path / "missing")],
        [run, "--data", "digits"],  # 8x8 images for a 28x28 model
        ["lipcert.models:build_model", "--weights", str(pickle_file), "--data", "mnist"],
    ]
    for args in cases:
        code = _certify([*args, "--n", "4", "-o", str(out)])
        err = capsys.readouterr().err
        assert code == 2, args
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_lower_budget_flag(tiny_runs, tmp_path: Path, capsys) -> None:
    run = str(tiny_runs["vit-mnist-standard-tiny"])
    out = tmp_path / "cert.json"
    assert _certify([run, "--n", "6", "--lower-budget-s", "inf", "-o", str(out)]) == 0
    lip = json.loads(out.read_text())["lipschitz"]
    assert lip["lower_search"]["budget_s"] is None
    assert lip["lower_search"]["stopped"] == "finished"
    assert lip["lower_search"]["samples_scanned"] == 6 and lip["lower_search"]["ascent_steps"] == 50
    assert "stopped by" not in lip["lower_method"]
    stdout = capsys.readouterr().out  # not a terminal: one plain line per stage
    assert "certificate: " in stdout and "lower bound: " in stdout and "(finished:" in stdout
    out.unlink()
    for bad in ("0", "-1", "nan", "soon"):
        with pytest.raises(SystemExit) as exit_info:
            _certify([run, "--lower-budget-s", bad, "-o", str(out)])
        assert exit_info.value.code == 2
        assert "seconds" in capsys.readouterr().err
    assert not out.exists()


def test_margin_mode_keeps_the_largest_sound_radius(tiny_runs, tmp_path: Path) -> None:
    """``--mode margin`` adds margin-gradient radii to the local ones: every radius is at
    least the local mode's, each sample names the certificate that gave it, and PGD-L2 at
    each radius (the per-sample audit) finds no adversarial example inside."""
    run = str(tiny_runs["vit-mnist-standard-tiny"])
    local, margin = tmp_path / "local.json", tmp_path / "margin.json"
    common = ["--n", "12", "--eps", "1e-4,1e-3", "--no-lower"]
    assert _certify([run, *common, "--mode", "local", "-o", str(local)]) == 0
    assert _certify([run, *common, "--mode", "margin", "-o", str(margin)]) == 0
    before = json.loads(local.read_text())["samples"]
    after = json.loads(margin.read_text())["samples"]
    assert all(b["radius_l2"] <= a["radius_l2"] for b, a in zip(before, after, strict=True))
    methods = {s["radius_method"] for s in after}
    assert methods <= {"global", "local", "margin"} and "margin" in methods
    code = main(["attack", run, "--data", "mnist", "--n", "12", "--attacks", "fgsm",
                 "--eps-linf", "0.01", "--certificate", str(margin), "--audit-radius",
                 "--audit-steps", "50", "--audit-restarts", "3", "--quiet",
                 "-o", str(tmp_path / "attacks.csv")])
    assert code == 0

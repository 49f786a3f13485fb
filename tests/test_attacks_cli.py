"""``lipcert attack`` end to end: run directories, certificates, text, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from attacks import COLUMNS, read_results
from lipcert.checkpoint import save_run
from lipcert.cli import main as lipcert
from lipcert.presets import preset
from lipcert.train import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("attack-runs")
    return {
        "vit": save_run(train(preset("vit-mnist-standard-tiny", steps=60), progress=False),
                        root / "vit"),
        "gpt": save_run(train(preset("gpt-shakespeare-standard-tiny", steps=20),
                              progress=False), root / "gpt"),
    }


def _sha(run: Path) -> str:
    return json.loads((run / "config.json").read_text())["weights_sha256"]


def _certificate(path: Path, run: Path, radius: float, n: int = 24) -> Path:
    """A planted certificate for ``run``: every one of the first ``n`` test images claimed
    at ``radius``, whatever the model does there."""
    from lipcert.data import load_dataset

    y = load_dataset("mnist").y_test[:n]
    samples = [{"index": i, "label": int(label), "pred": int(label), "margin": 1.0,
                "radius_l2": radius, "radius_linf": radius / 28, "lipschitz": 1.0}
               for i, label in enumerate(y)]
    path.write_text(json.dumps({
        "norm": "l2", "radius_convention": "r = (z_y - max_{j!=y} z_j) / (sqrt(2) * L)",
        "mode": "global", "method": "exact", "input_elements": 784,
        "lipschitz": {"upper": 1.0, "lower": None, "ratio": None}, "layers": [],
        "samples": samples, "certified_accuracy": [],
        "model": {"source": str(run), "kind": "run", "weights_sha256": _sha(run)}}))
    return path


IMAGE_ARGS = ["--data", "mnist", "--n", "24", "--batch-size", "10", "--attacks",
              "fgsm,pgd,pgdl2", "--eps-linf", "8/255,0.1", "--eps-l2", "0.5,1",
              "--attack-params", '{"pgd": {"steps": 5}, "pgdl2": {"steps": 5}}', "--quiet"]


def test_attack_writes_the_table_and_a_rerun_resumes_to_the_same_file(runs, tmp_path, capsys
                                                                     ) -> None:
    out = tmp_path / "attacks.csv"
    assert lipcert(["attack", str(runs["vit"]), *IMAGE_ARGS, "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "robust accuracy" in stdout and f"results: {out}" in stdout
    df = read_results(out)
    assert list(df.columns) == COLUMNS and len(df) == 24 * 6
    assert set(df["model"]) == {"vit"} and list(df["index"].unique()) == list(range(24))
    assert df.loc[df["norm"] == "linf", "eps"].unique().tolist() == [8 / 255, 0.1]
    before = out.read_bytes()
    assert lipcert(["attack", str(runs["vit"]), *IMAGE_ARGS, "-o", str(out)]) == 0
    assert out.read_bytes() == before


def test_audit_catches_a_planted_certificate_and_exits_non_zero(runs, tmp_path, capsys
                                                               ) -> None:
    out = tmp_path / "attacks.csv"
    wrong = _certificate(tmp_path / "wrong.json", runs["vit"], radius=1e3)
    code = lipcert(["attack", str(runs["vit"]), *IMAGE_ARGS, "--certificate", str(wrong),
                    "--minimal", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    assert "CERTIFICATE VIOLATION" in captured.err
    violations = pd.read_csv(tmp_path / "attacks.violations.csv")
    df = read_results(out)
    from_attacks = violations[~violations["attack"].str.startswith("minimal:")]
    assert len(from_attacks) == int(df["success"].sum()) > 0
    minimal = pd.read_csv(tmp_path / "attacks.minimal.csv")
    assert (violations["attack"].str.startswith("minimal:")).sum() == minimal[
        "radius_l2"].notna().sum() > 0
    assert (df["certified_radius_l2"] == 1e3).all()

    sound = _certificate(tmp_path / "sound.json", runs["vit"], radius=0.0)
    out2 = tmp_path / "sound.csv"
    code = lipcert(["attack", str(runs["vit"]), *IMAGE_ARGS, "--certificate", str(sound),
                    "-o", str(out2)])
    assert code == 0 and "0 violations" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "sound.violations.csv").empty


def test_radius_audit_passes_a_real_certificate_and_catches_a_planted_one(runs, tmp_path,
                                                                           capsys) -> None:
    cert = tmp_path / "local.json"
    assert lipcert(["certify", str(runs["vit"]), "--data", "mnist", "--n", "24", "--mode",
                 "local", "--no-lower", "-o", str(cert)]) == 0
    capsys.readouterr()
    audit_args = ["--audit-radius", "--audit-steps", "20", "--audit-restarts", "2"]
    out = tmp_path / "sound.csv"
    assert lipcert(["attack", str(runs["vit"]), *IMAGE_ARGS, "--certificate", str(cert),
                    *audit_args, "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "radius audit" in stdout and "0 violations" in stdout
    audit = pd.read_csv(tmp_path / "sound.radius-audit.csv")
    claims = [s for s in json.loads(cert.read_text())["samples"] if s["radius_l2"] > 0]
    assert audit["index"].tolist() == [s["index"] for s in claims] and len(claims) > 10
    assert audit["certified_radius_l2"].tolist() == [s["radius_l2"] for s in claims]
    assert not audit["violation"].any() and (audit["steps"] == 20).all()
    assert (audit["delta_l2"] <= audit["certified_radius_l2"]).all()
    assert pd.read_csv(tmp_path / "sound.violations.csv").empty

    wrong = _certificate(tmp_path / "wrong.json", runs["vit"], radius=1e3)
    out = tmp_path / "wrong.csv"
    assert lipcert(["attack", str(runs["vit"]), *IMAGE_ARGS, "--certificate", str(wrong),
                    *audit_args, "-o", str(out)]) == 1
    assert "radius-audit:pgdl2" in capsys.readouterr().err
    audit = pd.read_csv(tmp_path / "wrong.radius-audit.csv")
    assert len(audit) == 24 and audit["violation"].all()  # a ball holding all of [0, 1]^n
    assert (audit["delta_l2"] <= 28.0).all()
    violations = pd.read_csv(tmp_path / "wrong.violations.csv")
    from_radius = violations[violations["attack"] == "radius-audit:pgdl2"]
    assert sorted(from_radius["index"]) == list(range(24))
    assert (from_radius["eps"] == 1e3).all()


def test_radius_audit_needs_a_certificate(runs, tmp_path, capsys) -> None:
    argv = ["attack", str(runs["vit"]), *IMAGE_ARGS, "--audit-radius", "-o",
            str(tmp_path / "a.csv")]
    assert lipcert(argv) == 2
    err = capsys.readouterr().err
    assert "--audit-radius needs a --certificate" in err and len(err.strip().splitlines()) == 1
    argv[argv.index("--audit-radius")] = "--audit-steps=0"
    assert lipcert(argv) == 2 and ">= 1" in capsys.readouterr().err
    assert not (tmp_path / "a.csv").exists()


def test_text_model_is_attacked_in_embedding_space(runs, tmp_path) -> None:
    out = tmp_path / "text.csv"
    code = lipcert(["attack", str(runs["gpt"]), "--data", "shakespeare", "--n", "8",
                    "--attacks", "fgsm,pgdl2", "--eps-l2", "0.5,4", "--eps-linf", "0.1",
                    "--attack-params", '{"pgdl2": {"steps": 5}}', "--minimal", "--quiet",
                    "-o", str(out)])
    assert code == 0
    df = read_results(out)
    assert len(df) == 8 * 3 and df["success"].any()
    l2, linf = df[df["norm"] == "l2"], df[df["norm"] == "linf"]
    assert (l2["delta_l2"] <= l2["eps"]).all() and (linf["delta_linf"] <= linf["eps"]).all()
    minimal = pd.read_csv(tmp_path / "text.minimal.csv")
    assert len(minimal) == 8 and (minimal["radius_l2"].dropna() >= 0).all()
    meta = json.loads((tmp_path / "text.csv.meta.json").read_text())
    assert "validation split" in meta["models"]["gpt"]["samples"]
    context = 32  # the tiny preset's
    assert list(df["index"].unique()) == [i * context for i in range(8)]  # window starts


@pytest.mark.parametrize("change,message", [
    (["--attacks", "fgsm,nope"], "unknown attack 'nope'"),
    (["--eps-l2", "0,0.5"], "finite number > 0"),
    (["--eps-linf", "8"], "covers the whole"),
    (["--eps-linf", "abc"], "cannot parse"),
    (["--data", "digits"], "does not match the model"),
    (["--data", "shakespeare"], "embedding space"),
    (["--attack-params", "{bad"], "not valid JSON"),
    (["--attack-params", '{"cw": {}}'], "not in --attacks"),
    (["--n", "0"], ">= 1"),
])
def test_bad_input_is_a_one_line_error(runs, tmp_path, capsys, change, message) -> None:
    argv = ["attack", str(runs["vit"]), *IMAGE_ARGS, "-o", str(tmp_path / "a.csv")]
    for flag, value in zip(change[::2], change[1::2], strict=True):
        argv[argv.index(flag) + 1] = value
    assert lipcert(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a.csv").exists()


def test_certificate_of_another_model_is_refused(runs, tmp_path, capsys) -> None:
    other = _certificate(tmp_path / "c.json", runs["vit"], radius=0.1)
    data = json.loads(other.read_text())
    data["model"]["weights_sha256"] = "0" * 64
    other.write_text(json.dumps(data))
    argv = ["attack", str(runs["vit"]), *IMAGE_ARGS, "--certificate", str(other), "-o",
            str(tmp_path / "a.csv")]
    assert lipcert(argv) == 2
    assert "different model" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(runs, tmp_path, capsys) -> None:
    argv = ["attack", str(runs["vit"]), *IMAGE_ARGS, "--device", "cuda", "-o",
            str(tmp_path / "a.csv")]
    assert lipcert(argv) == 2 and "no CUDA device" in capsys.readouterr().err


def test_several_models_and_a_pt2_file_give_the_same_rows(runs, tmp_path) -> None:
    out = tmp_path / "both.csv"
    pt2 = runs["vit"] / "model.pt2"
    assert lipcert(["attack", str(runs["vit"]), str(pt2), *IMAGE_ARGS, "-o", str(out)]) == 0
    df = read_results(out)
    assert list(df["model"].unique()) == ["vit", "vit/model.pt2"]
    run_rows = df[df["model"] == "vit"].drop(columns="model").reset_index(drop=True)
    pt2_rows = df[df["model"] == "vit/model.pt2"].drop(columns="model").reset_index(drop=True)
    pd.testing.assert_frame_equal(run_rows, pt2_rows, check_exact=False, atol=1e-5)

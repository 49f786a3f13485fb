"""attacks.harness: the per-sample table, robust accuracy, determinism, resumption."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from attacks import COLUMNS, read_results, robust_accuracy, run_attacks
from attacks.harness import attack_accuracy
from lipcert.errors import LipcertError

ROOT = Path(__file__).resolve().parents[1]

# The problem the resumption test runs in three processes: a random tiny ViT on random
# images, labels mostly its own predictions (so attacks have something to break).
PROBLEM = """
import torch
from lipcert.models import ModelConfig, build_model
torch.set_num_threads(1)
torch.manual_seed(0)
model = build_model(ModelConfig(arch="vit", family="standard", d_model=16, n_layers=1,
                                n_heads=2, image_size=8, patch_size=4)).eval()
x = torch.rand(30, 1, 8, 8)
with torch.no_grad():
    y = model(x).argmax(1)
y[::7] = (y[::7] + 1) % 10
ARGS = dict(attacks=["fgsm", "pgd", "pgdl2"], eps_l2=[0.3, 1.0], eps_linf=[0.02, 0.1],
            batch_size=8, seed=5, params={"pgd": {"steps": 5}, "pgdl2": {"steps": 5}})
"""


def _problem() -> dict:
    scope: dict = {}
    exec(PROBLEM, scope)
    return scope


def test_table_has_exactly_the_columns_and_one_row_per_sample_attack_eps() -> None:
    p = _problem()
    df = run_attacks(p["model"], p["x"], p["y"], **p["ARGS"])
    assert list(df.columns) == COLUMNS
    assert len(df) == 30 * (2 + 2 + 2)
    assert df.groupby(["attack", "norm", "eps"]).size().eq(30).all()
    assert set(df["norm"]) == {"l2", "linf"} and df["certified_radius_l2"].isna().all()
    assert (df["success"] == (df["pred_adv"] != df["label"])).all()
    assert df["success"].any() and not df["success"].all()


def test_a_sample_misclassified_clean_is_a_success_at_every_eps() -> None:
    p = _problem()
    df = run_attacks(p["model"], p["x"], p["y"], **p["ARGS"])
    wrong = df[df["pred_clean"] != df["label"]]
    assert set(wrong["index"]) == set(range(0, 30, 7))
    assert wrong["success"].all() and (wrong["delta_l2"] == 0).all()
    assert (wrong["pred_adv"] == wrong["pred_clean"]).all()


def test_budgets_hold_and_the_model_is_left_as_it_was() -> None:
    p = _problem()
    model = p["model"].train()
    df = run_attacks(model, p["x"], p["y"], **p["ARGS"])
    l2, linf = df[df["norm"] == "l2"], df[df["norm"] == "linf"]
    assert (l2["delta_l2"] <= l2["eps"]).all() and (linf["delta_linf"] <= linf["eps"]).all()
    assert model.training and all(q.requires_grad for q in model.parameters())


def test_robust_accuracy_is_the_per_sample_worst_case_over_attacks() -> None:
    rows = []
    for attack, broken in (("a", {0, 1}), ("b", {1, 2})):
        for index in range(5):
            rows.append(dict(model="m", attack=attack, norm="l2", eps=0.5, index=index,
                             label=0, pred_clean=0 if index != 4 else 1,
                             pred_adv=1 if index in broken or index == 4 else 0,
                             success=index in broken or index == 4, delta_l2=0.1,
                             delta_linf=0.01, certified_radius_l2=float("nan")))
    df = pd.DataFrame(rows, columns=COLUMNS)
    table = robust_accuracy(df)
    assert table.loc[0, "robust_accuracy"] == pytest.approx(1 / 5)  # only sample 3 survives
    assert table.loc[0, "clean_accuracy"] == pytest.approx(4 / 5)
    assert table.loc[0, "attacks"] == "a,b"
    per_attack = attack_accuracy(df).set_index("attack")["robust_accuracy"]
    assert per_attack.to_dict() == {"a": pytest.approx(2 / 5), "b": pytest.approx(2 / 5)}


def test_same_seed_same_table_other_seed_other_starts() -> None:
    p = _problem()
    args = dict(p["ARGS"], attacks=["pgdl2"])
    first = run_attacks(p["model"], p["x"], p["y"], **args)
    again = run_attacks(p["model"], p["x"], p["y"], **args)
    other = run_attacks(p["model"], p["x"], p["y"], **dict(args, seed=6))
    pd.testing.assert_frame_equal(first, again)
    assert not first["delta_l2"].equals(other["delta_l2"])


def test_bad_inputs_are_clear_errors() -> None:
    p = _problem()
    model, x, y = p["model"], p["x"], p["y"]
    cases = [
        (dict(x=x * 2), "must lie in \\[0, 1\\]"),
        (dict(eps_linf=[8.0]), "covers the whole"),
        (dict(eps_l2=[100.0]), "diameter"),
        (dict(eps_l2=[]), "needs an L2 ε grid"),
        (dict(eps_l2=[-0.5]), "> 0"),
        (dict(y=y + 10), "only 10 classes"),
        (dict(attacks=["nope"]), "unknown attack"),
    ]
    for change, message in cases:
        args = {**p["ARGS"], "x": x, "y": y, **change}
        with pytest.raises(LipcertError, match=message):
            run_attacks(model, args.pop("x"), args.pop("y"), **args)


def test_output_file_refuses_other_settings(tmp_path: Path) -> None:
    p = _problem()
    out = tmp_path / "attacks.csv"
    args = dict(p["ARGS"], attacks=["fgsm"])
    df = run_attacks(p["model"], p["x"], p["y"], **args, output=out)
    pd.testing.assert_frame_equal(df, read_results(out))
    assert (tmp_path / "attacks.csv.meta.json").is_file()
    with pytest.raises(LipcertError, match=r"different settings.*seed"):
        run_attacks(p["model"], p["x"], p["y"], **dict(args, seed=9), output=out)
    run_attacks(p["model"], p["x"], p["y"], **dict(args, seed=9), output=out, overwrite=True)


def _run_script(out: Path, kill_after: int | None) -> subprocess.CompletedProcess:
    script = PROBLEM + textwrap.dedent(f"""
        import os, signal
        from attacks import run_attacks
        count = 0
        def on_key(key):
            global count
            count += 1
            if {kill_after!r} is not None and count >= {kill_after!r}:
                os.kill(os.getpid(), signal.SIGKILL)
        run_attacks(model, x, y, **ARGS, output={str(out)!r}, on_key=on_key)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_sigkilled_run_resumes_to_the_same_file(tmp_path: Path) -> None:
    p = _problem()
    reference = tmp_path / "reference.csv"
    run_attacks(p["model"], p["x"], p["y"], **p["ARGS"], output=reference)

    out = tmp_path / "attacks.csv"
    killed = _run_script(out, kill_after=9)
    assert killed.returncode == -9, killed.stderr
    written = out.read_text().splitlines()
    assert 1 < len(written) < len(reference.read_text().splitlines())
    # make it worse: cut the last key short and leave a torn line, as a kill mid-write would
    out.write_text("\n".join(written[:-3]) + "\n" + written[-3][:11])

    resumed = _run_script(out, kill_after=None)
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes() == reference.read_bytes()

"""attacks.registry: entries, defaults, overrides, ε parsing."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchattacks.attack import Attack

from attacks import REGISTRY, AttackSpec, parse_attacks, parse_eps, resolve, run_attacks
from lipcert.errors import LipcertError


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_parse_eps_numbers_and_fractions() -> None:
    assert parse_eps("8/255,0.1") == [8 / 255, 0.1]
    assert parse_eps(" 0.25 , 1 ,2/4") == [0.25, 1.0, 0.5]
    assert parse_eps("") == []
    assert parse_eps([0.5, 1]) == [0.5, 1.0]


@pytest.mark.parametrize("bad", ["0", "-0.1", "abc", "1/0", "nan", "inf", "0.1,0.1", "1/2/3",
                                 "0/255"])
def test_parse_eps_rejects_nonsense(bad: str) -> None:
    with pytest.raises(LipcertError, match="eps"):
        parse_eps(bad)


def test_the_issue_attacks_are_registered_with_a_norm() -> None:
    expected = {"fgsm": "linf", "pgd": "linf", "pgdl2": "l2", "apgd": "linf", "apgdl2": "l2",
                "autoattack": "linf", "autoattackl2": "l2", "cw": None, "deepfool": None}
    assert {name: REGISTRY[name].norm for name in expected} == expected
    for spec in REGISTRY.values():
        assert spec.grid_norm in ("l2", "linf") and spec.restarts >= 1


def test_every_entry_builds_its_torchattacks_class() -> None:
    model = _Linear()
    for name, spec in REGISTRY.items():
        eps = 0.1 if spec.norm else None
        attack = spec.build(model, eps, n_classes=4, seed=3)
        assert isinstance(attack, Attack), name
        if spec.norm:
            assert attack.eps == pytest.approx(0.1)
        if spec.step_fraction is not None:
            assert attack.alpha == pytest.approx(spec.step_fraction * 0.1)
        if spec.seeded:
            assert attack.seed == 3


def test_overrides_change_a_copy_only() -> None:
    spec = resolve("pgd", {"steps": 7, "step_fraction": 0.5, "restarts": 2})
    attack = spec.build(_Linear(), 0.2, n_classes=4, seed=0)
    assert (attack.steps, attack.alpha, spec.restarts) == (7, pytest.approx(0.1), 2)
    assert REGISTRY["pgd"].params["steps"] == 20 and REGISTRY["pgd"].restarts == 1
    with pytest.raises(LipcertError, match="set by the harness"):
        resolve("pgd", {"eps": 1.0})
    with pytest.raises(LipcertError, match="no step size"):
        resolve("fgsm", {"step_fraction": 0.1})
    with pytest.raises(LipcertError, match="restarts"):
        resolve("pgd", {"restarts": 0})
    with pytest.raises(LipcertError, match="bad parameters"):
        resolve("pgd", {"bogus": 1}).build(_Linear(), 0.1, n_classes=4, seed=0)


def test_unknown_attack_names_the_known_ones() -> None:
    with pytest.raises(LipcertError, match=r"unknown attack 'nope'.*pgdl2"):
        parse_attacks("pgd,nope")
    with pytest.raises(LipcertError, match="twice"):
        parse_attacks("pgd,pgd")
    assert parse_attacks("fgsm, pgd") == ["fgsm", "pgd"]


def test_adding_an_attack_is_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY, "bim", AttackSpec("bim", "BIM", "linf", {"steps": 5},
                                                    step_fraction=0.25))
    torch.manual_seed(1)
    x = torch.rand(8, 1, 4, 4)
    model = _Linear()
    y = model(x).argmax(1)
    df = run_attacks(model, x, y, parse_attacks("bim"), eps_linf=[0.05, 0.3])
    assert set(df["attack"]) == {"bim"} and len(df) == 16
    assert (df["delta_linf"] <= df["eps"]).all() and df["success"].any()

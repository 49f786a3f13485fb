"""Models people already have, certified end to end through the command line.

The architectures of ``third_party_zoo`` (Hugging Face ViT, DeiT, Swin, ConvNeXt, ResNet,
BERT, DistilBERT, GPT-2, a Llama-style decoder; deel-torchlip's dense and convolutional
networks), each exported with ``torch.export`` (dynamic batch), saved with
``torch.export.save``, certified by ``lipcert certify`` globally and locally on the user's
own samples (``--inputs``, with ``--domain`` or ``--embedding-table``). The certificates are
checked against exact Jacobian spectral norms of the eager model in float64, at the samples
and at points found by gradient ascent on the Jacobian norm inside the set each bound covers
(the domain; the certified ball ∩ the domain). Margin mode is checked on the transformers it
covers, on deel-torchlip's sort and L2-norm-pooling networks and on a ResNet, by gradient
descent on the margins inside each certified radius.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from third_party_zoo import ARCHS, Prepared, largest_jacobian_norm, prepare, smallest_margin
from torch import nn

from lipcert.bounds.backward import margin_radii
from lipcert.cli import main

F64 = torch.float64


def certify_cli(p: Prepared, mode: str, out: Path, capsys) -> dict:
    """``lipcert certify`` on the saved program and samples; its JSON. No traceback, exit 0."""
    rc = main(["certify", str(p.pt2), "--inputs", str(p.pt2.parent / "inputs.safetensors"),
               *p.domain_args, "--mode", mode, "--no-lower", "-o", str(out)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert rc == 0, captured.err
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", list(ARCHS))
def test_certified_through_the_cli_and_sound(name: str, tmp_path: Path, capsys) -> None:
    """Global and local certificates from the saved program, through the CLI, bound the
    exact Jacobian norms at the samples and at searched points of the sets they cover."""
    p = prepare(name, tmp_path)
    glob = certify_cli(p, "global", tmp_path / "global.json", capsys)
    upper = float(glob["lipschitz"]["upper"])
    assert 0 < upper < math.inf
    assert glob["data"]["dataset"] == "user inputs"
    at_centre, searched = largest_jacobian_norm(p, p.x, None)
    assert float(torch.maximum(at_centre, searched).max()) <= upper * (1 + 1e-6)
    if ARCHS[name].kind == "deel":
        assert upper <= 1.01

    local = certify_cli(p, "local", tmp_path / "local.json", capsys)
    samples = local["samples"]
    lips = torch.tensor([float(s["lipschitz"]) for s in samples], dtype=F64)
    radii = torch.tensor([float(s["radius_l2"]) for s in samples], dtype=F64)
    assert bool((lips <= upper * (1 + 1e-9)).all())
    # Every prediction is its own label, so every sample has a margin > 0 and a radius.
    assert bool((radii > 0).all())
    at_centre, searched = largest_jacobian_norm(p, p.x, radii)
    assert bool((torch.maximum(at_centre, searched) <= lips * (1 + 1e-6)).all())


def test_zero_bound_model_prints_its_table(tmp_path: Path, capsys) -> None:
    """A model whose head is zero-initialised has the bound 0 (and a lower bound of 0):
    certify prints its table instead of failing to format the upper/lower ratio."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 10)).eval()
    nn.init.zeros_(model[3].weight)
    program = torch.export.export(model, (torch.rand(2, 1, 28, 28),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "zero.pt2")
    rc = main(["certify", str(tmp_path / "zero.pt2"), "--data", "mnist", "--n", "5",
               "--lower-budget-s", "0.5", "-o", str(tmp_path / "c.json")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "empirical lower bound: 0  (ratio n/a)" in out.out
    assert json.loads((tmp_path / "c.json").read_text())["lipschitz"]["upper"] == 0


@pytest.mark.parametrize("name", ["vit", "distilbert", "gpt2", "llama"])
def test_margin_mode_through_the_cli(name: str, tmp_path: Path, capsys) -> None:
    """Margin mode (margin-gradient bounds with symbolic remainders) on the saved program:
    no sample's radius below the local mode's, the margin certificate gives some of them,
    and gradient descent on the margins finds no other label inside any certified radius."""
    p = prepare(name, tmp_path)
    local = certify_cli(p, "local", tmp_path / "local.json", capsys)["samples"]
    margin = certify_cli(p, "margin", tmp_path / "margin.json", capsys)["samples"]
    r_local = torch.tensor([float(s["radius_l2"]) for s in local], dtype=F64)
    radii = torch.tensor([float(s["radius_l2"]) for s in margin], dtype=F64)
    assert bool((radii >= r_local * (1 - 1e-12)).all())
    assert "margin" in {s["radius_method"] for s in margin}
    worst = smallest_margin(p, radii)
    assert bool((worst[radii > 0] > 0).all()), worst


@pytest.mark.parametrize("name", ["deel-dense", "deel-conv", "resnet"])
def test_margin_radii_of_sorting_and_pooling_networks(name: str, tmp_path: Path) -> None:
    """deel-torchlip's networks (GroupSort2 as ``sort``, L2-norm pooling) and a ResNet
    (eval-mode batch norm, max pooling, adaptive average pooling) in margin mode, from the
    saved program: every sample gets a margin-certificate radius, and gradient descent on
    the margins finds no other label inside it. (The CLI keeps the largest sound radius,
    which for the nearly gradient-norm-preserving deel networks is mostly the global one,
    so the margin radii are checked here directly.)"""
    p = prepare(name, tmp_path)
    found = margin_radii(torch.export.load(p.pt2), p.x, p.y, domain=(0.0, 1.0))
    assert bool((found.radius > 0).all())
    worst = smallest_margin(p, found.radius)
    assert bool((worst > 0).all()), worst

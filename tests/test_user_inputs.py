"""The user's own samples and domains (``--inputs``, ``--domain``, ``--embedding-table``) in
``lipcert certify``, ``attack`` and ``report``, and the reshape of samples to a model's input
shape."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lipcert.bounds import BoxDomain, EmbeddingDomain
from lipcert.cli import main
from lipcert.errors import LipcertError
from lipcert.user_inputs import describe_domain, domain_from_table, parse_domain


@pytest.fixture(scope="module")
def mlp_pt2(tmp_path_factory) -> tuple[nn.Module, Path]:
    """An MLP on flat (B, 784) inputs, exported with a dynamic batch."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    program = torch.export.export(mlp, (torch.rand(2, 784),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path_factory.mktemp("mlp") / "mlp.pt2"
    torch.export.save(program, path)
    return mlp, path


def _inputs(path: Path, mlp: nn.Module, n: int = 6, lo: float = 0.0, hi: float = 1.0) -> Path:
    x = lo + (hi - lo) * torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = mlp(x.flatten(1)).argmax(1)
    save_file({"x": x, "y": y}, path)
    return path


def _error(capsys, rc: int) -> str:
    out = capsys.readouterr()
    assert rc == 2
    assert "Traceback" not in out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_mnist_images_are_reshaped_for_a_flat_model(mlp_pt2, tmp_path, capsys) -> None:
    """An MLP on (B, 784) given MNIST's (1, 28, 28): reshaped, said in one line, recorded
    in the certificate and in the attack settings."""
    _, pt2 = mlp_pt2
    out = tmp_path / "cert.json"
    assert main(["certify", str(pt2), "--data", "mnist", "--n", "8", "--no-lower",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "samples reshaped from (1, 28, 28) to the model's input shape (784,)" in printed
    data = json.loads(out.read_text())["data"]
    assert data["input_reshape"] == {"from": [1, 28, 28], "to": [784]}
    assert data["domain"] == "box:0.0,1.0"
    csv = tmp_path / "attacks.csv"
    assert main(["attack", str(pt2), "--data", "mnist", "--n", "4", "--attacks", "fgsm",
                 "--eps-linf", "0.05", "--quiet", "-o", str(csv)]) == 0
    assert "samples reshaped from (1, 28, 28)" in capsys.readouterr().out
    meta = json.loads(csv.with_name("attacks.csv.meta.json").read_text())
    assert meta["models"]["mlp"]["input_reshape"] == {"from": [1, 28, 28], "to": [784]}


def test_a_shape_that_does_not_fit_names_both(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(100, 10)).eval()
    program = torch.export.export(net, (torch.rand(2, 100),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "net.pt2")
    line = _error(capsys, main(["certify", str(tmp_path / "net.pt2"), "--data", "mnist",
                                "--n", "4", "-o", str(tmp_path / "c.json")]))
    assert "(1, 28, 28)" in line and "(100,)" in line and "784" in line
    assert not (tmp_path / "c.json").exists()


def test_certify_attack_and_report_on_user_inputs(mlp_pt2, tmp_path, capsys) -> None:
    """The user's samples on the box [-1, 1]: certified locally, attacked (inside the box,
    with the radius audit), and the run folder reported."""
    mlp, pt2 = mlp_pt2
    inputs = _inputs(tmp_path / "in.safetensors", mlp, lo=-1.0, hi=1.0)
    run = tmp_path / "run"
    cert = run / "certificate-local.json"
    assert main(["certify", str(pt2), "--inputs", str(inputs), "--domain", "box:-1,1",
                 "--mode", "local", "--lower-budget-s", "0.5", "-o", str(cert)]) == 0
    doc = json.loads(cert.read_text())
    assert doc["data"]["domain"] == "box:-1.0,1.0"
    assert doc["data"]["dataset"] == "user inputs" and doc["data"]["n"] == 6
    assert len(doc["data"]["inputs_sha256"]) == 64
    assert all(s["radius_l2"] > 0 for s in doc["samples"])  # labels are the predictions
    csv = run / "attacks.csv"
    rc = main(["attack", str(pt2), "--inputs", str(inputs), "--domain", "box:-1,1",
               "--attacks", "pgdl2", "--eps-l2", "0.5", "--certificate", str(cert),
               "--audit-radius", "--audit-steps", "5", "--audit-restarts", "1", "--quiet",
               "-o", str(csv)])
    assert rc == 0
    capsys.readouterr()
    results = pd.read_csv(csv)
    assert len(results) == 6 and (results["delta_l2"] <= 0.5 + 1e-6).all()
    meta = json.loads(csv.with_name("attacks.csv.meta.json").read_text())
    assert meta["models"]["mlp"]["domain"] == "box:-1.0,1.0"
    assert main(["report", str(run), "-o", str(tmp_path / "report")]) == 0
    summary = capsys.readouterr().out
    assert "user inputs" in summary and "violations" in summary
    assert (tmp_path / "report" / "report.html").is_file()


def test_embedding_table_domain(tmp_path) -> None:
    table = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    save_file({"wte": table}, tmp_path / "t.safetensors")
    dom = domain_from_table(tmp_path / "t.safetensors")
    assert isinstance(dom, EmbeddingDomain) and 5.0 < dom.max_norm <= 5.0 * (1 + 1e-11)
    save_file({"a": table, "b": table.clone()}, tmp_path / "two.safetensors")
    with pytest.raises(LipcertError, match="one 2-D"):
        domain_from_table(tmp_path / "two.safetensors")


@pytest.mark.parametrize("text, domain", [
    ("box:0,1", BoxDomain(0.0, 1.0)), ("box:-2.5,3", BoxDomain(-2.5, 3.0)),
    ("none", BoxDomain(-math.inf, math.inf)), ("embedding-ball:1.5", EmbeddingDomain(1.5)),
])
def test_domains_parse_and_print_back(text: str, domain) -> None:
    assert parse_domain(text) == domain
    assert parse_domain(describe_domain(domain)) == domain


@pytest.mark.parametrize("text", ["box:1,0", "box:0", "box:0,inf", "ball:1", "none:1",
                                  "embedding-ball:0", "embedding-ball:x", ""])
def test_bad_domains_are_refused(text: str) -> None:
    with pytest.raises(LipcertError, match="--domain"):
        parse_domain(text)


@pytest.mark.parametrize("tensors, args, message", [
    ({"x": torch.rand(3, 784), "y": torch.tensor([0, 1, 2]), "z": torch.zeros(1)},
     ["--domain", "box:0,1"], "exactly the tensors 'x' and 'y'"),
    ({"x": torch.rand(3, 784), "y": torch.tensor([0.0, 1.0, 2.0])},
     ["--domain", "box:0,1"], "integer class labels"),
    ({"x": torch.randint(0, 2, (3, 784)), "y": torch.tensor([0, 1, 2])},
     ["--domain", "box:0,1"], "floating point"),
    ({"x": torch.rand(3, 784), "y": torch.tensor([0, 1])},
     ["--domain", "box:0,1"], "one label per sample"),
    ({"x": torch.rand(3, 784).index_fill(1, torch.tensor([5]), math.nan),
      "y": torch.tensor([0, 1, 2])}, ["--domain", "box:0,1"], "NaN"),
    ({"x": torch.rand(3, 784), "y": torch.tensor([0, 10, 2])},
     ["--domain", "box:0,1"], "label 10 is out of range for a model with 10 classes"),
    ({"x": torch.rand(3, 784) * 3, "y": torch.tensor([0, 1, 2])},
     ["--domain", "box:0,1"], "outside the input domain box:0.0,1.0"),
    ({"x": torch.rand(3, 784), "y": torch.tensor([0, 1, 2])}, [], "--inputs needs"),
    ({"x": torch.rand(3, 784), "y": torch.tensor([0, 1, 2])},
     ["--domain", "box:0,1", "--data", "mnist"], "either --data or --inputs"),
    ({"x": torch.rand(3, 5), "y": torch.tensor([0, 1, 2])},
     ["--domain", "box:0,1"], "(5,)"),
])
def test_bad_inputs_fail_in_one_line_without_output(mlp_pt2, tmp_path, capsys, tensors, args,
                                                    message) -> None:
    _, pt2 = mlp_pt2
    save_file(tensors, tmp_path / "in.safetensors")
    for verb, out in (("certify", tmp_path / "c.json"), ("attack", tmp_path / "a.csv")):
        extra = ["--attacks", "fgsm", "--eps-linf", "0.05"] if verb == "attack" else []
        line = _error(capsys, main([verb, str(pt2), "--inputs", str(tmp_path / "in.safetensors"),
                                    *args, *extra, "-o", str(out)]))
        assert message in line
        assert not out.exists()


def test_a_text_model_on_embeddings_with_its_table(tmp_path, capsys) -> None:
    """A sequence model exported on embeddings (B, T, d) → last-position logits, certified
    on an embedding ball given by its table; tokens outside the ball are refused."""
    torch.manual_seed(0)
    table = torch.randn(12, 8)

    class Last(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, 12)

        def forward(self, e: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.mix(e)).mean(1))

    model = Last().eval()
    x = table[torch.randint(0, 12, (4, 5))]
    with torch.no_grad():
        y = model(x).argmax(1)
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, tmp_path / "lm.pt2")
    save_file({"x": x, "y": y}, tmp_path / "in.safetensors")
    save_file({"wte": table}, tmp_path / "table.safetensors")
    out = tmp_path / "c.json"
    assert main(["certify", str(tmp_path / "lm.pt2"), "--inputs", str(tmp_path / "in.safetensors"),
                 "--embedding-table", str(tmp_path / "table.safetensors"), "--no-lower",
                 "-o", str(out)]) == 0
    capsys.readouterr()
    radius = float(torch.linalg.vector_norm(table.double(), dim=1).max())
    domain = json.loads(out.read_text())["data"]["domain"]
    assert domain.startswith("embedding-ball:")
    assert radius <= float(domain.split(":")[1]) <= radius * (1 + 1e-11)
    save_file({"x": x * 10, "y": y}, tmp_path / "far.safetensors")
    line = _error(capsys, main(["certify", str(tmp_path / "lm.pt2"), "--inputs",
                                str(tmp_path / "far.safetensors"), "--embedding-table",
                                str(tmp_path / "table.safetensors"), "-o", str(out)]))
    assert "outside the input domain embedding-ball:" in line

"""Certificates: JSON layout and its round trip, the radius convention, local bisection, PGD
inside the balls."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from torch import Tensor, nn

from lipcert.bounds import Propagator
from lipcert.certificate import (
    RADIUS_CONVENTION,
    Certificate,
    ModelIdentity,
    certify,
)
from lipcert.certificate_schema import KINDS
from lipcert.errors import LipcertError
from lipcert.models import EmbeddingSpaceGPT, ModelConfig, build_model
from lipcert.models.adapters import LastPosition, embedding_domain

F64 = torch.float64


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 5)).eval()


def _vit() -> nn.Module:
    torch.manual_seed(4)
    cfg = ModelConfig(arch="vit", family="lipschitz", d_model=16, n_layers=2, n_heads=2,
                      image_size=8, patch_size=4, final_scale=4.0)
    return build_model(cfg).eval()


def test_json_layout_and_radius_convention() -> None:
    model = _mlp()
    x = torch.rand(12, 4, 4)
    logits = model(x).detach().double()
    labels = logits.argmax(1)
    labels[:3] = (labels[:3] + 1) % 5  # three misclassified samples
    cert = certify(model, x, labels, eps=(0.0, 0.01, 0.1), indices=range(100, 112))
    doc = cert.to_json()
    json.dumps(doc)  # serialisable
    assert doc["norm"] == "l2" and doc["mode"] == "global"
    assert doc["radius_convention"] == RADIUS_CONVENTION
    assert set(doc["lipschitz"]) >= {"upper", "lower", "ratio"}
    assert doc["lipschitz"]["lower"] is None and doc["lipschitz"]["ratio"] is None
    for row in doc["layers"]:
        assert set(row) == {"name", "kind_of_layer", "upper", "kind", "params"}
        assert row["kind"] == "upper"
    L = cert.lipschitz_upper
    n = 16
    for i, s in enumerate(doc["samples"]):
        assert set(s) >= {"index", "label", "pred", "margin", "radius_l2", "radius_linf"}
        assert s["index"] == 100 + i
        z = logits[i]
        y = int(labels[i])
        margin = float(z[y] - torch.cat([z[:y], z[y + 1 :]]).max())
        assert s["margin"] == pytest.approx(margin, rel=1e-6, abs=1e-7)
        if s["pred"] == s["label"] and margin > 0:
            assert s["radius_l2"] == pytest.approx(margin / (math.sqrt(2) * L), rel=1e-9)
        else:
            assert s["radius_l2"] == 0.0
        assert s["radius_linf"] == pytest.approx(s["radius_l2"] / math.sqrt(n), rel=1e-12)
    radii = torch.tensor([s["radius_l2"] for s in doc["samples"]])
    for row in doc["certified_accuracy"]:
        assert row["accuracy"] == pytest.approx(float((radii > row["eps"]).double().mean()))
    assert doc["certified_accuracy"][0]["accuracy"] <= 9 / 12
    assert {"export", "forward", "global_bound", "total"} <= set(doc["timing_s"])
    # an empirical lower bound attached later gives the ratio
    with_lower = cert.with_lower(L / 4)
    assert with_lower.to_json()["lipschitz"]["ratio"] == pytest.approx(4.0)
    assert "Lipschitz upper bound" in with_lower.format_table()


def test_global_bound_dominates_exact_jacobian_of_mlp() -> None:
    model = _mlp()
    cert = certify(model, torch.rand(2, 4, 4), torch.zeros(2, dtype=torch.long))
    W1, W2 = (m.weight.detach().double() for m in (model[1], model[3]))
    naive = 1.1289042 * float(torch.linalg.matrix_norm(W1, 2) * torch.linalg.matrix_norm(W2, 2))
    assert cert.lipschitz_upper <= naive * (1 + 1e-6)


def test_local_radii_are_verified() -> None:
    """Each local radius satisfies margin ≥ √2·L(x, r)·r when re-propagated at r."""
    model = _vit()
    x = torch.rand(6, 1, 8, 8)
    labels = model(x).argmax(1)
    cert = certify(model, x, labels, mode="local", bisection_steps=12)
    glob = certify(model, x, labels, mode="global")
    prop = Propagator.from_model(model, x[:2])
    r = torch.tensor([s.radius_l2 for s in cert.samples], dtype=F64)
    lip = prop.run((0.0, 1.0), center=x, radius=r).lip * (1 + 1e-9)
    for i, (s, g) in enumerate(zip(cert.samples, glob.samples, strict=True)):
        assert s.radius_l2 >= g.radius_l2
        if s.radius_l2 > g.radius_l2:
            assert s.margin >= math.sqrt(2) * float(lip[i]) * s.radius_l2 * (1 - 1e-9)
            assert s.lipschitz == pytest.approx(float(lip[i]), rel=1e-6)
    assert cert.to_json()["lipschitz"]["local_upper"]["max"] <= cert.lipschitz_upper


def _pgd_l2(model: nn.Module, x: Tensor, y: Tensor, r: Tensor, steps: int, g) -> Tensor:
    """Hand-written PGD-L2 on the margin, started at a random point of each ball ∩ [0, 1]:
    returns the smallest margin z_y − max_{j≠y} z_j seen at any iterate, per sample."""
    shape = (-1, *([1] * (x.dim() - 1)))

    def project(z: Tensor) -> Tensor:
        z = z.clamp(0, 1)
        d = z - x
        nrm = d.flatten(1).norm(dim=1).clamp_min(1e-30)
        return (x + d * torch.clamp(r / nrm, max=1.0).reshape(shape)).clamp(0, 1)

    d0 = torch.randn(x.shape, generator=g)
    d0 = d0 / d0.flatten(1).norm(dim=1).reshape(shape) * r.reshape(shape)
    z = project(x + d0 * torch.rand(r.shape, generator=g).reshape(shape))
    worst = torch.full((x.shape[0],), math.inf)
    step = (2.5 * r / steps).reshape(shape)
    for _ in range(steps + 1):
        z = z.detach().requires_grad_(True)
        logits = model(z)
        zy = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], -math.inf).amax(1)
        margin = zy - other
        worst = torch.minimum(worst, margin.detach())
        (grad,) = torch.autograd.grad(-margin.sum(), z)
        gn = grad.flatten(1).norm(dim=1).clamp_min(1e-30).reshape(shape)
        z = project(z.detach() + step * grad / gn)
    return worst


@pytest.mark.parametrize("mode", ["global", "local"])
def test_pgd_finds_nothing_inside_certified_balls(mode: str) -> None:
    model = _vit()
    g = torch.Generator().manual_seed(11)
    x = torch.rand(8, 1, 8, 8, generator=g)
    y = model(x).argmax(1)
    cert = certify(model, x, y, mode=mode, bisection_steps=10)
    r = torch.tensor([s.radius_l2 for s in cert.samples], dtype=torch.float32)
    assert bool((r > 0).all())
    for restart in range(5):
        worst = _pgd_l2(model, x, y, r, steps=100, g=g)
        assert bool((worst > 0).all()), (restart, worst)


def test_gpt_certified_in_embedding_space() -> None:
    torch.manual_seed(2)
    gpt = build_model(ModelConfig(arch="gpt", family="lipschitz", d_model=16, n_layers=1,
                                  n_heads=2, vocab_size=9, context=5)).eval()
    model = LastPosition(EmbeddingSpaceGPT(gpt)).eval()
    idx = torch.randint(0, 9, (4, 5))
    e = gpt.token_embeddings(idx).detach()
    dom = embedding_domain(model)
    rows = gpt.embedding_table().detach().double().norm(dim=1)
    assert float(rows.max()) <= dom.max_norm <= float(rows.max()) * (1 + 1e-9)
    target = model(e).argmax(1)
    for mode in ("global", "local"):
        cert = certify(model, e, target, domain=dom, mode=mode, bisection_steps=4)
        assert cert.input_elements == 5 * 16
        assert all(s.radius_l2 > 0 for s in cert.samples)


def test_static_batch_program_is_padded() -> None:
    model = _mlp()
    x = torch.rand(7, 4, 4)
    y = model(x).argmax(1)
    static = torch.export.export(model, (torch.rand(3, 4, 4),))  # fixed batch of 3
    a = certify(static, x, y, mode="local", bisection_steps=6)
    b = certify(model, x, y, mode="local", bisection_steps=6)
    assert a.lipschitz_upper == pytest.approx(b.lipschitz_upper, rel=1e-12)
    for sa, sb in zip(a.samples, b.samples, strict=True):
        # margins come from float32 forward passes, whose rounding depends on the batch
        assert sa.margin == pytest.approx(sb.margin, rel=1e-5, abs=1e-6)
        assert sa.radius_l2 == pytest.approx(sb.radius_l2, rel=1e-5, abs=1e-7)


def test_margins_come_from_the_programs_own_forward_pass() -> None:
    """certify runs the program's graph module on the lifted weights: the logits are
    those of ``program.module()``, bit for bit, chunk by chunk."""
    model = _vit()
    x = torch.rand(9, 1, 8, 8)
    program = torch.export.export(model, (x[:2],),
                                  dynamic_shapes=({0: torch.export.Dim.AUTO},))
    y = torch.arange(9) % 10
    cert = certify(program, x, y, batch_size=4)
    with torch.no_grad():
        z = torch.cat([program.module()(x[a:a + 4]) for a in range(0, 9, 4)]).double()
    own = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], -math.inf).amax(1)
    assert [s.margin for s in cert.samples] == (own - other).tolist()
    assert [s.pred for s in cert.samples] == z.argmax(1).tolist()


def test_bad_inputs_are_clear_errors() -> None:
    model = _mlp()
    x = torch.rand(3, 4, 4)
    y = torch.zeros(3, dtype=torch.long)
    with pytest.raises(LipcertError, match="outside the input domain"):
        certify(model, x + 2, y)
    with pytest.raises(LipcertError, match="outside the input domain"):
        certify(model, torch.where(x > 0.5, math.nan, x), y)
    with pytest.raises(LipcertError, match="mode"):
        certify(model, x, y, mode="other")
    with pytest.raises(LipcertError, match="lengths"):
        certify(model, x, y[:2])
    with pytest.raises(LipcertError, match="2 indices for 3 samples"):
        certify(model, x, y, indices=[0, 1])
    program = torch.export.export(model, (x,))
    with pytest.raises(LipcertError, match="do not fit the program's input shape"):
        certify(program, torch.rand(3, 2, 8), y)

    class Seq(nn.Module):
        def forward(self, z: Tensor) -> Tensor:
            return z * 2

    with pytest.raises(LipcertError, match="LastPosition"):
        certify(Seq(), torch.rand(2, 3, 4), torch.zeros(2, dtype=torch.long))


def test_certificate_dataclass_roundtrip() -> None:
    cert = Certificate(mode="global", method="exact", lipschitz_upper=math.inf, layers=[],
                       samples=[], certified_accuracy=[], input_elements=4)
    doc = cert.to_json()
    assert doc["lipschitz"]["upper"] == "inf"
    assert cert.ratio is None
    assert Certificate.from_json(json.loads(json.dumps(doc))) == cert


def _identified(cert: Certificate) -> Certificate:
    search = {"budget_s": 5.0, "elapsed_s": 1.5, "stopped": "finished", "samples_scanned": 6,
              "ascent_steps": 50}
    return replace(cert, lower_method="gradient ascent", lower_search=search,
                   timing_s={**cert.timing_s, "lower_search": 1.5},
                   data={"dataset": "mnist", "n": 6, "description": "first 6"},
                   model=ModelIdentity("runs/x", "run", "ab" * 32),
                   versions={"python": "3.11.7", "torch": "2.13.0"}).with_lower(0.5)


@pytest.mark.parametrize("mode", ["global", "local"])
def test_from_json_inverts_to_json(mode: str) -> None:
    """Certificate → JSON text → Certificate is the identity, and so is JSON → Certificate →
    JSON, for certificates with and without what ``lipcert certify`` adds."""
    model = _vit()
    x = torch.rand(6, 1, 8, 8)
    cert = certify(model, x, model(x).argmax(1), mode=mode, bisection_steps=3)
    assert len(cert.layers) > 0 and len(cert.samples) == 6
    for c in (cert, _identified(cert)):
        text = json.dumps(c.to_json())
        back = Certificate.from_json(json.loads(text), "cert")
        assert back == c
        assert json.dumps(back.to_json()) == text
    assert ("local_upper" in cert.to_json()["lipschitz"]) == (mode == "local")


@pytest.mark.parametrize("mode", ["global", "local"])
def test_identity_fields_give_the_documents_lipcert_certify_wrote(mode: str) -> None:
    """``lipcert certify`` builds its document by adding keys to ``to_json()``
    (``lipcert.certify_run``); setting the same values as fields gives that document, key
    order included (so the same bytes)."""
    model = _mlp()
    x = torch.rand(5, 4, 4)
    cert = certify(model, x, model(x).argmax(1), mode=mode, bisection_steps=3).with_lower(0.5)
    assembled = cert.to_json()
    assembled["lipschitz"]["lower_method"] = "gradient ascent"
    assembled["lipschitz"]["lower_search"] = {"budget_s": 5.0, "elapsed_s": 1.5,
                                              "stopped": "finished", "samples_scanned": 6,
                                              "ascent_steps": 50}
    assembled["timing_s"]["lower_search"] = 1.5
    assembled["kinds"] = {"upper": "certified upper bound", "lower": "empirical witness "
                          "(a Jacobian norm measured at some input)"}
    assembled["model"] = {"source": "runs/x", "kind": "run", "weights_sha256": "ab" * 32}
    assembled["data"] = {"dataset": "mnist", "n": 6, "description": "first 6"}
    assembled["versions"] = {"python": "3.11.7", "torch": "2.13.0"}
    assert json.dumps(_identified(cert).to_json()) == json.dumps(assembled)
    assert assembled["kinds"] == KINDS


def test_non_finite_numbers_round_trip() -> None:
    cert = certify(_mlp(), torch.rand(3, 4, 4), torch.zeros(3, dtype=torch.long))
    cert = replace(cert, lipschitz_upper=math.inf, samples=[
        replace(s, margin=-math.inf, radius_l2=0.0, radius_linf=0.0, lipschitz=math.inf)
        for s in cert.samples[1:]] + [replace(cert.samples[0], radius_l2=math.inf,
                                              radius_linf=math.inf, lipschitz=0.0)])
    doc = json.loads(json.dumps(cert.to_json(), allow_nan=False))  # standard JSON
    assert doc["samples"][0]["margin"] == "-inf" and doc["samples"][0]["lipschitz"] == "inf"
    assert doc["samples"][-1]["radius_l2"] == "inf" == doc["samples"][-1]["radius_linf"]
    assert Certificate.from_json(doc) == cert


def test_malformed_documents_are_one_line_errors() -> None:
    good = certify(_mlp(), torch.rand(3, 4, 4), torch.zeros(3, dtype=torch.long)).to_json()
    cases = [
        ([], "must hold a JSON object"),
        ({"norm": "l2"}, "no 'lipschitz.upper'"),
        ({**good, "lipschitz": {"upper": "big"}}, "lipschitz.upper: expected a number"),
        ({**good, "mode": "regional"}, "unknown mode 'regional'"),
        ({k: v for k, v in good.items() if k != "input_elements"}, "no 'input_elements'"),
        ({**good, "layers": [{"name": "a"}]}, "layer 0 is malformed"),
        ({**good, "certified_accuracy": [{"eps": 0.1}]}, "malformed certified_accuracy"),
        ({**good, "samples": [{**good["samples"][0], "radius_linf": -0.5}]}, "radii are ≥ 0"),
        ({**good, "versions": {"torch": 2}}, "'versions' must map"),
    ]
    for doc, message in cases:
        with pytest.raises(LipcertError, match=message) as err:
            Certificate.from_json(doc, "cert.json")
        assert "\n" not in str(err.value)

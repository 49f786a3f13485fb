"""attacks.embedding: torchattacks in a GPT's embedding space, through the box adapter."""

from __future__ import annotations

import pytest
import torch
import torchattacks

from attacks import EmbeddingBox, NextTokenClassifier, project, run_attacks
from attacks.embedding import four_d_shape
from lipcert.errors import LipcertError
from lipcert.models import EmbeddingSpaceGPT, ModelConfig, build_model


@pytest.fixture(scope="module")
def gpt_problem():
    """A random standard GPT; labels are its own clean predictions at the last position,
    so every success is a changed prediction."""
    torch.manual_seed(0)
    config = ModelConfig(arch="gpt", family="standard", d_model=32, n_layers=1, n_heads=2,
                         vocab_size=84, context=12)
    gpt = build_model(config).eval()
    tokens = torch.randint(0, 84, (24, 12))
    with torch.no_grad():
        embeddings = gpt.token_embeddings(tokens)
    classifier = NextTokenClassifier(EmbeddingSpaceGPT(gpt)).eval()
    with torch.no_grad():
        labels = classifier(embeddings).argmax(1)
    max_norm = float(gpt.embedding_table().detach().norm(dim=1).max())
    box = EmbeddingBox.for_token_norm(max_norm, eps_max=2.0)
    return gpt, classifier, embeddings, labels, box


def test_pgdl2_breaks_on_3d_inputs_without_the_adapter(gpt_problem) -> None:
    """The pitfall the adapter exists for: PGDL2's .view(B, 1, 1, 1) on (B, T, d)."""
    _, classifier, embeddings, labels, _ = gpt_problem
    with pytest.raises(RuntimeError):
        torchattacks.PGDL2(classifier, eps=0.5, alpha=0.1, steps=2)(embeddings, labels)


def test_box_map_is_exact_and_four_dimensional(gpt_problem) -> None:
    _, classifier, embeddings, _, box = gpt_problem
    u = box.encode(embeddings)
    assert u.shape == (24, 1, 12, 32) == four_d_shape(tuple(embeddings.shape))
    assert u.min() >= 0.25 and u.max() <= 0.75  # margin 2: the clean points sit mid-box
    assert torch.equal(box.decode(embeddings, u, u), embeddings)
    assert box.box_eps(0.7) * box.scale == pytest.approx(0.7, rel=1e-15)
    wrapped = box.wrap(classifier, (12, 32))
    with torch.no_grad():
        assert torch.allclose(wrapped(u), classifier(embeddings), atol=1e-5)
    with pytest.raises(LipcertError, match="too narrow"):
        EmbeddingBox(0.5).validate(embeddings, [1.0], [])


@pytest.mark.parametrize("name,norm,eps", [("pgdl2", "l2", 1.5), ("apgdl2", "l2", 1.5),
                                           ("pgd", "linf", 0.2), ("fgsm", "linf", 0.2)])
def test_raw_attack_stays_in_the_rescaled_ball_and_clamp_never_binds(gpt_problem, name, norm,
                                                                     eps) -> None:
    """Before the harness's own projection: the perturbation torchattacks makes in the box,
    mapped back, is within ε up to float rounding, and no box coordinate touched 0 or 1."""
    from attacks import resolve

    _, classifier, embeddings, labels, box = gpt_problem
    u = box.encode(embeddings)
    attack = resolve(name).build(box.wrap(classifier, (12, 32)), box.box_eps(eps),
                                 n_classes=84, seed=0)
    torch.manual_seed(0)
    u_adv = attack(u, labels)
    assert u_adv.min() > 0 and u_adv.max() < 1
    delta = (box.decode(embeddings, u, u_adv) - embeddings).double().flatten(1)
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)
    assert (size <= eps * (1 + 1e-5)).all()
    assert (size >= 0.5 * eps).all()  # the budget was actually used, per sample


@pytest.mark.parametrize("attacks", [["fgsm", "pgd", "pgdl2", "apgd", "apgdl2"],
                                     ["cw", "deepfool"]])
def test_every_perturbation_is_within_eps_in_embedding_space(gpt_problem, attacks) -> None:
    _, classifier, embeddings, labels, box = gpt_problem
    params = {"cw": {"steps": 20}, "deepfool": {"steps": 10}}
    df = run_attacks(classifier, embeddings, labels, attacks, eps_l2=[0.5, 2.0],
                     eps_linf=[0.05, 0.2], space=box, batch_size=10,
                     params={a: params[a] for a in attacks if a in params})
    l2, linf = df[df["norm"] == "l2"], df[df["norm"] == "linf"]
    assert (l2["delta_l2"] <= l2["eps"]).all() and (linf["delta_linf"] <= linf["eps"]).all()
    assert df["success"].any()


def test_the_attack_changes_predictions_of_a_gpt(gpt_problem) -> None:
    """Check the flips directly on the GPT: decode, project, run forward_embeddings."""
    gpt, classifier, embeddings, labels, box = gpt_problem
    eps = 2.0
    u = box.encode(embeddings)
    attack = torchattacks.PGDL2(box.wrap(classifier, (12, 32)), eps=box.box_eps(eps),
                                alpha=box.box_eps(eps) / 8, steps=20)
    torch.manual_seed(0)
    x_adv = project(embeddings, box.decode(embeddings, u, attack(u, labels)), "l2", eps, box)
    with torch.no_grad():
        pred = gpt.forward_embeddings(x_adv)[:, -1].argmax(dim=1)
    flipped = pred != labels
    assert flipped.sum() >= 3
    assert ((x_adv.double() - embeddings.double()).flatten(1).norm(dim=1) <= eps).all()
    assert x_adv.norm(dim=-1).max() <= box.max_token_norm * (1 + 1e-6)  # the domain
    df = run_attacks(classifier, embeddings, labels, ["pgdl2"], eps_l2=[eps], space=box)
    assert df["success"].sum() >= 3 and (df["pred_adv"] != df["pred_clean"]).sum() >= 3


def test_projection_keeps_budget_and_token_domain_in_both_norms(gpt_problem) -> None:
    _, _, embeddings, _, box = gpt_problem
    torch.manual_seed(1)
    far = embeddings + 3.0 * torch.randn_like(embeddings)
    for norm, eps in (("l2", 1.0), ("linf", 0.3)):
        x_adv = project(embeddings, far, norm, eps, box)
        delta = (x_adv.double() - embeddings.double()).flatten(1)
        size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)
        assert (size <= eps).all() and (size > 0).all()
        assert x_adv.norm(dim=-1).max() <= box.max_token_norm * (1 + 1e-6)

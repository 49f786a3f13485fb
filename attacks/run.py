"""Attack models given by name, as ``lipcert attack`` does, in one function call.

``attack_models`` loads each MODEL (a run directory, a ``.pt2`` file, or
``package.module:factory`` with ``weights``; ``lipcert.loading.load_model``) and the samples
``lipcert certify`` uses (``lipcert.samples.select_samples``), so certificates line up by
``index``:

* image data: the first N images of the dataset's test split (``index`` = position there);
* text data (a GPT run directory): N windows of the model's context length T from the
  validation split, starting at 0, T, 2T, … (``index`` = the start offset); the label is
  the character after the window, and the attack perturbs the window's token embeddings
  (``attacks.embedding``), with ε in the L2 (Frobenius) or L∞ norm of the whole T×d
  embedded sequence and every token kept within the embedding table's largest row norm
  (the domain the certificates hold on).

Outputs: the per-sample CSV (resumable; ``attacks.results``) with its ``.meta.json``;
with certificates, ``<stem>.violations.csv`` (header only when there is none); with
``minimal``, ``<stem>.minimal.csv`` (``attacks.minimal``); with ``audit_radius``,
``<stem>.radius-audit.csv``: every sample with a positive certified radius r attacked by
PGD-L2 at budget exactly r from random starts inside its ball (``attacks.audit.radius_audit``),
its violations joining ``<stem>.violations.csv``. Every file is written atomically.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from attacks.audit import (
    VIOLATION_COLUMNS,
    Certificate,
    certified_vs_robust,
    find_violations,
    load_certificate,
    minimal_violations,
    radius_audit,
    radius_violations,
)
from attacks.box_space import BoxSpace
from attacks.embedding import EmbeddingBox
from attacks.harness import attackable, robust_accuracy, run_attacks
from attacks.minimal import minimal_perturbation
from attacks.registry import (
    DEFAULT_ATTACKS,
    DEFAULT_EPS_L2,
    DEFAULT_EPS_LINF,
    parse_attacks,
    parse_eps,
    resolve,
)
from attacks.results import read_results
from attacks.space import AttackSpace, ImageSpace
from lipcert.atomic import write_text_atomic
from lipcert.bounds import BoxDomain, EmbeddingDomain, as_domain
from lipcert.data import load_dataset
from lipcert.distributed import resolve_device, world
from lipcert.errors import LipcertError
from lipcert.loading import LoadedModel, load_model
from lipcert.samples import select_samples
from lipcert.user_inputs import resolve_domain

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["AttackOutcome", "attack_models"]

Log = Callable[[str], None]


@dataclass
class AttackOutcome:
    """What ``attack_models`` found and wrote.

    ``results``: the rows of these models in ``output``; ``robust``: robust accuracy (worst
    case over attacks) per model, norm and ε; ``minimal`` / ``radius``: the minimal
    perturbations and the radius audit, with ``radius_summary`` per model;
    ``certified``: certified vs robust accuracy (with certificates); ``violations``: every
    certificate violation found (``None`` without certificates). ``files`` maps what was
    written (``results``, ``minimal``, ``radius-audit``, ``violations``) to its path.
    """

    results: pd.DataFrame
    robust: pd.DataFrame
    minimal: pd.DataFrame | None = None
    radius: pd.DataFrame | None = None
    radius_summary: pd.DataFrame | None = None
    certified: pd.DataFrame | None = None
    violations: pd.DataFrame | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def violation_count(self) -> int:
        return 0 if self.violations is None else len(self.violations)


@dataclass
class _Problem:
    """One model, ready to attack: a classifier, its inputs and where attacks run."""

    name: str
    classifier: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    indices: list[int]
    space: AttackSpace
    sha256: str | None
    describe: str
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def attack_models(
    models: Sequence[str | Path],
    *,
    data: str | None = None,
    output: str | Path,
    data_dir: str | None = None,
    attacks: str | Sequence[str] = DEFAULT_ATTACKS,
    attack_params: str | Mapping[str, Mapping[str, Any]] | None = None,
    eps_l2: str | Sequence[float] = DEFAULT_EPS_L2,
    eps_linf: str | Sequence[float] = DEFAULT_EPS_LINF,
    n: int = 1000,
    batch_size: int = 100,
    certificates: Sequence[str | Path] = (),
    seed: int = 0,
    device: str = "cpu",
    weights: str | None = None,
    trust_pickle: bool = False,
    minimal: bool = False,
    audit_radius: bool = False,
    audit_steps: int = 100,
    audit_restarts: int = 5,
    overwrite: bool = False,
    progress: bool = False,
    log: Log | None = None,
    inputs: str | Path | None = None,
    domain: str | None = None,
    embedding_table: str | Path | None = None,
) -> AttackOutcome:
    """Attack each of ``models`` on the first ``n`` samples of ``data`` with each attack
    at each ε of its norm's grid, and write ``output`` and its siblings (module docstring).

    ``attacks``: registry names (a list or ``"fgsm,pgd"``); ``attack_params``: per-attack
    overrides (a mapping or its JSON text); ``eps_l2``/``eps_linf``: ε grids (lists or
    text such as ``"8/255,0.1"``), only those of the chosen attacks' norms are used.
    ``certificates``: certificate JSONs, each matched to its model by the weights' sha256;
    an adversarial example inside a certified radius is a violation. ``audit_radius``
    (with certificates): PGD-L2 at each certified radius, ``audit_steps`` steps from
    ``audit_restarts`` random starts. ``inputs``: the user's samples instead of ``data``
    (a safetensors file with ``x`` and ``y``), on ``domain`` (``box:LO,HI``,
    ``embedding-ball:R``, ``none``) or that of ``embedding_table``
    (``lipcert.user_inputs``). ``log`` gets a line as each model's stage starts and ends
    (stage name and seconds) and any note on the samples (a reshape). Bad input raises
    ``LipcertError`` before anything is written. ``device``: cpu, cuda (under torchrun:
    each rank's own GPU) or auto.

    Under torchrun the ranks share each model's attack batches (``attacks.shards``) and
    rank 0 alone runs the minimal-perturbation search and the radius audit and writes
    every file; the other ranks return their outcome without them.
    """
    say = log or (lambda _line: None)
    names_of_attacks = parse_attacks(attacks)
    params = _attack_params(attack_params, names_of_attacks)
    used = {resolve(a, params.get(a)).grid_norm for a in names_of_attacks}
    grid_l2 = parse_eps(eps_l2, "--eps-l2") if "l2" in used else []
    grid_linf = parse_eps(eps_linf, "--eps-linf") if "linf" in used else []
    for norm, grid in (("l2", grid_l2), ("linf", grid_linf)):
        if norm in used and not grid:
            raise LipcertError(f"the chosen attacks need a --eps-{norm} grid")
    if n < 1 or batch_size < 1:
        raise LipcertError("--n and --batch-size must be >= 1")
    if audit_radius and not certificates:
        raise LipcertError("--audit-radius needs a --certificate to audit")
    if audit_steps < 1 or audit_restarts < 1:
        raise LipcertError("--audit-steps and --audit-restarts must be >= 1")
    device = str(resolve_device(device))
    loaded_certificates = [load_certificate(p) for p in certificates]
    output = Path(output)

    if data is None and inputs is None:
        raise LipcertError("give --data NAME or --inputs FILE.safetensors")
    if data is not None:
        load_dataset(data, data_dir)  # a bad data name fails before any model loads
    user_domain = resolve_domain(domain, embedding_table)
    specs = [str(m) for m in models]
    names = _names(specs)
    eps_max = max([*grid_l2, *grid_linf])
    problems = [
        _problem(name, load_model(spec, weights=weights, trust_pickle=trust_pickle), data,
                 n, data_dir, eps_max, inputs, user_domain)
        for name, spec in zip(names, specs, strict=True)
    ]
    matched = _match_certificates(loaded_certificates, problems)

    main = world().main
    minimal_frames, radius_frames, attacked = [], [], []
    for k, problem in enumerate(problems):
        cert = matched.get(problem.name)
        radii = cert.radii(problem.indices, problem.y.tolist())[0] if cert else None
        for note in problem.notes:
            say(f"{problem.name}: {note}")
        say(f"attacking {problem.name}: {problem.describe}")
        started = time.perf_counter()
        attacked.append(run_attacks(
            problem.classifier, problem.x, problem.y, names_of_attacks, grid_l2, grid_linf,
            model_name=problem.name, space=problem.space, params=params,
            batch_size=batch_size, device=device, seed=seed,
            indices=problem.indices, certified_radius_l2=radii, output=output,
            overwrite=overwrite and k == 0, progress=progress,
            settings={"data": data, "samples": problem.describe,
                      "weights_sha256": problem.sha256, **problem.metadata},
        ))
        say(f"attacks on {problem.name}: {time.perf_counter() - started:.1f} s")
        if minimal and main:
            started = time.perf_counter()
            minimal_frames.append(minimal_perturbation(
                problem.classifier, problem.x, problem.y, model_name=problem.name,
                space=problem.space, batch_size=batch_size, device=device,
                seed=seed, indices=problem.indices, certified_radius_l2=radii))
            say(f"minimal perturbations of {problem.name}: "
                f"{time.perf_counter() - started:.1f} s")
        if audit_radius and radii is not None and main:
            say(f"radius audit of {problem.name}: PGD-L2 at each certified radius, "
                f"{audit_steps} steps, {audit_restarts} random starts")
            started = time.perf_counter()
            radius_frames.append(radius_audit(
                problem.classifier, problem.x, problem.y, radii, model_name=problem.name,
                space=problem.space, steps=audit_steps, restarts=audit_restarts,
                batch_size=batch_size, device=device, seed=seed,
                indices=problem.indices))
            say(f"radius audit of {problem.name}: {time.perf_counter() - started:.1f} s")

    if not main:  # under torchrun, rank 0 writes every other file
        rows = pd.concat(attacked, ignore_index=True)
        return AttackOutcome(rows, robust_accuracy(rows))
    df = read_results(output)
    df = df[df["model"].isin(names)].reset_index(drop=True)
    outcome = AttackOutcome(df, robust_accuracy(df), files={"results": output})
    if minimal:
        outcome.minimal = pd.concat(minimal_frames, ignore_index=True)
        outcome.files["minimal"] = _write_csv(_sibling(output, "minimal"), outcome.minimal)
    if radius_frames:
        outcome.radius = pd.concat(radius_frames, ignore_index=True)
        outcome.files["radius-audit"] = _write_csv(_sibling(output, "radius-audit"),
                                                   outcome.radius)
        outcome.radius_summary = _radius_summary(outcome.radius)
    if matched:
        _audit(outcome, df, problems, matched, output)
    return outcome


def _radius_summary(radius: pd.DataFrame) -> pd.DataFrame:
    """Per model: samples audited, their median certified radius, the smallest margin
    z_y − max_{j≠y} z_j the attack reached inside a ball, and the number of violations."""
    return radius.groupby("model", sort=False).agg(
        audited=("index", "size"), median_radius=("certified_radius_l2", "median"),
        min_margin=("margin_adv", "min"), violations=("violation", "sum")).reset_index()


def _audit(outcome: AttackOutcome, df: pd.DataFrame, problems: list[_Problem],
           matched: dict[str, Certificate], output: Path) -> None:
    """Certificates against every attack result: violations (written, header only when
    there is none) and certified vs robust accuracy, into ``outcome``."""
    frames = [minimal_violations(outcome.minimal)] if outcome.minimal is not None else []
    if outcome.radius is not None:
        frames.append(radius_violations(outcome.radius))
    tables = []
    for problem in problems:
        cert = matched.get(problem.name)
        if cert is None:
            continue
        own = df[df["model"] == problem.name]
        frames.append(find_violations(own, cert))
        tables.append(certified_vs_robust(own, cert))
    frames = [f for f in frames if not f.empty]
    outcome.violations = (pd.concat(frames, ignore_index=True) if frames
                          else pd.DataFrame(columns=VIOLATION_COLUMNS))
    outcome.files["violations"] = _write_csv(_sibling(output, "violations"),
                                             outcome.violations)
    outcome.certified = pd.concat(tables, ignore_index=True)


def _attack_params(given: str | Mapping[str, Mapping[str, Any]] | None, attacks: list[str]
                   ) -> dict[str, dict[str, Any]]:
    if not given:
        return {}
    if isinstance(given, str):
        try:
            params = json.loads(given)
        except ValueError as err:
            raise LipcertError(f"--attack-params is not valid JSON: {err}") from err
    else:
        params = {name: dict(v) if isinstance(v, Mapping) else v for name, v in given.items()}
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise LipcertError('--attack-params must map attack names to objects, e.g. '
                           '{"pgd": {"steps": 50}}')
    for name, overrides in params.items():
        if name not in attacks:
            raise LipcertError(f"--attack-params names {name!r}, which is not in --attacks")
        resolve(name, overrides)
    return params


def _names(specs: list[str]) -> list[str]:
    names = []
    for spec in specs:
        path = Path(spec.rstrip("/"))
        if path.suffix == ".pt2":  # a run's model.pt2 is named after its run directory
            name = f"{path.parent.name}/{path.name}" if path.stem == "model" else path.stem
        else:
            name = path.name if path.exists() else spec
        names.append(name)
    if len(set(names)) != len(names):
        names = [str(s) for s in specs]
    if len(set(names)) != len(names):
        raise LipcertError("the same MODEL is given twice")
    return names


def _probe(name: str, classifier: nn.Module, x: torch.Tensor) -> None:
    """Fail with a clear error if ``classifier`` cannot take these inputs."""
    import torch

    try:
        with torch.no_grad():
            out = attackable(classifier).eval()(x[:1])
    except Exception as err:  # shape errors surface as RuntimeError, ValueError, …
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LipcertError(f"{name} cannot take the data's inputs of shape "
                           f"{tuple(x.shape[1:])}: {line}") from err
    if out.dim() != 2:
        raise LipcertError(f"{name} returns outputs of shape {tuple(out.shape)}, not logits "
                           "(batch, classes)")


def _problem(name: str, loaded: LoadedModel, data: str | None, n: int, data_dir: str | None,
             eps_max: float, inputs: str | Path | None = None,
             domain: BoxDomain | EmbeddingDomain | None = None) -> _Problem:
    samples = select_samples(loaded, data, n, data_dir, inputs=inputs, domain=domain)
    space = attack_space(samples.domain, samples.inputs, eps_max)
    _probe(name, samples.classifier, samples.inputs)
    # A dataset's domain is implied by its name (and absent from results written before
    # --inputs existed, which must still resume); the user's domain is recorded.
    meta = {k: v for k, v in samples.metadata.items() if inputs is not None or k != "domain"}
    return _Problem(name, samples.classifier, samples.inputs, samples.labels,
                    list(samples.indices), space, loaded.weights_sha256, samples.description,
                    meta, samples.notes)


def attack_space(domain: Any, x: torch.Tensor, eps_max: float) -> AttackSpace:
    """Where the attacks run for samples ``x`` on ``domain``: images (4-D, in [0, 1])
    directly; any other box through ``BoxSpace`` (its clamp is the domain's); a token ball
    through ``EmbeddingBox.for_token_norm``; the unbounded domain through a box so wide
    that torchattacks' clamp never binds (``EmbeddingBox.around``)."""
    dom = as_domain(domain)
    if isinstance(dom, EmbeddingDomain):
        return EmbeddingBox.for_token_norm(dom.max_norm, eps_max)
    if math.isinf(dom.lo) or math.isinf(dom.hi):
        if math.isfinite(dom.lo) or math.isfinite(dom.hi):
            raise LipcertError(f"attacks need a box with both ends finite, or none; got "
                               f"[{dom.lo}, {dom.hi}]")
        return EmbeddingBox.around(x, eps_max)
    if (dom.lo, dom.hi) == (0.0, 1.0) and x.dim() == 4:
        return ImageSpace()
    return BoxSpace(dom.lo, dom.hi)


def _match_certificates(certificates: list[Certificate], problems: list[_Problem]
                        ) -> dict[str, Certificate]:
    matched: dict[str, Certificate] = {}
    for cert in certificates:
        if cert.weights_sha256 is None:
            if len(problems) != 1:
                raise LipcertError(f"certificate {cert.path} does not name its model's "
                                   "weights (sha256); give one MODEL to audit it")
            owners = problems
        else:
            owners = [p for p in problems if p.sha256 == cert.weights_sha256]
        if not owners:
            if len(problems) == 1:
                cert.check_model(problems[0].sha256, problems[0].name)
            raise LipcertError(f"certificate {cert.path} (weights sha256 "
                               f"{cert.weights_sha256[:12]}…) matches none of the MODELs: "
                               "it certifies a different model")
        for owner in owners:
            if owner.name in matched:
                raise LipcertError(f"two certificates are given for {owner.name}")
            matched[owner.name] = cert
    return matched


def _sibling(output: Path, what: str) -> Path:
    return output.with_name(f"{output.stem}.{what}.csv")


def _write_csv(path: Path, df: pd.DataFrame) -> Path:
    return write_text_atomic(path, df.to_csv(index=False, lineterminator="\n"))

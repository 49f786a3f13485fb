"""``lipcert attack``: robust accuracy of one or more models under registered attacks.

    lipcert attack MODEL [MODEL ...] --data NAME [--attacks fgsm,pgd,pgdl2]
        [--eps-l2 0.25,0.5] [--eps-linf 8/255,0.1] [--n N] [--certificate FILE]
        [--audit-radius [--audit-steps 100] [--audit-restarts 5]]
        [--seed S] [--device cpu|cuda] -o attacks.csv

MODEL is a run directory, a ``.pt2`` file, or ``package.module:factory`` with ``--weights``
(``lipcert.loading.load_model``). The samples are those ``lipcert certify`` uses
(``lipcert.samples.select_samples``), so certificates line up by ``index``:

* image data: the first N images of the dataset's test split (``index`` = position there);
* text data (a GPT run directory): N windows of the model's context length T from the
  validation split, starting at 0, T, 2T, … (``index`` = the start offset); the label is
  the character after the window, and the attack perturbs the window's token embeddings
  (``attacks.embedding``), with ε in the L2 (Frobenius) or L∞ norm of the whole T×d
  embedded sequence and every token kept within the embedding table's largest row norm
  (the domain the certificates hold on).

Outputs: the per-sample CSV (resumable; ``attacks.results``) with its ``.meta.json``;
with ``--certificate``, ``<stem>.violations.csv`` (header only when there is none); with
``--minimal``, ``<stem>.minimal.csv`` (``attacks.minimal``); with ``--audit-radius``,
``<stem>.radius-audit.csv``: every sample with a positive certified radius r attacked by
PGD-L2 at budget exactly r from random starts inside its ball (``attacks.audit.radius_audit``),
its violations joining ``<stem>.violations.csv``. Every file is written atomically. The
exit status is 0, or 1 when the audit finds a certificate violation; user errors raise
``LipcertError``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attacks.registry import (
    DEFAULT_ATTACKS,
    DEFAULT_EPS_L2,
    DEFAULT_EPS_LINF,
    REGISTRY,
    parse_attacks,
    parse_eps,
    resolve,
)
from lipcert.errors import LipcertError

if TYPE_CHECKING:  # the heavy imports wait for the handler, so `lipcert --help` stays fast
    import pandas as pd
    import torch
    from rich.console import Console
    from torch import nn

    from attacks.audit import Certificate
    from attacks.space import AttackSpace

__all__ = ["add_attack_parser", "run_attack_command"]


def add_attack_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``attack`` on the ``lipcert`` command line; its handler is
    ``run_attack_command`` (``args.handler``)."""
    p = subparsers.add_parser(
        "attack", help="robust accuracy under adversarial attacks (per-sample CSV)",
        description="Attack MODELs on the first N test samples (text: N validation "
        "windows, in embedding space) with each attack at each ε, and write one row per "
        "sample, attack and ε. Rerunning with the same -o resumes an interrupted run. "
        "With --certificate, any adversarial example inside a certified radius is a "
        "violation (exit status 1); --audit-radius also attacks every certified ball at "
        "exactly its own radius.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="run directory, .pt2 file, or package.module:factory")
    p.add_argument("--data", required=True, metavar="NAME", help="dataset name")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="dataset files")
    p.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS), metavar="LIST",
                   help="comma-separated, from: " + ", ".join(REGISTRY))
    p.add_argument("--attack-params", default=None, metavar="JSON",
                   help='per-attack overrides, e.g. \'{"pgd": {"steps": 50, "restarts": 2}}\'')
    p.add_argument("--eps-l2", default=",".join(map(str, DEFAULT_EPS_L2)), metavar="LIST",
                   help="L2 budgets (default %(default)s)")
    p.add_argument("--eps-linf", default=",".join(map(str, DEFAULT_EPS_LINF)), metavar="LIST",
                   help="L∞ budgets; fractions allowed, e.g. 8/255 (default %(default)s)")
    p.add_argument("--n", type=int, default=1000, metavar="N", help="samples (default 1000)")
    p.add_argument("--batch-size", type=int, default=100, metavar="B")
    p.add_argument("--certificate", action="append", default=None, metavar="FILE",
                   help="certificate JSON to audit (repeat for several models)")
    p.add_argument("--seed", type=int, default=0, help="makes runs repeatable (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="weights for a package.module:factory MODEL (safetensors)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling weights (can execute code)")
    p.add_argument("--minimal", action="store_true",
                   help="also search the smallest L2 perturbation per sample")
    p.add_argument("--audit-radius", action="store_true",
                   help="with --certificate: also attack every sample with a positive "
                   "certified radius r by PGD-L2 at budget exactly r (random starts inside "
                   "the ball, within the input domain); any misclassified point found there "
                   "is a violation. Writes <stem>.radius-audit.csv")
    p.add_argument("--audit-steps", type=int, default=100, metavar="N",
                   help="PGD steps per start for --audit-radius (default 100)")
    p.add_argument("--audit-restarts", type=int, default=5, metavar="R",
                   help="random starts per sample for --audit-radius (default 5)")
    p.add_argument("--overwrite", action="store_true", help="start OUTPUT afresh")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="CSV")
    p.set_defaults(handler=run_attack_command)
    return p


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


def run_attack_command(args: argparse.Namespace) -> int:
    """The handler of ``lipcert attack``: returns 0, or 1 if the audit finds violations."""
    import pandas as pd
    from rich.console import Console

    from attacks.audit import load_certificate
    from attacks.harness import robust_accuracy, run_attacks
    from attacks.results import read_results

    attacks = parse_attacks(args.attacks)
    params = _attack_params(args.attack_params, attacks)
    used = {resolve(a, params.get(a)).grid_norm for a in attacks}
    eps_l2 = parse_eps(args.eps_l2, "--eps-l2") if "l2" in used else []
    eps_linf = parse_eps(args.eps_linf, "--eps-linf") if "linf" in used else []
    for norm, grid in (("l2", eps_l2), ("linf", eps_linf)):
        if norm in used and not grid:
            raise LipcertError(f"the chosen attacks need a --eps-{norm} grid")
    if args.n < 1 or args.batch_size < 1:
        raise LipcertError("--n and --batch-size must be >= 1")
    if args.audit_radius and not args.certificate:
        raise LipcertError("--audit-radius needs a --certificate to audit")
    if args.audit_steps < 1 or args.audit_restarts < 1:
        raise LipcertError("--audit-steps and --audit-restarts must be >= 1")
    device = _device(args.device)
    certificates = [load_certificate(p) for p in args.certificate or []]

    from lipcert.data import load_dataset
    from lipcert.loading import load_model

    load_dataset(args.data, args.data_dir)  # a bad --data fails before any model loads
    names = _names(args.models)
    eps_max = max([*eps_l2, *eps_linf])
    problems = [
        _problem(name, load_model(spec, weights=args.weights, trust_pickle=args.trust_pickle),
                 args, eps_max)
        for name, spec in zip(names, args.models, strict=True)
    ]
    matched = _match_certificates(certificates, problems)

    console = Console(soft_wrap=True)
    minimal_frames, radius_frames = [], []
    for k, problem in enumerate(problems):
        cert = matched.get(problem.name)
        radii = cert.radii(problem.indices, problem.y.tolist())[0] if cert else None
        console.print(f"attacking {problem.name}: {problem.describe}")
        run_attacks(
            problem.classifier, problem.x, problem.y, attacks, eps_l2, eps_linf,
            model_name=problem.name, space=problem.space, params=params,
            batch_size=args.batch_size, device=device, seed=args.seed,
            indices=problem.indices, certified_radius_l2=radii, output=args.output,
            overwrite=args.overwrite and k == 0, progress=not args.quiet,
            settings={"data": args.data, "samples": problem.describe,
                      "weights_sha256": problem.sha256},
        )
        if args.minimal:
            from attacks.minimal import minimal_perturbation

            minimal_frames.append(minimal_perturbation(
                problem.classifier, problem.x, problem.y, model_name=problem.name,
                space=problem.space, batch_size=args.batch_size, device=device,
                seed=args.seed, indices=problem.indices, certified_radius_l2=radii))
        if args.audit_radius and radii is not None:
            from attacks.audit import radius_audit

            console.print(f"radius audit of {problem.name}: PGD-L2 at each certified radius, "
                          f"{args.audit_steps} steps, {args.audit_restarts} random starts")
            radius_frames.append(radius_audit(
                problem.classifier, problem.x, problem.y, radii, model_name=problem.name,
                space=problem.space, steps=args.audit_steps, restarts=args.audit_restarts,
                batch_size=args.batch_size, device=device, seed=args.seed,
                indices=problem.indices))

    df = read_results(args.output)
    df = df[df["model"].isin(names)].reset_index(drop=True)
    _print_table(console, robust_accuracy(df), "robust accuracy (worst case over attacks)")
    console.print(f"results: {args.output} ({len(df)} rows)")
    if args.minimal:
        path = _sibling(args.output, "minimal")
        _write_csv(path, pd.concat(minimal_frames, ignore_index=True))
        console.print(f"minimal perturbations: {path}")
    radius = pd.concat(radius_frames, ignore_index=True) if radius_frames else None
    if radius is not None:
        path = _sibling(args.output, "radius-audit")
        _write_csv(path, radius)
        _print_table(console, _radius_summary(radius),
                     "radius audit (PGD-L2 inside each certified ball)")
        console.print(f"radius audit: {path}")
    if not matched:
        return 0
    minimal = pd.concat(minimal_frames, ignore_index=True) if minimal_frames else None
    return _audit(console, df, problems, matched, args.output, minimal, radius)


def _radius_summary(radius: pd.DataFrame) -> pd.DataFrame:
    """Per model: samples audited, their median certified radius, the smallest margin
    z_y − max_{j≠y} z_j the attack reached inside a ball, and the number of violations."""
    return radius.groupby("model", sort=False).agg(
        audited=("index", "size"), median_radius=("certified_radius_l2", "median"),
        min_margin=("margin_adv", "min"), violations=("violation", "sum")).reset_index()


def _audit(console: Console, df: pd.DataFrame, problems: list[_Problem],
           matched: dict[str, Certificate], output: Path, minimal: pd.DataFrame | None,
           radius: pd.DataFrame | None) -> int:
    import pandas as pd

    from attacks.audit import (
        VIOLATION_COLUMNS,
        certified_vs_robust,
        find_violations,
        minimal_violations,
        print_violations,
        radius_violations,
    )

    frames = [minimal_violations(minimal)] if minimal is not None else []
    if radius is not None:
        frames.append(radius_violations(radius))
    tables = []
    for problem in problems:
        cert = matched.get(problem.name)
        if cert is None:
            continue
        own = df[df["model"] == problem.name]
        frames.append(find_violations(own, cert))
        tables.append(certified_vs_robust(own, cert))
    frames = [f for f in frames if not f.empty]
    violations = (pd.concat(frames, ignore_index=True) if frames
                  else pd.DataFrame(columns=VIOLATION_COLUMNS))
    path = _sibling(output, "violations")
    _write_csv(path, violations)
    _print_table(console, pd.concat(tables, ignore_index=True),
                 "certified vs robust accuracy (samples with a certificate)")
    if violations.empty:
        console.print(f"certificate audit: 0 violations ({path})")
        return 0
    print_violations(violations)
    console.print(f"[bold red]certificate audit: {len(violations)} violation(s), written to "
                  f"{path}[/bold red]")
    return 1


def _attack_params(text: str | None, attacks: list[str]) -> dict[str, dict[str, Any]]:
    if not text:
        return {}
    try:
        params = json.loads(text)
    except ValueError as err:
        raise LipcertError(f"--attack-params is not valid JSON: {err}") from err
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise LipcertError('--attack-params must map attack names to objects, e.g. '
                           '{"pgd": {"steps": 50}}')
    for name, overrides in params.items():
        if name not in attacks:
            raise LipcertError(f"--attack-params names {name!r}, which is not in --attacks")
        resolve(name, overrides)
    return params


def _device(text: str) -> str:
    import torch

    if text != "cpu" and text != "cuda" and not text.startswith("cuda:"):
        raise LipcertError(f"unknown device {text!r}; expected cpu or cuda")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise LipcertError("--device cuda was requested but no CUDA device is available")
    return text


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

    from attacks.harness import attackable

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


def _problem(name: str, loaded, args: argparse.Namespace, eps_max: float) -> _Problem:
    from attacks.embedding import EmbeddingBox
    from attacks.space import ImageSpace
    from lipcert.bounds import EmbeddingDomain
    from lipcert.samples import select_samples

    samples = select_samples(loaded, args.data, args.n, args.data_dir)
    if isinstance(samples.domain, EmbeddingDomain):
        space: AttackSpace = EmbeddingBox.for_token_norm(samples.domain.max_norm, eps_max)
    elif tuple(samples.domain) == (0.0, 1.0):
        space = ImageSpace()
    else:
        raise LipcertError(f"{name}: unsupported input domain {samples.domain!r}")
    _probe(name, samples.classifier, samples.inputs)
    return _Problem(name, samples.classifier, samples.inputs, samples.labels,
                    list(samples.indices), space, loaded.weights_sha256, samples.description)


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


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            df.to_csv(f, index=False, lineterminator="\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_SHORT = {"clean_accuracy": "clean", "robust_accuracy": "robust",
          "certified_accuracy": "certified", "median_radius": "median r",
          "min_margin": "min margin"}


def _print_table(console: Console, df: pd.DataFrame, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for column in df.columns:
        table.add_column(_SHORT.get(str(column), str(column)))
    for row in df.itertuples(index=False):
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)

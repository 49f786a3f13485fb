"""``lipcert attack``: robust accuracy of one or more models under registered attacks.

    lipcert attack MODEL [MODEL ...] (--data NAME | --inputs FILE.safetensors
        (--domain DOMAIN | --embedding-table FILE)) [--attacks fgsm,pgd,pgdl2]
        [--eps-l2 0.25,0.5] [--eps-linf 8/255,0.1] [--n N] [--certificate FILE]
        [--minimal] [--audit-radius [--audit-steps 100] [--audit-restarts 5]]
        [--seed S] [--device cpu|cuda|auto] -o attacks.csv

Under ``torchrun --nproc-per-node N`` the processes share the attack batches and rank 0
writes the same files one process writes (``attacks.shards``).

The work is ``attacks.run.attack_models`` (which samples, which files); this module parses,
calls it, and prints its tables. The exit status is 0, or 1 when the audit finds a
certificate violation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from attacks.registry import DEFAULT_ATTACKS, DEFAULT_EPS_L2, DEFAULT_EPS_LINF, REGISTRY
from lipcert.commands.args import add_input_arguments
from lipcert.commands.display import make_console, print_table, stdout_is_terminal

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``attack``: MODELs, the data, attacks and ε grids, and the audits."""
    p = sub.add_parser(
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
    p.add_argument("--data", default=None, metavar="NAME",
                   help="dataset name (or give --inputs)")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="dataset files")
    add_input_arguments(p)
    p.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS), metavar="LIST",
                   help="comma-separated, from: " + ", ".join(REGISTRY))
    p.add_argument("--attack-params", default=None, metavar="JSON",
                   help='per-attack overrides, e.g. \'{"pgd": {"steps": 50, "restarts": 2}}\'')
    p.add_argument("--eps-l2", default=",".join(map(str, DEFAULT_EPS_L2)), metavar="LIST",
                   help="L2 budgets (default %(default)s)")
    p.add_argument("--eps-linf", default=",".join(map(str, DEFAULT_EPS_LINF)), metavar="LIST",
                   help="L∞ budgets; fractions allowed, e.g. 8/255 (default %(default)s)")
    p.add_argument("--n", "-n", type=int, default=1000, metavar="N",
                   help="samples (default 1000; under torchrun write -n, since torchrun "
                   "reads --n as an abbreviation of its own options)")
    p.add_argument("--batch-size", type=int, default=100, metavar="B")
    p.add_argument("--certificate", action="append", default=None, metavar="FILE",
                   help="certificate JSON to audit (repeat for several models)")
    p.add_argument("--seed", type=int, default=0, help="makes runs repeatable (default 0)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda (under torchrun: each process's own GPU) or auto "
                   "(default cpu)")
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
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Attack, print robust accuracy (and the audits); 1 if a certificate is violated."""
    from attacks.audit import print_violations
    from attacks.run import attack_models
    from lipcert.distributed import is_main

    console = make_console()
    main = is_main()  # under torchrun, rank 0 alone prints
    outcome = attack_models(
        args.models, data=args.data, output=args.output, data_dir=args.data_dir,
        attacks=args.attacks, attack_params=args.attack_params, eps_l2=args.eps_l2,
        eps_linf=args.eps_linf, n=args.n, batch_size=args.batch_size,
        certificates=args.certificate or [], seed=args.seed, device=args.device,
        weights=args.weights, trust_pickle=args.trust_pickle, minimal=args.minimal,
        audit_radius=args.audit_radius, audit_steps=args.audit_steps,
        audit_restarts=args.audit_restarts, overwrite=args.overwrite,
        progress=not args.quiet and stdout_is_terminal(), log=console.print if main else None,
        inputs=args.inputs, domain=args.domain, embedding_table=args.embedding_table)
    if not main:
        return 0
    print_table(console, outcome.robust, "robust accuracy (worst case over attacks)")
    console.print(f"results: {args.output} ({len(outcome.results)} rows)")
    if "minimal" in outcome.files:
        console.print(f"minimal perturbations: {outcome.files['minimal']}")
    if outcome.radius_summary is not None:
        print_table(console, outcome.radius_summary,
                    "radius audit (PGD-L2 inside each certified ball)")
        console.print(f"radius audit: {outcome.files['radius-audit']}")
    if outcome.violations is None:
        return 0
    path = outcome.files["violations"]
    print_table(console, outcome.certified,
                "certified vs robust accuracy (samples with a certificate)")
    if outcome.violations.empty:
        console.print(f"certificate audit: 0 violations ({path})")
        return 0
    print_violations(outcome.violations)
    console.print(f"[bold red]certificate audit: {len(outcome.violations)} violation(s), "
                  f"written to {path}[/bold red]")
    return 1

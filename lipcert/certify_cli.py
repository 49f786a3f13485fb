"""``lipcert certify``: certificates for a model on a dataset, printed and written as JSON."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from attacks.registry import eps_argument
from lipcert.errors import LipcertError


def add_certify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "certify",
        help="certified Lipschitz bounds and per-sample certified radii",
        description="Certify MODEL on the first N test samples of a dataset: per-layer "
        "Lipschitz upper bounds, the global bound of the logits (L2), an empirical lower "
        "bound, per-sample certified radii r = (z_y - max_{j!=y} z_j) / (sqrt(2) L) and "
        "certified accuracy. MODEL is a run directory, a .pt2 file (torch.export.save), or "
        "package.module:factory with --weights FILE.safetensors.",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--data", help="dataset name (default: the run's dataset)")
    p.add_argument("--data-dir", help="dataset directory or text file")
    p.add_argument("--n", type=int, default=1000, help="number of test samples (default 1000)")
    p.add_argument("--eps", type=eps_argument, default="0.25,0.5,1.0",
                   help="L2 radii for certified accuracy (default 0.25,0.5,1.0)")
    p.add_argument("--mode", choices=("global", "local"), default="global",
                   help="global: one bound for the input domain; local: a bound per ball")
    p.add_argument("--method", choices=("exact", "gram"), default="exact",
                   help="certified spectral norms: exact (float64 Gram eigenvalues, rounded "
                   "up) or gram (Gram iteration)")
    p.add_argument("--no-lower", action="store_true",
                   help="skip the empirical lower bound (gradient ascent on Jacobian norms)")
    p.add_argument("--weights", help="safetensors weights for a package.module:factory MODEL")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow pickled content (it can execute code): only for trusted files")
    p.add_argument("-o", "--output", type=Path, default=Path("certificate.json"),
                   help="JSON output (default certificate.json, written atomically)")
    p.set_defaults(handler=run_certify)


def run_certify(args: argparse.Namespace) -> int:
    from lipcert.atomic import check_output_writable, write_json_atomic
    from lipcert.certificate import certify
    from lipcert.loading import load_model
    from lipcert.lower import empirical_lipschitz
    from lipcert.samples import select_samples
    from lipcert.versions import package_versions

    check_output_writable(args.output)
    start = time.perf_counter()
    loaded = load_model(args.model, weights=args.weights, trust_pickle=args.trust_pickle)
    load_s = time.perf_counter() - start
    samples = select_samples(loaded, args.data, args.n, args.data_dir)
    certificate = certify(samples.certifiable, samples.inputs, samples.labels,
                          domain=samples.domain, mode=args.mode, method=args.method,
                          eps=args.eps, indices=samples.indices)
    lower = None
    if not args.no_lower:
        box = samples.domain if isinstance(samples.domain, tuple) else None
        lower = empirical_lipschitz(samples.classifier, samples.inputs, domain=box)
        certificate = certificate.with_lower(lower.value)
        if lower.value > certificate.lipschitz_upper:
            raise LipcertError(
                f"soundness violation: measured Jacobian norm {lower.value:.6g} exceeds the "
                f"certified bound {certificate.lipschitz_upper:.6g}; please report this"
            )
    document = certificate.to_json()
    if lower is not None:
        document["lipschitz"]["lower_method"] = lower.method
    document["timing_s"]["load"] = load_s
    document["timing_s"]["command"] = time.perf_counter() - start
    document["kinds"] = {"upper": "certified upper bound", "lower": "empirical witness "
                         "(a Jacobian norm measured at some input)"}
    document["model"] = {"source": loaded.source, "kind": loaded.kind,
                         "weights_sha256": loaded.weights_sha256}
    document["data"] = {"dataset": samples.dataset, "n": len(samples.indices),
                        "description": samples.description}
    document["versions"] = package_versions()
    write_json_atomic(args.output, document)
    print(certificate.format_table())
    print(f"certificate written to {args.output}")
    return 0

"""``lipcert report RUN_DIR [RUN_DIR ...] -o OUT_DIR``: the comparison report of one or more
run directories (``reports.make_report``), and its model summary on the terminal."""

from __future__ import annotations

import argparse
from pathlib import Path

from lipcert.commands.args import eps_argument

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``report``: RUN_DIRs, the output directory, the ε values and the title."""
    p = sub.add_parser(
        "report", help="HTML/Markdown report: certified vs empirical robustness",
        description="Build a report from run directories, each holding whatever exists of "
        "config.json, train_log.csv, certificate-global.json / certificate-local.json / "
        "certificate.json, attacks.csv and minimal.csv (any folder where lipcert certify and "
        "lipcert attack wrote them, for any MODEL, --data or --inputs): a self-contained "
        "report.html, "
        "report.md, CSV tables and PNG figures in OUT_DIR (written atomically; an earlier "
        "report there is replaced).",
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT_DIR",
                   help="report directory to create or replace")
    p.add_argument("--eps-l2", type=eps_argument, default=None, metavar="LIST",
                   help="L2 ε values of the summary (default: those of the inputs)")
    p.add_argument("--eps-linf", type=eps_argument, default=None, metavar="LIST",
                   help="L∞ ε values of the summary; fractions allowed, e.g. 8/255")
    p.add_argument("--title", default="lipcert report", help="the report's title")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Build the report, print the model summary and the report's path; returns 0."""
    from reports.build import make_report
    from reports.render import summary_text

    built = make_report(args.runs, args.output, eps_l2=args.eps_l2, eps_linf=args.eps_linf,
                        title=args.title)
    print(summary_text(built.summary))
    print(f"report written to {built.html}")
    return 0

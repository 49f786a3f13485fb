"""The ``lipcert`` command line: the parser, assembled from one module per verb in
``lipcert.commands`` (train, certify, attack, report, demo).

Every error that lipcert anticipates (``LipcertError``) is printed as one line,
``error: …``, with exit status 2 and no partial output.
"""

from __future__ import annotations

import argparse
import sys

from lipcert.commands import attack, certify, demo, report, train
from lipcert.errors import LipcertError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``lipcert`` parser; each verb's ``args.handler`` runs it."""
    parser = argparse.ArgumentParser(
        prog="lipcert",
        description="Certified Lipschitz bounds and adversarial testing for transformers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (train, certify, attack, report, demo):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except LipcertError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``nft`` command line: one sub-command per entry point.

Usage: ``nft losses`` (the loss registry and its hyperparameters). Later entry points register themselves in
``COMMANDS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def _cmd_losses(args: argparse.Namespace) -> int:
    from nft.algorithms import LOSSES

    for name, spec in sorted(LOSSES.items()):
        defaults = {f.name: f.default for f in dataclasses.fields(spec.params)}
        print(f"{name}: {spec.doc.splitlines()[0] if spec.doc else ''}")
        for key, value in defaults.items():
            print(f"    {key} = {value!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("losses", help="list the registered losses and their default hyperparameters")
    p.set_defaults(func=_cmd_losses)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

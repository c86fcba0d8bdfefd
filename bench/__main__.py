"""``python -m bench <subcommand>``: dispatch to one benchmark module.

Only the chosen subcommand's module is imported, so one benchmark's dependencies
(aiocoap, pyjwt, ...) never slow down or break another.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from . import SUBCOMMANDS


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Tessera benchmarks (run from the repo root)."
    )
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for spec in SUBCOMMANDS.values():
        p = sub.add_parser(spec.name, help=spec.help, description=spec.help)
        p.add_argument(
            "--json",
            action="store_true",
            help="end the output with one line holding a JSON object of every figure",
        )
        p.add_argument(
            "--quick",
            action="store_true",
            help="few, short batches (a CI smoke run in seconds; figures are rough)",
        )
        if spec.name == chosen:
            add = getattr(_load(spec.name), "add_arguments", None)
            if add is not None:
                add(p)
    return parser


def _load(name: str) -> ModuleType:
    return importlib.import_module(SUBCOMMANDS[name].module)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen if chosen in SUBCOMMANDS else None).parse_args(argv)
    return int(_load(args.subcommand).run(args))


if __name__ == "__main__":
    sys.exit(main())

"""The ``fastsafe`` command line: one sub-command per module of ``fastsafe.commands``.

Each module in ``COMMANDS`` defines ``add_parser(subparsers)`` that registers its sub-command
and sets ``func(args) -> int`` as the handler.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "generate", "entities", "estimate_bias", "bench", "backends")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsafe", description="Fast safety-aware decoding and training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"fastsafe.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"fastsafe.commands.{name}":
                continue  # not written yet
            raise
        mod.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError, RuntimeError) as exc:
        print(f"fastsafe {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

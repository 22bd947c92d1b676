"""``fastsafe backends``: list the op backends with availability and reasons, per op."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("backends", help="list the kernel backends per op and why any is unavailable")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastsafe.ops.dispatch import describe
    print(describe())
    return 0

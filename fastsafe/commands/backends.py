"""``fastsafe backends``: list the op backends with availability and reasons."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("backends", help="list the kernel backends and why any is unavailable")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from fastsafe.ops import backend_for, backends
    for info in backends().values():
        print(info)
    print(f"default for cpu tensors: {backend_for(torch.empty(0))}")
    return 0

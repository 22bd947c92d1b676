"""Eager per-call cost of the custom-op layer: ``safe_topk`` / ``choose`` through ``torch.ops.fastsafe``
beside the direct calls the ops wrap (what the functions did before they were ops), in one run.

``direct``: validation, backend choice and the kernel called as a plain function (the C++
extension's pybind function, the torch reference, or ``choose`` with the op's body called
directly); ``op``: the public function, which calls the op through the dispatcher. Both run the same
kernels, so the difference is the dispatcher + op wrapper cost. Reports medians and minima of
interleaved rounds, each round ``--calls`` calls of each.

    python -m benchmarks.op_overhead --batch 8 --vocab 32000 --k 50 --threads 2
"""
from __future__ import annotations

import argparse
import importlib
import statistics

import torch

from benchmarks.common import format_table, time_cpu_interleaved
from fastsafe.ops import choose, safe_topk
from fastsafe.ops.choose_impl import choose_ids
from fastsafe.ops.dispatch import backend_for, native_module
from fastsafe.ops.reference import safe_topk_reference
from fastsafe.ops.types import SafeTopK
from fastsafe.ops.validate import validate_safe_topk

choose_module = importlib.import_module("fastsafe.ops.choose")   # the attribute fastsafe.ops.choose is the function
_CHOOSE_OP = choose_module.choose_op


def _direct_topk(logits, k, backend=None):
    inp = validate_safe_topk(logits, k)
    name = backend_for(inp.logits, backend)
    if name == "cpp":
        v, i, lse = native_module().safe_topk_cpu(inp.logits, inp.k, inp.bias_table, inp.positions, inp.bias_scale,
                                                  inp.banned_bitmask, inp.dense_reward, inp.reward_weight,
                                                  inp.temperature)
    else:
        v, i, lse = safe_topk_reference(inp)
    return SafeTopK(v, i, lse, torch.isneginf(lse))


def _choose_ids(*args):
    return choose_ids(*args)


def _direct_choose(out, do_sample=False, top_p=1.0):
    """``choose`` with its op call replaced by a plain call of the op's body."""
    choose_module.choose_op = _choose_ids
    try:
        return choose(out, do_sample=do_sample, top_p=top_p)
    finally:
        choose_module.choose_op = _CHOOSE_OP


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=50, help="calls per timed run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logits = torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(0))
    out = safe_topk(logits, args.k)
    cpp = backend_for(logits) == "cpp"
    pairs = {
        f"safe_topk {'cpp' if cpp else 'torch'}": (lambda: _direct_topk(logits, args.k),
                                                   lambda: safe_topk(logits, args.k)),
        "choose greedy": (lambda: _direct_choose(out), lambda: choose(out)),
        "choose sample top_p=0.9": (lambda: _direct_choose(out, True, 0.9), lambda: choose(out, do_sample=True,
                                                                                           top_p=0.9)),
    }
    n = args.calls

    def loop(fn):
        def run():
            for _ in range(n):
                fn()
        return run

    fns = {}
    for name, (direct, op) in pairs.items():
        fns[(name, "direct")] = loop(direct)
        fns[(name, "op")] = loop(op)
    times = time_cpu_interleaved(fns, repeat=args.rounds, warmup=3)
    rows = []
    for name in pairs:
        d, o = times[(name, "direct")], times[(name, "op")]
        md, mo = statistics.median(d) * 1e3 / n, statistics.median(o) * 1e3 / n
        bd, bo = min(d) * 1e3 / n, min(o) * 1e3 / n
        rows.append((name, f"{md:.1f}", f"{mo:.1f}", f"{mo - md:+.1f}", f"{bd:.1f}", f"{bo:.1f}", f"{bo - bd:+.1f}",
                     f"{bo / bd:.3f}"))
    print(f"B={args.batch} V={args.vocab} k={args.k}, {args.threads} threads, {args.rounds} rounds x {n} calls; "
          f"us per call")
    print(format_table(rows, ("call", "direct med", "op med", "diff", "direct min", "op min", "diff", "op/direct")))


if __name__ == "__main__":
    main()

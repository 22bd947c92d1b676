"""Decode-step benchmark: fastsafe ``safe_topk`` against what a user runs today.

One decoding step over ``[B, V]`` logits with a TSDI bias row, 1,000 banned tokens and k = 50,
done three ways, timed in one run on the same inputs:

* ``hf_chain``: the Hugging Face chain -- ``scores - bias_row`` (TSDI), ``NoBadWordsLogitsProcessor``
  with the banned tokens as single-token bad words, ``TopKLogitsWarper``, ``log_softmax``, ``topk``
  (transformers' own classes, built once outside the timed region, as a user would);
* ``torch_ops``: plain PyTorch ops -- ``sub``, ``masked_fill_`` with a precomputed bool mask,
  ``logsumexp``, ``topk``;
* ``fastsafe[<backend>]``: ``fastsafe.ops.safe_topk(logits, k, bias_table=, positions=,
  banned_bitmask=, backend=<backend>)`` for every available backend of the device.

Also a 99%-banned case (masked tokens must not slow top-k down). Prints a table (median ms and
the speedup over the HF chain measured in the same run) and writes JSON to
``benchmarks/results/decode-<device>.json``. On a GPU it reports cold (L2 flushed) and warm
medians from CUDA events and the achieved memory bandwidth against the device's peak.

Each JSON row holds ``batch, vocab, k, banned, impl, check`` (every implementation's top-k is
checked against plain torch), ``median_ms`` with ``stats``, ``speedup_vs_hf`` (HF median / this
median; ``speedup_vs_hf_min`` from the minima, steadier on a shared CPU), ``time_vs_base_ban`` on
the heavily-banned rows, ``warm_median_ms`` and ``warm_speedup_vs_hf`` (inputs in cache: on the
CPU each timed call follows an untimed call of itself), and on a GPU ``latency_median_ms``, ``bytes``,
``achieved_GBps``, ``peak_fraction``, ``roofline_ratio`` (time / (bytes / peak)) and
``logits_roofline_ratio`` (time / time to read the logits once).

Run:
    python -m benchmarks.decode                 # full grid: B in {1, 8, 64}, V in {32000, 151936}
    python -m benchmarks.decode --quick         # a quick look
    fastsafe bench decode --batch 8 --vocab 151936 --backends cpp
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.common import (RESULTS_DIR, select_device, L2Flusher, bandwidth_report, environment, format_table,
                               parse_int_list, peak_bandwidth, summarize, time_cpu_interleaved, time_cuda,
                               time_cuda_latency, write_json, device_slug)

HF = "hf_chain"
TORCH_OPS = "torch_ops"
BIAS_TABLE_ROWS = 32        # L of the TSDI bias table
POSITION = 5                # every row decodes response position 5 (the bias row is shared)
DEFAULTS = {"cpu": {"repeat": 30, "warmup": 2, "max_seconds": 12.0},
            "cuda": {"repeat": 200, "warmup": 10, "max_seconds": None}}
QUICK = {"batch": [1, 8], "vocab": [32000], "repeat": 5}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fastsafe_impl(backend: str) -> str:
    return f"fastsafe[{backend}]"


@dataclass
class Case:
    """One benchmarked shape: ``batch x vocab`` logits with ``banned`` tokens banned."""

    batch: int
    vocab: int
    k: int
    banned: int
    dense: bool = False     # the heavily-banned case (a fraction of the vocab rather than a count)

    @property
    def banned_label(self) -> str:
        return f"{self.banned / self.vocab:.0%}" if self.dense else str(self.banned)


@dataclass
class Inputs:
    logits: torch.Tensor          # [B, V] dtype
    bias_table: torch.Tensor      # [L, V] float32
    positions: torch.Tensor       # [B] int64
    bias_row: torch.Tensor        # [V] float32 view of bias_table[POSITION]
    banned_ids: List[int]
    banned_mask: torch.Tensor     # [V] bool, True = banned
    allowed_bitmask: torch.Tensor  # [ceil(V/32)] int32, bit = 1 allowed


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    """Random logits (std 3), a small random TSDI table and ``case.banned`` random banned ids."""
    from fastsafe.ops import pack_bitmask
    g = torch.Generator().manual_seed(seed + 1000003 * case.batch + case.vocab + case.banned)
    logits = (torch.randn(case.batch, case.vocab, generator=g) * 3.0).to(dtype)
    bias_table = torch.randn(BIAS_TABLE_ROWS, case.vocab, generator=g) * 0.1
    banned_ids = torch.randperm(case.vocab, generator=g)[:case.banned].sort().values
    banned_mask = torch.zeros(case.vocab, dtype=torch.bool)
    banned_mask[banned_ids] = True
    logits, bias_table, banned_mask = (t.to(device) for t in (logits, bias_table, banned_mask))
    positions = torch.full((case.batch,), POSITION, dtype=torch.int64, device=device)
    return Inputs(logits, bias_table, positions, bias_table[POSITION], banned_ids.tolist(), banned_mask,
                  pack_bitmask(~banned_mask).contiguous())


def hf_chain(inp: Inputs, k: int) -> Callable[[], tuple]:
    """The Hugging Face processors a user chains today; built here, outside the timed call."""
    from transformers import LogitsProcessorList, NoBadWordsLogitsProcessor, TopKLogitsWarper
    processors = LogitsProcessorList([
        NoBadWordsLogitsProcessor([[t] for t in inp.banned_ids]),
        TopKLogitsWarper(top_k=k),
    ])
    input_ids = torch.zeros(inp.logits.shape[0], 1, dtype=torch.long, device=inp.logits.device)
    logits, bias_row = inp.logits, inp.bias_row

    def run():
        scores = logits.float() - bias_row                 # TSDI: subtract the bias row
        scores = processors(input_ids, scores)             # bad words (-inf), then top-k warper
        logprobs = torch.log_softmax(scores, dim=-1)
        return torch.topk(logprobs, k, dim=-1)

    return run


def torch_ops(inp: Inputs, k: int) -> Callable[[], tuple]:
    """The same step in plain PyTorch ops with a precomputed bool mask."""
    logits, bias_row, banned = inp.logits, inp.bias_row, inp.banned_mask

    def run():
        scores = logits.float() - bias_row
        scores.masked_fill_(banned, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        values, indices = torch.topk(scores, k, dim=-1)
        return values, indices, lse

    return run


def fastsafe_call(inp: Inputs, k: int, backend: str) -> Callable[[], object]:
    """``safe_topk`` with the same work: bias table + positions, the banned bitmask, k."""
    from fastsafe.ops import safe_topk
    logits, table, positions, bitmask = inp.logits, inp.bias_table, inp.positions, inp.allowed_bitmask

    def run():
        return safe_topk(logits, k, bias_table=table, positions=positions, banned_bitmask=bitmask,
                         backend=backend)

    return run


def required_bytes(case: Case, logits_dtype: torch.dtype, mask_rows: int = 1, bias_rows: int = 1,
                   dense_reward: bool = False) -> int:
    """Bytes one fused step must move: read logits, bitmask, bias row(s), positions (and a dense
    reward), write values/indices ``[B, k]``, logsumexp and all_banned ``[B]``.

    Example:
        >>> required_bytes(Case(8, 151936, 50, 1000), torch.float32)
        5493592
    """
    B, V, k = case.batch, case.vocab, case.k
    elt = torch.empty(0, dtype=logits_dtype).element_size()
    words = (V + 31) // 32
    read = B * V * elt + mask_rows * words * 4 + bias_rows * V * 4 + B * 8
    if dense_reward:
        read += B * V * elt
    write = B * k * (4 + 8) + B * (4 + 1)
    return read + write


def check_outputs(inp: Inputs, k: int, results: Dict[str, object]) -> Dict[str, str]:
    """Every implementation must pick the same top-k (scores compared, so ties may differ)."""
    scores = inp.logits.float() - inp.bias_row
    scores = scores.masked_fill(inp.banned_mask, float("-inf"))
    ref_values = torch.topk(scores, k, dim=-1).values
    ref_lse = torch.logsumexp(scores, dim=-1)
    finite = torch.isfinite(ref_values)
    out = {}
    for name, res in results.items():
        try:
            indices = res[1] if isinstance(res, tuple) else res.indices
            picked = scores.gather(1, indices).sort(dim=-1, descending=True).values
            ok = torch.equal(torch.isfinite(picked), finite) and torch.allclose(
                picked[finite], ref_values[finite], rtol=1e-5, atol=1e-5)
            if ok and not isinstance(res, tuple):
                ok = (torch.allclose(res.values[finite], ref_values[finite], rtol=1e-5, atol=1e-5)
                      and torch.allclose(res.logsumexp, ref_lse, rtol=1e-5, atol=1e-4))
            elif ok and len(res) == 3:
                ok = torch.allclose(res[2], ref_lse, rtol=1e-5, atol=1e-4)
            out[name] = "ok" if ok else "MISMATCH"
        except Exception as exc:  # a broken backend must not hide the others
            out[name] = f"error: {type(exc).__name__}: {exc}"
    return out


def select_backends(requested: Optional[List[str]], device: torch.device):
    """(backends to time, [{backend, reason}] skipped) among fastsafe's backends for ``device``."""
    from fastsafe.ops import backend_for, backends
    infos = backends()
    names = list(infos) if requested is None else requested
    chosen, skipped = [], []
    probe = torch.empty(1, 1, device=device)
    for name in names:
        if name not in infos:
            raise ValueError(f"--backends: expected names among {tuple(infos)}, got {name!r}")
        try:
            backend_for(probe, name)
        except (ValueError, RuntimeError) as exc:
            skipped.append({"backend": name, "reason": str(exc)})
            continue
        if name == "triton" and device.type == "cpu" and requested is None:
            skipped.append({"backend": name, "reason": "Triton on the CPU runs in the interpreter "
                            "(TRITON_INTERPRET=1), a correctness tool: not timed unless --backends names it"})
            continue
        chosen.append(name)
    return chosen, skipped


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode",
                                description="Time one safe decoding step: HF chain vs plain torch vs fastsafe.")
    p.add_argument("--batch", default="1,8,64", help="comma-separated batch sizes (default 1,8,64)")
    p.add_argument("--vocab", default="32000,151936", help="comma-separated vocab sizes (default 32000,151936)")
    p.add_argument("--k", type=int, default=50, help="top-k candidates (default 50)")
    p.add_argument("--banned", type=int, default=1000, help="banned single tokens (default 1000)")
    p.add_argument("--dense-ban", type=float, default=0.99,
                   help="also time a case with this fraction of the vocab banned, at the largest vocab "
                        "(default 0.99; 0 turns it off)")
    p.add_argument("--backends", default=None,
                   help="comma-separated fastsafe backends (default: every available one for the device)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="logits dtype (default float32)")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per case (default: 30 on CPU, 200 on GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 2 on CPU, 10 on GPU)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="CPU: stop a case after this many seconds once 3 rounds are done (default 12)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--quick", action="store_true", help="small grid and few runs (B 1,8; V 32000; 5 runs)")
    p.add_argument("--out", default=None,
                   help="JSON output path (default benchmarks/results/decode-<device>[-quick].json)")
    return p


def main(argv=None) -> int:
    """Run the benchmark; ``argv`` as for the command line (``None``: ``sys.argv[1:]``). Returns 0."""
    args = build_parser().parse_args(argv)
    device = select_device(args.device, args.threads)
    dtype = DTYPES[args.dtype]
    batches = QUICK["batch"] if args.quick and args.batch == "1,8,64" else parse_int_list(args.batch, "--batch")
    vocabs = (QUICK["vocab"] if args.quick and args.vocab == "32000,151936"
              else parse_int_list(args.vocab, "--vocab"))
    if args.k < 1 or args.k > min(vocabs):
        raise ValueError(f"--k: expected 1 <= k <= smallest vocab {min(vocabs)}, got {args.k}")
    if not 0.0 <= args.dense_ban < 1.0:
        raise ValueError(f"--dense-ban: expected a fraction in [0, 1), got {args.dense_ban}")
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    repeat = args.repeat or (QUICK["repeat"] if args.quick else defaults["repeat"])
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    max_seconds = defaults["max_seconds"] if args.max_seconds is None else args.max_seconds
    requested = None if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    chosen, skipped = select_backends(requested, device)

    cases = [Case(b, v, args.k, min(args.banned, v - args.k)) for v in vocabs for b in batches]
    if args.dense_ban > 0:
        vmax = max(vocabs)
        n = min(int(round(args.dense_ban * vmax)), vmax - args.k)
        cases += [Case(b, vmax, args.k, n, dense=True) for b in batches]

    env = environment(device)
    peak, _ = peak_bandwidth(device) if device.type == "cuda" else (None, "")
    flusher = L2Flusher(device) if device.type == "cuda" else None
    impls = [HF, TORCH_OPS] + [fastsafe_impl(b) for b in chosen]
    print(f"decode benchmark on {env['device']['name']} ({device.type}), torch {env['torch']}, "
          f"threads {env['torch_threads']}, dtype {args.dtype}, k {args.k}, impls: {', '.join(impls)}")
    for s in skipped:
        print(f"  skipped fastsafe[{s['backend']}]: {s['reason']}")
    load = env.get("load_average_1min")
    if device.type == "cpu" and load and torch.get_num_threads() > 1 and load > 0.5 * (os.cpu_count() or 1):
        print(f"  note: the CPU is busy (1-min load {load:.1f} on {os.cpu_count()} cores): multi-threaded "
              f"timings suffer from scheduling contention; --threads 1 gives steadier ratios")

    rows: List[dict] = []
    for case in cases:
        inp = make_inputs(case, dtype, device)
        fns: Dict[str, Callable] = {HF: hf_chain(inp, case.k), TORCH_OPS: torch_ops(inp, case.k)}
        for b in chosen:
            fns[fastsafe_impl(b)] = fastsafe_call(inp, case.k, b)
        first, broken = {}, {}
        for name, fn in list(fns.items()):
            try:
                first[name] = fn()          # also prepares HF's bias tensors and compiles kernels
            except Exception as exc:
                broken[name] = f"error: {type(exc).__name__}: {exc}"
                del fns[name]
        checks = check_outputs(inp, case.k, first)
        checks.update(broken)
        nbytes = required_bytes(case, dtype)
        if device.type == "cuda":
            timings = {n: {"cold": summarize(time_cuda(fn, repeat, warmup, flusher)),
                           "warm": summarize(time_cuda(fn, repeat, warmup, None)),
                           "latency": summarize(time_cuda_latency(fn, max(10, repeat // 4), warmup))}
                       for n, fn in fns.items()}
        else:
            raw = time_cpu_interleaved(fns, repeat, warmup, max_seconds)
            primed = time_cpu_interleaved(fns, repeat, 0, max_seconds, primed=True)
            timings = {n: {"cold": summarize(t), "warm": summarize(primed[n])} for n, t in raw.items()}
        hf_ms = timings[HF]["cold"]["median_ms"] if HF in timings else None
        hf_min = timings[HF]["cold"]["min_ms"] if HF in timings else None
        hf_warm = timings[HF]["warm"]["median_ms"] if HF in timings else None
        for name in impls:
            row = {"batch": case.batch, "vocab": case.vocab, "k": case.k, "banned": case.banned,
                   "banned_label": case.banned_label, "dense_ban": case.dense, "impl": name,
                   "check": checks.get(name, "not run")}
            t = timings.get(name)
            if t is not None:
                med = t["cold"]["median_ms"]
                row.update({"median_ms": med, "stats": t["cold"],
                            "speedup_vs_hf": (hf_ms / med) if hf_ms else None,
                            "speedup_vs_hf_min": (hf_min / t["cold"]["min_ms"]) if hf_min else None})
                row.update({"warm_median_ms": t["warm"]["median_ms"], "warm_stats": t["warm"],
                            "warm_speedup_vs_hf": (hf_warm / t["warm"]["median_ms"]) if hf_warm else None})
                if "latency" in t:
                    row.update({"latency_median_ms": t["latency"]["median_ms"], "latency_stats": t["latency"]})
                    row.update(bandwidth_report(nbytes, med, peak))
                    logits_bytes = case.batch * case.vocab * inp.logits.element_size()
                    if peak:
                        row["logits_roofline_ratio"] = med / (logits_bytes / peak * 1e3)
                else:
                    row["bytes"] = nbytes
            rows.append(row)
        del inp, fns, first

    _add_dense_ban_slowdown(rows)
    print()
    print(render_table(rows, device.type == "cuda"))
    targets = summarize_targets(rows, device)
    for line in targets.get("lines", []):
        print(line)

    out = Path(args.out) if args.out else RESULTS_DIR / f"decode-{device_slug(device)}{'-quick' if args.quick else ''}.json"
    payload = {
        "benchmark": "decode",
        "device": env["device"],
        "environment": {k: v for k, v in env.items() if k != "device"},
        "config": {"batch": batches, "vocab": vocabs, "k": args.k, "banned": args.banned,
                   "dense_ban": args.dense_ban, "dtype": args.dtype, "repeat": repeat, "warmup": warmup,
                   "max_seconds": max_seconds, "quick": args.quick, "bias_table_rows": BIAS_TABLE_ROWS,
                   "position": POSITION, "l2_flush_bytes": flusher.nbytes if flusher else None},
        "protocol": ("cuda: CUDA events, runs queued behind a GPU sleep so host overhead is hidden; cold = L2 "
                     "flushed before each run by writing a buffer larger than L2, warm = no flush; medians; "
                     "bandwidth and roofline ratio from cold medians and the bytes the fused step must move; "
                     "latency = wall-clock per call with synchronize (host + launch + GPU)" if device.type == "cuda" else
                     "cpu: wall-clock perf_counter per call after warm-up, implementations interleaved run by "
                     "run, so each starts with the others' data in cache and reads its inputs from memory; warm = "
                     "the same with each timed call right after an untimed call of itself (inputs in cache, "
                     "as when the lm_head has just written the logits); medians (stop after max_seconds once 3 "
                     "rounds are done)"),
        "implementations": {
            HF: "logits.float() - bias_row; LogitsProcessorList([NoBadWordsLogitsProcessor(banned single "
                "tokens), TopKLogitsWarper(k)]); log_softmax; topk",
            TORCH_OPS: "logits.float() - bias_row; masked_fill_(bool mask, -inf); logsumexp; topk",
            **{fastsafe_impl(b): f"fastsafe.ops.safe_topk(logits, k, bias_table, positions, banned_bitmask, "
                                 f"backend={b!r})" for b in chosen},
        },
        "skipped": skipped,
        "targets": {k: v for k, v in targets.items() if k != "lines"},
        "results": rows,
    }
    write_json(out, payload)
    print(f"wrote {out}")
    return 0


def _add_dense_ban_slowdown(rows: List[dict]) -> None:
    """On each heavily-banned row: its time over the same impl's time in the ordinary (--banned) case."""
    base = {(r["impl"], r["batch"], r["vocab"]): r.get("median_ms") for r in rows if not r["dense_ban"]}
    for r in rows:
        ref = base.get((r["impl"], r["batch"], r["vocab"]))
        if r["dense_ban"] and ref and r.get("median_ms"):
            r["time_vs_base_ban"] = r["median_ms"] / ref


def render_table(rows: List[dict], gpu: bool) -> str:
    header = ["impl", "B", "V", "banned", "median ms", "warm ms"]
    if gpu:
        header += ["e2e ms", "GB/s", "% peak", "x roofline"]
    header += ["vs HF", "warm vs HF", "vs base ban", "check"]
    table = []
    for r in rows:
        med = r.get("median_ms")
        line = [r["impl"], r["batch"], r["vocab"], r["banned_label"], _fmt(med, 3), _fmt(r.get("warm_median_ms"), 3)]
        if gpu:
            frac = r.get("peak_fraction")
            line += [_fmt(r.get("latency_median_ms"), 3),
                     _fmt(r.get("achieved_GBps"), 0),
                     None if frac is None else f"{100 * frac:.0f}%", _fmt(r.get("roofline_ratio"), 2)]
        sp, wsp = r.get("speedup_vs_hf"), r.get("warm_speedup_vs_hf")
        slow = r.get("time_vs_base_ban")
        line += [None if sp is None else f"{sp:.1f}x", None if wsp is None else f"{wsp:.1f}x",
                 None if slow is None else f"{slow:.2f}",
                 r["check"]]
        table.append(line)
    return format_table(table, header)


def _fmt(x, nd):
    return None if x is None else f"{x:.{nd}f}"


def summarize_targets(rows: List[dict], device: torch.device) -> dict:
    """The issue's targets: CPU cpp >= 10x the HF chain at B=8, V=151936; GPU <= 1.5x roofline for B >= 8."""
    out: dict = {"lines": []}
    if device.type == "cpu":
        for r in rows:
            if (r["impl"] == fastsafe_impl("cpp") and r["batch"] == 8 and r["vocab"] == 151936
                    and not r["dense_ban"] and r.get("speedup_vs_hf")):
                out["cpp_speedup_vs_hf_B8_V151936"] = r["speedup_vs_hf"]
                warm = r.get("warm_speedup_vs_hf")
                out["cpp_warm_speedup_vs_hf_B8_V151936"] = warm
                out["lines"].append(f"target (cpu): fastsafe[cpp] vs HF chain at B=8, V=151936: "
                                    f"{r['speedup_vs_hf']:.1f}x cold"
                                    + (f", {warm:.1f}x warm" if warm else "") + " (issue target >= 10x)")
    else:
        worst = {}
        for r in rows:
            if r["impl"].startswith("fastsafe[") and r["batch"] >= 8 and r.get("roofline_ratio"):
                worst[r["impl"]] = max(worst.get(r["impl"], 0.0), r["roofline_ratio"])
        out["worst_roofline_ratio_B_ge_8"] = worst
        for name, x in worst.items():
            out["lines"].append(f"target (gpu): {name} worst time/roofline for B >= 8: {x:.2f}x "
                                f"(issue target <= 1.5x on H100)")
    return out


if __name__ == "__main__":
    sys.exit(main())

"""Training-loss benchmark: fused vs unfused token log-probs and masked DPO, forward + backward.

Two workloads, timed on the same inputs:

* ``token_logps``: per-token ``log p(target)`` of ``NT`` tokens from hidden states ``[NT, H]`` and
  an lm_head ``[V, H]``, backward with random signed per-token upstream gradients.
  ``unfused`` = full logits + ``log_softmax`` + gather with autograd
  (``fastsafe.training.reference.token_logps_reference``); ``fused[torch]`` / ``fused[triton]`` =
  ``fastsafe.training.token_logps(backend=...)``.
* ``masked_dpo``: token-weighted DPO on ``[2N, T, H]`` policy and reference hidden states
  (``2N * T = NT``, weights in {1, 0, -1}); ``unfused`` = full-logits log-probs for policy and
  reference + ``masked_dpo_loss``; ``fused[...]`` = ``FusedLinearMaskedDPOLoss``; ``liger`` =
  Liger-Kernel's ``LigerFusedLinearDPOLoss`` when installed (sequence DPO with the weights' 0/1
  support as its mask: it has no signed token weights).

For each: median forward+backward time, peak extra memory (bytes allocated above the inputs at
the peak of one forward+backward: ``torch.cuda.max_memory_allocated`` on a GPU, the PyTorch
profiler's memory timeline on the CPU), the ratio to ``unfused``, a correctness check against
``unfused``, and TFLOP/s counting ``8 * NT * H * V`` FLOPs for ``token_logps`` (forward,
backward recompute, two gradient GEMMs) and ``10 * NT * H * V`` for ``masked_dpo`` (+ the
reference forward). On a GPU also the measured bf16 GEMM peak and the fraction of it reached.

Writes ``benchmarks/results/losses-<device>.json``. Targets from the issue (checked when the shape
is measured): peak extra memory <= 0.1x unfused at V = 151936, NT = 8192; on an H100,
fused forward+backward >= 60% of the bf16 GEMM peak, and faster than Liger's fused linear DPO.

Long context (``--long-context``): V = 262144, H = 64, NT = 32768 as sequences of T = 8192
(``--tokens`` / ``--seq`` override), fp32 on the CPU, with a third workload ``masked_grpo``
(``FusedLinearMaskedGRPOLoss`` vs Liger-Kernel's ``LigerFusedLinearGRPOLoss``, loss type grpo,
no KL term, on-policy) and Liger run on the CPU too (its chunked losses are plain torch; run
eagerly, ``compiled=False``). The DPO weights are 0/1 there, so fastsafe's masked DPO *is*
standard DPO and is checked against Liger's. An implementation whose known minimum extra memory
(the ``[rows, V]`` fp32 buffers it must hold at once: the full logits and log-probs of every
token for ``unfused``, of one pair ``[2T, V]`` for Liger's DPO; Liger's GRPO streams the
vocabulary and has no such bound) exceeds half the available memory is not run (the bound counts two buffers; they hold
more); its row records that lower bound.
Targets: fused peak extra memory <= 0.05x Liger's at the same shape (measured, or Liger's lower
bound where it cannot run), and fused no slower than Liger. Each row also reports
``peak_extra_bytes_beyond_gradients``: the peak less the weight and hidden-state gradients
(``gradient_bytes``), which every implementation must hold at the end of the backward, and the
ratio of that to Liger's. Writes
``losses-long-context-<device>.json``.

Run:
    python -m benchmarks.losses                  # GPU: V in {32000, 151936}, H 4096, NT 8192, bf16
                                                 # CPU: same V, H 64, NT 1024, fp32
    python -m benchmarks.losses --quick          # one small shape
    python -m benchmarks.losses --vocab 32000 --hidden 1024 --tokens 2048 --dtype bfloat16
    python -m benchmarks.losses --long-context                      # V 262144, NT 32768, T 8192
    python -m benchmarks.losses --long-context --tokens 2048 --seq 1024
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Callable, List, Optional

import torch

from benchmarks.common import (RESULTS_DIR, select_device, device_slug, environment, format_table, parse_int_list, summarize,
                               time_cpu_interleaved, time_cuda, write_json)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULTS = {
    "cuda": dict(vocab="32000,151936", hidden=4096, tokens=8192, seq=1024, dtype="bfloat16", repeat=10, warmup=2),
    "cpu": dict(vocab="32000,151936", hidden=64, tokens=1024, seq=256, dtype="float32", repeat=3, warmup=1),
}
QUICK = dict(vocab="8192", hidden=64, tokens=128, seq=32, repeat=3)
LONG_CONTEXT = dict(vocab="262144", hidden=64, tokens=32768, seq=8192, dtype="float32", repeat=1, warmup=0)
LONG_CONTEXT_WORKLOADS = "token_logps,masked_dpo,masked_grpo"
WORKLOADS = ("token_logps", "masked_dpo", "masked_grpo")
UNFUSED = "unfused"
LIGER = "liger"


def fused(backend: str) -> str:
    return f"fused[{backend}]"


# ----------------------------------------------------------------------------------------------
# inputs and implementations
# ----------------------------------------------------------------------------------------------

def make_inputs(V: int, H: int, NT: int, T: int, dtype, device, seed: int = 0, binary_weights: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed + V)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    ref_weight = (weight.float() + 0.01 * torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    hidden = torch.randn(NT, H, generator=g).to(dtype)
    ref_hidden = (hidden.float() + 0.05 * torch.randn(NT, H, generator=g)).to(dtype)
    targets = torch.randint(0, V, (NT,), generator=g)
    upstream = torch.randn(NT, generator=g)
    weights = torch.randint(-1, 2, (NT,), generator=g).float()
    if binary_weights:
        weights = weights.abs()
    advantages = torch.randn(NT // T, generator=g)
    out = dict(weight=weight, ref_weight=ref_weight, hidden=hidden, ref_hidden=ref_hidden, targets=targets,
               upstream=upstream, token_weights=weights, advantages=advantages)
    out = {k: v.to(device) for k, v in out.items()}
    out["weight"].requires_grad_(True)
    out["hidden"].requires_grad_(True)
    out["T"] = T
    return out


def _zero_grads(inp):
    inp["hidden"].grad = None
    inp["weight"].grad = None


def logps_impl(name: str, inp: dict) -> Callable[[], torch.Tensor]:
    from fastsafe.training import token_logps
    from fastsafe.training.reference import token_logps_reference
    h, w, t, g = inp["hidden"], inp["weight"], inp["targets"], inp["upstream"]

    def run():
        _zero_grads(inp)
        if name == UNFUSED:
            lp = token_logps_reference(h, w, t)
        else:
            lp = token_logps(h, w, t, backend=name[len("fused["):-1])
        (lp * g).sum().backward()
        return lp.detach()

    return run


def dpo_impl(name: str, inp: dict, beta: float = 0.1) -> Callable[[], torch.Tensor]:
    from fastsafe.training import FusedLinearMaskedDPOLoss, masked_dpo_loss
    from fastsafe.training.reference import token_logps_reference
    T = inp["T"]
    H = inp["hidden"].shape[-1]
    h = inp["hidden"].view(-1, T, H)
    rh = inp["ref_hidden"].view(-1, T, H)
    y = inp["targets"].view(-1, T)
    wts = inp["token_weights"].view(-1, T)
    w, rw = inp["weight"], inp["ref_weight"]
    n = h.shape[0] // 2

    if name == UNFUSED:
        def run():
            _zero_grads(inp)
            lp = token_logps_reference(h, w, y)
            with torch.no_grad():
                ref = token_logps_reference(rh, rw, y)
            loss, _ = masked_dpo_loss(lp[:n], lp[n:], ref[:n], ref[n:], wts[:n], wts[n:], beta=beta)
            loss.backward()
            return loss.detach()
        return run
    if name == LIGER:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        loss_fn = LigerFusedLinearDPOLoss(beta=beta, use_ref_model=True, compiled=w.device.type == "cuda")
        y_masked = y.masked_fill(wts == 0, -100)

        def run():
            _zero_grads(inp)
            out = loss_fn(w, h, y_masked, ref_input=rh, ref_weight=rw)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            return loss.detach()
        return run
    loss_fn = FusedLinearMaskedDPOLoss(beta=beta, backend=name[len("fused["):-1])

    def run():
        _zero_grads(inp)
        loss, _ = loss_fn(h, w, y, wts, ref_hidden=rh, ref_weight=rw)
        loss.backward()
        return loss.detach()
    return run


def grpo_impl(name: str, inp: dict) -> Callable[[], torch.Tensor]:
    """GRPO (loss type grpo, no KL, on-policy: old log-probs = the detached policy's) on ``[N, T]``
    completions; the token weights' nonzero positions are the completion mask."""
    from fastsafe.training import FusedLinearMaskedGRPOLoss
    T = inp["T"]
    H = inp["hidden"].shape[-1]
    h = inp["hidden"].view(-1, T, H)
    y = inp["targets"].view(-1, T)
    on = inp["token_weights"].view(-1, T) != 0
    adv = inp["advantages"]
    w = inp["weight"]
    if name == UNFUSED:
        raise ValueError("masked_grpo has no unfused variant here (compare fused with liger)")
    if name == LIGER:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo",
                                           compiled=w.device.type == "cuda")
        mask = on.to(h.dtype)

        def run():
            _zero_grads(inp)
            out = loss_fn(h, w, y, mask, adv)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            return loss.detach()
        return run
    loss_fn = FusedLinearMaskedGRPOLoss(loss_type="grpo", beta=0.0, backend=name[len("fused["):-1])
    y_masked = y.masked_fill(~on, -100)

    def run():
        _zero_grads(inp)
        loss, _ = loss_fn(h, w, y_masked, adv)
        loss.backward()
        return loss.detach()
    return run


def min_extra_bytes(workload: str, name: str, V: int, NT: int, T: int) -> Optional[int]:
    """A lower bound of an implementation's peak extra memory: the fp32 ``[rows, V]`` buffers it must
    hold at once (logits and their log-softmax), or None when it has no such buffer (fused)."""
    if name == UNFUSED:   # logits and log-probs of every token (DPO: plus the reference's logits)
        return 2 * NT * V * 4 + (NT * V * 4 if workload == "masked_dpo" else 0)
    if name == LIGER and workload == "masked_dpo":   # one chunk = one pair: logits and log-probs [2T, V]
        return 2 * (2 * T) * V * 4
    # Liger's GRPO (0.8.x) computes the selected log-probs chunk by chunk of the vocabulary: no
    # [T, V] buffer, no bound; fused: none either.
    return None


def available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------

MEMORY_METHODS = ("profiler", "rss")
_RSS_ENV = "MALLOC_MMAP_THRESHOLD_"


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_extra_bytes(fn: Callable, device: torch.device, timed: Optional[dict] = None,
                     method: str = "profiler") -> Optional[int]:
    """Bytes allocated above what exists before ``fn()`` at the peak of one call (``timed``, a dict,
    receives that call's ``result`` and wall-clock ``ms``).

    CPU ``method``: ``"profiler"`` replays the PyTorch profiler's allocation timeline (exact, but
    its event records grow with the number of ops: a many-tile call at the long-context shape
    exhausts memory); ``"rss"`` is the rise of the process's peak resident set (``VmHWM`` reset
    through ``/proc/self/clear_refs``) above the resident set before the call, with glibc's mmap
    threshold pinned (``MALLOC_MMAP_THRESHOLD_=131072`` in the environment), so every buffer of
    128 KiB or more is mapped on allocation and returned on free (within ~2 MiB of the profiler).
    """
    timed = {} if timed is None else timed

    def call():
        t0 = time.perf_counter()
        timed["result"] = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timed["ms"] = (time.perf_counter() - t0) * 1e3
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        return int(torch.cuda.max_memory_allocated(device) - base)
    if method == "rss":
        if os.environ.get(_RSS_ENV) is None:
            raise RuntimeError(f"--memory rss: set {_RSS_ENV}=131072 in the environment (glibc must map every "
                               f"large buffer so that freeing it lowers the resident set)")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")           # reset VmHWM to the current resident set
        base = _status_bytes("VmRSS:")
        call()
        return int(_status_bytes("VmHWM:") - base)
    try:  # CPU: replay the profiler's allocation timeline (private API; None if it changes)
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            call()
        cur = peak = 0
        for _, action, _, size in prof._memory_profile().timeline:
            if action == Action.CREATE:
                cur += size
            elif action == Action.DESTROY:
                cur -= size
            peak = max(peak, cur)
        return int(peak)
    except Exception as exc:  # pragma: no cover
        print(f"  (CPU memory timeline unavailable: {type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def _peak_fresh(fn: Callable, inp: dict, device: torch.device, method: str) -> Optional[int]:
    """:func:`peak_extra_bytes` of ``fn`` with no gradients alive before it: ``fn`` sets them to None
    first, and freeing the last call's gradients inside the measure would lower the peak by their size."""
    _zero_grads(inp)
    return peak_extra_bytes(fn, device, method=method)


def matmul_peak_tflops(device: torch.device, dtype, repeat: int = 20) -> Optional[float]:
    """Measured dense GEMM throughput ([8192, 8192] x [8192, 8192]) on a GPU, TFLOP/s."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_cuda(lambda: a @ b, repeat, warmup=5)
    return 2 * n ** 3 / (summarize(times)["median_ms"] * 1e-3) / 1e12


def select_impls(workload: str, device: torch.device, backends: Optional[List[str]], liger_on_cpu: bool = False):
    chosen, skipped = ([] if workload == "masked_grpo" else [UNFUSED]), []
    for b in backends or (["torch", "triton"] if device.type == "cuda" else ["torch"]):
        if b == "triton" and device.type != "cuda":
            skipped.append({"impl": fused(b), "reason": "the Triton path is timed on GPUs only (the CPU "
                                                        "interpreter is a correctness tool)"})
            continue
        chosen.append(fused(b))
    if workload in ("masked_dpo", "masked_grpo"):
        try:
            import liger_kernel.chunked_loss  # noqa: F401
            if device.type == "cuda" or liger_on_cpu:
                chosen.append(LIGER)
            else:
                skipped.append({"impl": LIGER, "reason": "Liger-Kernel is run on the CPU with --long-context only"})
        except Exception as exc:
            skipped.append({"impl": LIGER, "reason": f"liger-kernel not installed ({type(exc).__name__})"})
    return chosen, skipped


def check(workload: str, name: str, out: torch.Tensor, ref_out: torch.Tensor, grads, ref_grads,
          binary_weights: bool = False) -> dict:
    if name == LIGER and workload == "masked_dpo" and not binary_weights:
        return {"note": "sequence-level DPO with a 0/1 mask: different loss, not compared"}
    res = {"max_abs_diff_output": (out.float() - ref_out.float()).abs().max().item()}
    for key, g, rg in zip(("hidden", "weight"), grads, ref_grads):
        scale = max(rg.float().abs().max().item(), 1e-30)
        res[f"max_rel_diff_grad_{key}"] = (g.float() - rg.float()).abs().max().item() / scale
    return res


def run_case(workload: str, V: int, H: int, NT: int, T: int, dtype, device, impls, repeat: int, warmup: int,
             gemm_tflops: Optional[float], binary_weights: bool = False, one_call: bool = False,
             memory: str = "profiler") -> List[dict]:
    inp = make_inputs(V, H, NT, T, dtype, device, binary_weights=binary_weights)
    make = {"token_logps": logps_impl, "masked_dpo": dpo_impl, "masked_grpo": grpo_impl}[workload]
    fns, errors, first, grads, too_big, first_ms, peaks = {}, {}, {}, {}, {}, {}, {}
    avail = available_bytes() if device.type == "cpu" else None
    for name in impls:
        need = min_extra_bytes(workload, name, V, NT, T)
        if need is not None and avail is not None and need > 0.5 * avail:
            too_big[name] = need
            errors[name] = (f"not run: needs at least {need / 2**30:.1f} GiB of [rows, V] fp32 buffers, "
                            f"{avail / 2**30:.1f} GiB available")
            continue
        try:
            fn = make(name, inp)
            _zero_grads(inp)   # the previous implementation's gradients are freed before, not inside, the measure
            if one_call:   # one call, under the memory profiler, gives output, time and peak
                timed = {}
                peaks[name] = peak_extra_bytes(fn, device, timed, method=memory)
                first[name], first_ms[name] = timed["result"], timed["ms"]
            else:
                t0 = time.perf_counter()
                first[name] = fn()
                first_ms[name] = (time.perf_counter() - t0) * 1e3
            grads[name] = (inp["hidden"].grad.detach().clone(), inp["weight"].grad.detach().clone())
            fns[name] = fn
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    if device.type == "cuda":
        times = {n: time_cuda(fn, repeat, warmup) for n, fn in fns.items()}
    elif one_call or (repeat == 1 and warmup == 0):   # long shapes: the checked call is the timed one
        times = {n: [first_ms[n]] for n in fns}
    else:
        times = time_cpu_interleaved(fns, repeat, warmup=warmup - 1 if warmup > 0 else 0)
    flops = (10 if workload == "masked_dpo" else 8) * NT * H * V
    rows = []
    for name in impls:
        row = {"workload": workload, "vocab": V, "hidden": H, "tokens": NT, "seq": T,
               "dtype": str(dtype).replace("torch.", ""), "impl": name}
        need = min_extra_bytes(workload, name, V, NT, T)
        if need is not None:
            row["min_extra_bytes"] = need
        if name in errors:
            row["error"] = errors[name]
            rows.append(row)
            continue
        stats = summarize(times[name])
        row.update({"median_ms": stats["median_ms"], "stats": stats, "flops": flops,
                    "tflops": flops / (stats["median_ms"] * 1e-3) / 1e12,
                    "peak_extra_bytes": peaks[name] if one_call else _peak_fresh(fns[name], inp, device, memory)})
        # What any implementation must hold at the end: the weight and hidden-state gradients.
        grad_bytes = sum(t.numel() * t.element_size() for t in (inp["weight"], inp["hidden"]))
        row["gradient_bytes"] = grad_bytes
        if row["peak_extra_bytes"] is not None:
            row["peak_extra_bytes_beyond_gradients"] = row["peak_extra_bytes"] - grad_bytes
        if gemm_tflops:
            row["gemm_peak_fraction"] = row["tflops"] / gemm_tflops
        base_name = UNFUSED if UNFUSED in first else (fused("torch") if name == LIGER and fused("torch") in first
                                                      else None)
        if base_name is not None and name != base_name and base_name in first:
            row["check"] = check(workload, name, first[name], first[base_name], grads[name], grads[base_name],
                                 binary_weights)
            row["check"]["against"] = base_name
        rows.append(row)
    base = next((r for r in rows if r["impl"] == UNFUSED and "median_ms" in r), None)
    liger = next((r for r in rows if r["impl"] == LIGER and "median_ms" in r), None)
    for r in rows:
        if base is not None and "median_ms" in r:
            r["speedup_vs_unfused"] = base["median_ms"] / r["median_ms"]
            if r.get("peak_extra_bytes") is not None and base.get("peak_extra_bytes"):
                r["memory_vs_unfused"] = r["peak_extra_bytes"] / base["peak_extra_bytes"]
        if liger is not None and "median_ms" in r and r["impl"].startswith("fused"):
            r["speedup_vs_liger"] = liger["median_ms"] / r["median_ms"]
            if r.get("peak_extra_bytes") is not None and liger.get("peak_extra_bytes"):
                r["memory_vs_liger"] = r["peak_extra_bytes"] / liger["peak_extra_bytes"]
            if r.get("peak_extra_bytes_beyond_gradients") is not None \
                    and liger.get("peak_extra_bytes_beyond_gradients", 0) > 0:
                r["memory_beyond_gradients_vs_liger"] = (r["peak_extra_bytes_beyond_gradients"]
                                                         / liger["peak_extra_bytes_beyond_gradients"])
        lg_row = next((x for x in rows if x["impl"] == LIGER), None)
        if (liger is None and lg_row is not None and lg_row.get("min_extra_bytes") and r["impl"].startswith("fused")
                and r.get("peak_extra_bytes") is not None):
            r["memory_vs_liger_lower_bound"] = r["peak_extra_bytes"] / lg_row["min_extra_bytes"]
    del inp, fns
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def targets(rows: List[dict], device: torch.device) -> dict:
    out = {}
    mem = [r for r in rows if r["impl"].startswith("fused") and r["vocab"] == 151936 and r["tokens"] == 8192
           and r.get("memory_vs_unfused") is not None]
    if mem:
        out["memory_at_most_0.1x_unfused_at_V151936_NT8192"] = {
            "measured": {f"{r['workload']}/{r['impl']}": r["memory_vs_unfused"] for r in mem},
            "pass": all(r["memory_vs_unfused"] <= 0.1 for r in mem)}
    else:
        near = [r for r in rows if r["impl"].startswith("fused") and r["vocab"] == 151936
                and r.get("memory_vs_unfused") is not None]
        out["memory_at_most_0.1x_unfused_at_V151936_NT8192"] = (
            {"not_measured": "NT=8192 not run", "indicative_at_V151936": {
                f"{r['workload']}/{r['impl']}/NT{r['tokens']}/H{r['hidden']}": r["memory_vs_unfused"] for r in near}}
            if near else "not measured (shape not run)")
    is_h100 = device.type == "cuda" and "h100" in torch.cuda.get_device_name(device).lower()
    fr = [r for r in rows if r["impl"] == "fused[triton]" and r.get("gemm_peak_fraction") is not None]
    out["at_least_0.6_of_bf16_gemm_peak_on_h100"] = (
        {"measured": {f"{r['workload']}/V{r['vocab']}": r["gemm_peak_fraction"] for r in fr},
         "pass": all(r["gemm_peak_fraction"] >= 0.6 for r in fr)}
        if (is_h100 and fr) else "not measured (needs an H100)")
    lg = [r for r in rows if r.get("speedup_vs_liger") is not None]
    out["faster_than_liger_fused_linear_dpo"] = (
        {"measured": {f"{r['workload']}/{r['impl']}/V{r['vocab']}": r["speedup_vs_liger"] for r in lg},
         "pass": all(r["speedup_vs_liger"] > 1 for r in lg)} if lg else "not measured (Liger-Kernel not run)")
    key = lambda r: f"{r['workload']}/{r['impl']}/V{r['vocab']}/NT{r['tokens']}/T{r['seq']}"  # noqa: E731
    mem = {key(r): r["memory_vs_liger"] for r in rows if r.get("memory_vs_liger") is not None}
    bound = {key(r): r["memory_vs_liger_lower_bound"] for r in rows
             if r.get("memory_vs_liger_lower_bound") is not None}
    if mem or bound:
        out["memory_at_most_0.05x_liger"] = {
            "measured": mem, "vs_liger_lower_bound_where_liger_cannot_run": bound,
            "pass": all(v <= 0.05 for v in list(mem.values()) + list(bound.values()))}
    beyond = {key(r): r["memory_beyond_gradients_vs_liger"] for r in rows
              if r.get("memory_beyond_gradients_vs_liger") is not None}
    if beyond:   # the same, less the weight and hidden-state gradients both must hold
        out["memory_beyond_the_gradients_at_most_0.05x_liger"] = {
            "measured": beyond, "pass": all(v <= 0.05 for v in beyond.values())}
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.losses", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--vocab", default=None, help="comma-separated vocabulary sizes")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None, help="NT, tokens per batch")
    p.add_argument("--seq", type=int, default=None, help="T of the DPO batch [2N, T] (NT must be a multiple of 2T)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--workloads", default=None, help="default token_logps,masked_dpo "
                   "(--long-context: token_logps,masked_dpo,masked_grpo)")
    p.add_argument("--one-call", action="store_true",
                   help="call each implementation once, under the memory profiler (time includes its overhead)")
    p.add_argument("--memory", choices=MEMORY_METHODS, default="profiler",
                   help="CPU peak-memory measure: the profiler's allocation timeline (default) or the peak "
                        "resident set (needs MALLOC_MMAP_THRESHOLD_=131072; for calls too long to profile)")
    p.add_argument("--impls", default=None, help="only these implementations (e.g. fused[torch],liger)")
    p.add_argument("--backends", default=None, help="fused backends to time (default: torch; torch,triton on GPU)")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--long-context", action="store_true",
                   help="V 262144, H 64, NT 32768, T 8192, fp32; adds masked_grpo and Liger on the CPU")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/losses-<device>.json)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = select_device(args.device, args.threads)
    d = dict(DEFAULTS[device.type])
    if args.quick:
        d.update(QUICK)
    if args.long_context:
        d.update(LONG_CONTEXT)
    for key in ("vocab", "hidden", "tokens", "seq", "dtype", "repeat", "warmup"):
        if not hasattr(args, key):
            continue
        if getattr(args, key) is not None:
            d[key] = getattr(args, key)
    vocabs = parse_int_list(d["vocab"], "--vocab")
    H, NT, T, dtype = int(d["hidden"]), int(d["tokens"]), int(d["seq"]), DTYPES[d["dtype"]]
    if NT % (2 * T):
        raise ValueError(f"--tokens: expected a multiple of 2 * --seq = {2 * T} (whole DPO pairs), got {NT}")
    default_workloads = LONG_CONTEXT_WORKLOADS if args.long_context else "token_logps,masked_dpo"
    workloads = [w.strip() for w in (args.workloads or default_workloads).split(",") if w.strip()]
    for w in workloads:
        if w not in WORKLOADS:
            raise ValueError(f"--workloads: expected some of {', '.join(WORKLOADS)}, got {w!r}")
    only = None if args.impls is None else {i.strip() for i in args.impls.split(",") if i.strip()}
    backends = None if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]

    env = environment(device)
    gemm = matmul_peak_tflops(device, dtype)
    print(f"losses benchmark on {env['device']['name']} ({device.type}), torch {env['torch']}, threads "
          f"{env['torch_threads']}, dtype {d['dtype']}, H {H}, NT {NT}, V {vocabs}"
          + (f", bf16 GEMM peak {gemm:.0f} TFLOP/s" if gemm else ""))
    rows, skipped = [], []
    for w in workloads:
        impls, sk = select_impls(w, device, backends, liger_on_cpu=args.long_context)
        if only is not None:
            impls = [i for i in impls if i in only]
        skipped += [{"workload": w, **s} for s in sk]
        for s in sk:
            print(f"  skipped {w}/{s['impl']}: {s['reason']}")
        for V in vocabs:
            rows += run_case(w, V, H, NT, T, dtype, device, impls, int(d["repeat"]), int(d["warmup"]), gemm,
                             binary_weights=args.long_context, one_call=args.one_call, memory=args.memory)

    table = []
    for r in rows:
        if "error" in r:
            table.append([r["workload"], r["vocab"], r["impl"], "error", "", "", "", ""])
            continue
        mem = r.get("peak_extra_bytes")
        table.append([r["workload"], r["vocab"], r["impl"], f"{r['median_ms']:.2f}",
                      f"{r.get('speedup_vs_unfused', 1.0):.2f}x", "-" if mem is None else f"{mem / 2**20:.1f}",
                      "-" if r.get("memory_vs_unfused") is None else f"{r['memory_vs_unfused']:.3f}",
                      f"{r['tflops']:.3f}"])
    print(format_table(table, ["workload", "V", "impl", "median ms", "speedup", "peak extra MiB",
                               "mem vs unfused", "TFLOP/s"]))
    for r in rows:
        if "error" in r:
            print(f"  {r['workload']}/{r['impl']} V={r['vocab']}: {r['error']}")
    tg = targets(rows, device)
    payload = {
        "benchmark": "losses",
        "device": env["device"],
        "environment": env,
        "config": {"vocab": vocabs, "hidden": H, "tokens": NT, "seq": T, "dtype": d["dtype"],
                   "repeat": int(d["repeat"]), "workloads": workloads},
        "one_call": bool(args.one_call),
        "memory_method": args.memory,
        "load_average_1_5_15min_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "protocol": ("median of forward+backward wall-clock (CPU, implementations interleaved) or CUDA-event "
                     "times; peak_extra_bytes = peak allocation above the inputs during one forward+backward "
                     "(CUDA allocator stats, or the PyTorch profiler memory timeline on the CPU); FLOPs "
                     "8*NT*H*V for token_logps and masked_grpo, 10*NT*H*V for masked_dpo; with one_call each "
                     "implementation is called once, under the memory profiler, and that call is timed; "
                     "min_extra_bytes = two [rows, V] fp32 buffers an implementation must hold at once"),
        "gemm_peak_tflops": gemm,
        "skipped": skipped,
        "targets": tg,
        "results": rows,
    }
    stem = "losses-long-context" if args.long_context else "losses"
    out = args.out or (RESULTS_DIR / f"{stem}-{device_slug(device)}.json")
    path = write_json(out, payload)
    print(f"targets: {tg}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

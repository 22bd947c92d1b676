"""Rank side of tests/test_token_logps_vocab_parallel.py (run by tests.distributed_launch)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from fastsafe.training import token_logps

# name -> (dtype, N, T, H, shard sizes per rank, keyword arguments, backend, chunk_size)
CASES = {
    "fp64_kl_entropy_bias": (torch.float64, 2, 5, 8, (20, 17),
                             dict(return_kl=True, return_entropy=True, temperature=0.9), "torch", None),
    "fp64_plain_extreme_uneven": (torch.float64, 3, 4, 6, (1, 36), dict(), "torch", 2),
    "fp64_entropy_active": (torch.float64, 2, 6, 5, (9, 4), dict(return_entropy=True, active=True), "torch", 3),
    "fp32_triton_kl_entropy": (torch.float32, 2, 5, 16, (40, 33),
                               dict(return_kl=True, return_entropy=True, temperature=1.2), "triton", None),
}


def make_case(name: str, seed: int = 0):
    """Full (unsharded) inputs of a case, the same on every rank: a dict of tensors and options."""
    dtype, N, T, H, sizes, kw, backend, chunk = CASES[name]
    V = sum(sizes)
    g = torch.Generator().manual_seed(seed)
    case = dict(
        hidden=(torch.randn(N, T, H, generator=g) * 0.8).to(dtype),
        weight=(torch.randn(V, H, generator=g) / H ** 0.25).to(dtype),
        bias=(torch.randn(V, generator=g) * 0.3).to(dtype) if "bias" in name or backend == "triton" else None,
        targets=torch.randint(0, V, (N, T), generator=g),
        ref_hidden=(torch.randn(N, T, H, generator=g) * 0.8).to(dtype),
        ref_weight=(torch.randn(V, H, generator=g) / H ** 0.25).to(dtype),
        upstream=torch.randn(3, N, T, generator=g, dtype=torch.float64).to(acc(dtype)),
        active=(torch.rand(N, T, generator=g) > 0.3),
    )
    case["targets"][0, 0] = -100
    case["targets"][-1, -1] = V - 1          # the last row of the last shard
    case["targets"][0, 1] = sizes[0] - 1     # the last row of shard 0
    case["targets"][0, 2] = sizes[0]         # the first row of shard 1
    opts = dict(kw)
    if not opts.pop("active", False):
        case["active"] = None
    if not opts.get("return_kl"):
        case["ref_hidden"] = case["ref_weight"] = None
    return case, opts, sizes, backend, chunk


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def run_op(case, opts, weight, bias, ref_weight, backend, chunk, **extra):
    """Outputs and gradients (hidden, weight, bias) of a weighted sum of token_logps' outputs."""
    hidden = case["hidden"].clone().requires_grad_()
    out = token_logps(hidden, weight, case["targets"], bias, active=case["active"], ref_hidden=case["ref_hidden"],
                      ref_weight=ref_weight, backend=backend, chunk_size=chunk, **opts, **extra)
    out = out if isinstance(out, tuple) else (out,)
    loss = sum((o * case["upstream"][i]).sum() for i, o in enumerate(out))
    params = [hidden, weight] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(loss, params)
    return dict(out=[o.detach() for o in out], grad_hidden=grads[0], grad_weight=grads[1],
                grad_bias=grads[2] if bias is not None else None)


def shard(t, sizes, rank):
    if t is None:
        return None
    lo = sum(sizes[:rank])
    return t[lo:lo + sizes[rank]].clone()


def vocab_parallel(rank, world_size, cases):
    """Every case on this rank's shard, then the bad inputs (each error message, per rank)."""
    pg = dist.group.WORLD
    results = {}
    for name in cases:
        case, opts, sizes, backend, chunk = make_case(name)
        w = shard(case["weight"], sizes, rank).requires_grad_()
        b = shard(case["bias"], sizes, rank)
        b = None if b is None else b.requires_grad_()
        results[name] = run_op(case, opts, w, b, shard(case["ref_weight"], sizes, rank), backend, chunk,
                               process_group=pg)
    results["errors"] = bad_inputs(rank, pg)
    return results


def bad_inputs(rank, pg):
    case, opts, sizes, _, _ = make_case("fp64_kl_entropy_bias")
    h, t = case["hidden"], case["targets"]
    w = shard(case["weight"], sizes, rank)
    calls = {
        "vocab_size": lambda: token_logps(h, w, t, process_group=pg, vocab_size=sum(sizes) + 3),
        "H": lambda: token_logps(h, w if rank == 0 else w[:, :-1], t, process_group=pg),
        "tokens": lambda: token_logps(h if rank == 0 else h[:, :-1], w, t if rank == 0 else t[:, :-1],
                                      process_group=pg),
        "bias_on_one_rank": lambda: token_logps(h, w, t, torch.zeros(w.shape[0], dtype=w.dtype) if rank else None,
                                                process_group=pg),
        "targets_out_of_vocab": lambda: token_logps(h, w, t.clamp(min=0) + sum(sizes) - 1, process_group=pg),
        "not_a_group": lambda: token_logps(h, w, t, process_group="world"),
    }
    errors = {}
    for key, call in calls.items():
        try:
            call()
            errors[key] = None
        except (ValueError, TypeError, RuntimeError) as exc:
            errors[key] = f"{type(exc).__name__}: {exc}"
    # After every refused call the group still works (no rank was left inside a collective).
    x = torch.ones(1)
    dist.all_reduce(x, group=pg)
    errors["group_alive"] = x.item()
    return errors

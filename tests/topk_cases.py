"""Input grids for the safe_topk backend tests."""
import itertools

import torch

from fastsafe.ops import pack_bitmask

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OPTIONS = ("bias", "mask", "reward", "temperature")


def make_inputs(B, V, dtype, options, seed=0, ban_fraction=0.5, shared_mask=False, device="cpu"):
    """Random logits plus the optional inputs named in ``options`` (a subset of OPTIONS)."""
    g = torch.Generator().manual_seed(seed * 1000003 + B * 7919 + V)
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    kw = {}
    if "bias" in options:
        L = 4
        kw["bias_table"] = torch.randn(L, V, generator=g) * 0.5
        kw["positions"] = torch.randint(-2, L + 3, (B,), generator=g)  # out of range -> clamped
        kw["bias_scale"] = 0.8
    if "mask" in options:
        shape = (V,) if shared_mask else (B, V)
        allowed = torch.rand(shape, generator=g) >= ban_fraction
        kw["banned_bitmask"] = pack_bitmask(allowed)
    if "reward" in options:
        kw["dense_reward"] = torch.randn(B, V, generator=g).to(dtype)
        kw["reward_weight"] = 0.3
    if "temperature" in options:
        kw["temperature"] = 0.7
    logits = logits.to(device)
    kw = {key: (v.to(device) if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}
    return logits, kw


def option_sets(full=True):
    if full:
        return [tuple(c) for r in range(len(OPTIONS) + 1) for c in itertools.combinations(OPTIONS, r)]
    return [(), OPTIONS]


def small_grid():
    """B x V x k x dtype x every subset of options, for small V."""
    for B, V, k, dtype, opts in itertools.product((1, 3, 64), (1, 31, 32, 33), (1, 5, 50), DTYPES, option_sets()):
        if k <= V:
            yield B, V, k, dtype, opts


def large_grid():
    """Real vocabulary sizes: every dtype with no / all options, each single option in fp32."""
    for B, V, k in itertools.product((1, 3, 64), (50257, 151936), (1, 5, 50)):
        for dtype in DTYPES:
            yield B, V, k, dtype, ()
            yield B, V, k, dtype, OPTIONS
        if B == 3:
            for opt in OPTIONS:
                yield B, V, k, torch.float32, (opt,)


def case_id(case):
    B, V, k, dtype, opts = case
    return f"B{B}-V{V}-k{k}-{str(dtype).split('.')[-1]}-{'+'.join(opts) or 'plain'}"

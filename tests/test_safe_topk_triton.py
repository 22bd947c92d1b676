"""The Triton ``safe_topk`` kernels against the torch reference (CPU: TRITON_INTERPRET=1).

Tolerances are those of tests/topk_checks.py (values and logsumexp to 1e-5; ids exact where the
test says so). Shapes are small because the interpreter runs each program in Python; a covering
design gives every dtype and every optional input both on and off. Tests that force small tiles,
several splits and several pass-2 chunks exercise the paths a GPU takes on real vocabularies.
"""
import pytest
import torch

from fastsafe.ops import pack_bitmask, safe_topk
from fastsafe.ops.types import SafeTopK
from fastsafe.ops.validate import validate_safe_topk
from tests.conftest import require_backend
from tests.topk_cases import DTYPES, OPTIONS, make_inputs, option_sets
from tests.topk_checks import assert_matches_reference

# On a machine with a GPU the kernels run there (the interpreter is off); else on the CPU under
# TRITON_INTERPRET=1 (set by tests/conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def dev(*tensors):
    """The tensors on DEVICE (one tensor in, one out)."""
    moved = tuple(t.to(DEVICE) for t in tensors)
    return moved[0] if len(moved) == 1 else moved


def _kernels():
    from fastsafe.kernels import safe_topk as mod
    return mod


def run_forced(logits, k, *, block_v=None, n_splits=None, block_c=None, **kw) -> SafeTopK:
    """Launch the kernels directly with a forced tiling (as a GPU would use on a large vocabulary)."""
    inp = validate_safe_topk(logits, k, **kw)
    values, indices, lse = _kernels().safe_topk_triton(inp, block_v=block_v, n_splits=n_splits, block_c=block_c)
    return SafeTopK(values, indices, lse, torch.isneginf(lse))


def _covering_cases():
    """Every (B, V, k) of the interpreter grid once; dtype, option subset and mask sharing rotate."""
    subsets = option_sets()                       # all 16 subsets of OPTIONS
    cases = []
    i = 0
    for B in (1, 3):
        for V in (1, 31, 32, 33, 1000, 5000):     # 5000 needs several splits of several tiles
            for k in (1, 5, 50):
                if k > V:
                    continue
                opts = subsets[(5 * i) % len(subsets)]
                cases.append((B, V, k, DTYPES[i % len(DTYPES)], opts, i % 2 == 1))
                i += 1
    cases.append((3, 1000, 50, torch.float16, OPTIONS, True))
    cases.append((3, 1000, 50, torch.bfloat16, (), False))
    return cases


COVERING = _covering_cases()


def test_covering_design_is_complete():
    require_backend("triton")
    dtypes = {c[3] for c in COVERING}
    assert dtypes == set(DTYPES)
    for opt in OPTIONS:
        assert any(opt in c[4] for c in COVERING) and any(opt not in c[4] for c in COVERING), opt
    assert any("mask" in c[4] and c[5] for c in COVERING) and any("mask" in c[4] and not c[5] for c in COVERING)


@pytest.mark.parametrize("case", COVERING, ids=[
    f"B{B}-V{V}-k{k}-{str(d).split('.')[-1]}-{'+'.join(o) or 'plain'}{'-shared' if s else ''}"
    for B, V, k, d, o, s in COVERING])
def test_grid_against_reference(case):
    require_backend("triton")
    B, V, k, dtype, opts, shared = case
    logits, kw = make_inputs(B, V, dtype, opts, shared_mask=shared, device=DEVICE)
    out = safe_topk(logits, k, backend="triton", **kw)
    assert_matches_reference(out, logits, k, **kw)


@pytest.mark.parametrize("k,block_v,n_splits,block_c", [
    (50, 64, 7, 128),       # many tiles per split (one-by-one insertions), 3 pass-2 chunks
    (5, 16, 3, 8),          # tiny tiles: mostly the insertion path
    (1, 128, 2, 2),         # k = 1 (KP = 2)
    (200, 256, 3, 256),     # KP = 256, one tile per split in the first splits
])
def test_forced_tiling_matches_reference(k, block_v, n_splits, block_c):
    require_backend("triton")
    logits, kw = make_inputs(3, 3000, torch.float32, OPTIONS, seed=k, device=DEVICE)
    out = run_forced(logits, k, block_v=block_v, n_splits=n_splits, block_c=block_c, **kw)
    assert_matches_reference(out, logits, k, exact_ids=True, **kw)


def test_one_by_one_insertion_keeps_the_best():
    """A tile with few winners that are barely above the running k-th best: after the first winner
    goes in, the second no longer beats the new minimum and must not replace it."""
    require_backend("triton")
    logits = torch.zeros(1, 64)
    logits[0, :16] = torch.arange(1, 17, dtype=torch.float32)   # tile 0: best 8 are 9..16
    logits[0, 20] = 9.25                                       # tile 1: two winners in (9, 10)
    logits[0, 27] = 9.5
    logits = dev(logits)
    out = run_forced(logits, 8, block_v=16, n_splits=1, block_c=8)
    assert out.indices[0].tolist() == [15, 14, 13, 12, 11, 10, 9, 27]
    assert_matches_reference(out, logits, 8, exact_ids=True)


def test_largest_supported_k():
    require_backend("triton")
    k = _kernels().MAX_K
    logits, kw = make_inputs(2, 2500, torch.float32, ("mask", "bias"), ban_fraction=0.3, device=DEVICE)
    out = safe_topk(logits, k, backend="triton", **kw)
    assert_matches_reference(out, logits, k, exact_ids=True, **kw)


def test_k_beyond_limit_raises():
    require_backend("triton")
    k = _kernels().MAX_K + 1
    with pytest.raises(ValueError, match=r"k: the triton backend supports 1 <= k <= 1024, got 1025"):
        safe_topk(dev(torch.randn(2, 2000)), k, backend="triton")
    with pytest.raises(ValueError, match="block_v"):
        run_forced(dev(torch.randn(2, 100)), 50, block_v=32)
    with pytest.raises(ValueError, match="block_c"):
        run_forced(dev(torch.randn(2, 100)), 5, block_c=24)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_break_by_lower_id(dtype):
    require_backend("triton")
    V = 1000
    g = torch.Generator().manual_seed(1)
    logits = torch.zeros(4, V, dtype=dtype)
    logits[0, [7, 3, 900, 500]] = 2.0                          # four-way tie at the top
    logits[1] = torch.randint(0, 4, (V,), generator=g).to(dtype)   # massive ties
    logits[3, [10, 20]] = -0.0                                  # -0.0 ties with +0.0
    logits[3, :10] = -1.0                                       # row 2: all equal
    logits = dev(logits)
    out = safe_topk(logits, 5, backend="triton")
    assert out.indices[0].tolist() == [3, 7, 500, 900, 0]
    assert out.indices[3].tolist() == [10, 11, 12, 13, 14]
    assert_matches_reference(out, logits, 5, exact_ids=True)
    # the same ties spread over several splits and tiles, merged in pass 2
    out = run_forced(logits, 50, block_v=64, n_splits=5, block_c=64)
    assert_matches_reference(out, logits, 50, exact_ids=True)


@pytest.mark.parametrize("shared", [False, True])
def test_all_banned_and_fewer_allowed_than_k(shared):
    require_backend("triton")
    B, V, k = 3, 300, 50
    logits = torch.randn(B, V)
    if shared:
        allowed = torch.zeros(V, dtype=torch.bool)
        allowed[[250, 7, 130]] = True                        # 3 allowed < k for every row
    else:
        allowed = torch.ones(B, V, dtype=torch.bool)
        allowed[1] = False                                   # all banned
        allowed[2] = False
        allowed[2, 142] = True                               # one allowed
    logits, mask = dev(logits, pack_bitmask(allowed))
    for out in (safe_topk(logits, k, banned_bitmask=mask, backend="triton"),
                run_forced(logits, k, banned_bitmask=mask, block_v=64, n_splits=4, block_c=64)):
        assert_matches_reference(out, logits, k, exact_ids=True, banned_bitmask=mask)
        if shared:
            assert sorted(out.indices[:, :3].flatten().tolist()) == sorted([7, 130, 250] * 3)
            assert torch.isneginf(out.values[:, 3:]).all() and not out.all_banned.any()
        else:
            assert out.all_banned.tolist() == [False, True, False]
            assert out.indices[1].tolist() == list(range(k))   # -inf fill: lowest ids
            assert out.indices[2, 0].item() == 142
            assert out.indices[2, 1:].tolist() == list(range(k - 1))
            assert torch.isneginf(out.logsumexp[1])
            assert out.logsumexp[2].item() == pytest.approx(logits[2, 142].item(), abs=1e-6)


def test_99_percent_banned():
    require_backend("triton")
    logits, kw = make_inputs(3, 6000, torch.float32, ("mask",), ban_fraction=0.99, device=DEVICE)
    out = safe_topk(logits, 50, backend="triton", **kw)
    assert_matches_reference(out, logits, 50, exact_ids=True, **kw)
    out = run_forced(logits, 50, block_v=128, n_splits=3, block_c=128, **kw)
    assert_matches_reference(out, logits, 50, exact_ids=True, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_strided_logits(dtype):
    require_backend("triton")
    wide = dev(torch.randn(3, 1500)).to(dtype)[:, 3:1006]           # row stride 1500, offset start
    assert not wide.is_contiguous() and wide.stride(1) == 1
    out = safe_topk(wide, 7, backend="triton")
    assert_matches_reference(out, wide, 7)
    reward = dev(torch.randn(1003, 3)).to(dtype).t()                 # transposed reward (made row-wise)
    step = dev(torch.randn(3, 2 * 1003)).to(dtype)[:, ::2]           # column stride 2 (made contiguous)
    kw = dict(dense_reward=reward, reward_weight=0.5, temperature=1.3)
    out = safe_topk(step, 7, backend="triton", **kw)
    assert_matches_reference(out, step, 7, **kw)


def test_nan_and_inf_logits():
    """NaN is never selected and makes its row's logsumexp NaN, unless it is banned; +inf wins."""
    require_backend("triton")
    logits = torch.randn(4, 200)
    logits[0, 5] = float("nan")
    logits[0, 6] = 100.0
    logits[2, 9] = float("nan")
    logits[3, 150] = float("inf")
    logits[3, 3] = float("nan")
    allowed = torch.ones(4, 200, dtype=torch.bool)
    allowed[2, 9] = False                                    # a banned NaN does not matter
    allowed[3, 3] = False
    logits, mask = dev(logits, pack_bitmask(allowed))
    for out in (safe_topk(logits, 4, banned_bitmask=mask, backend="triton"),
                run_forced(logits, 4, banned_bitmask=mask, block_v=32, n_splits=3, block_c=8)):
        assert torch.isnan(out.logsumexp[0]) and not torch.isnan(out.logsumexp[1:]).any()
        assert torch.isposinf(out.logsumexp[3]) and out.indices[3, 0].item() == 150
        assert 5 not in out.indices[0].tolist() and out.indices[0, 0].item() == 6
        assert not torch.isnan(out.values).any()
        assert_matches_reference(out, logits, 4, exact_ids=True, banned_bitmask=mask)
    nan_row = dev(torch.full((1, 40), float("nan")))                # nothing finite: -inf fill, NaN lse
    out = safe_topk(nan_row, 3, backend="triton")
    assert out.indices[0].tolist() == [0, 1, 2] and torch.isnan(out.logsumexp[0])


def test_logsumexp_across_splits_is_exact():
    require_backend("triton")
    logits = torch.randn(2, 4000) * 20
    logits[0, 3999] = 80.0                                    # max in the last split
    logits[1, :2000] = float("-inf")                          # first splits have nothing finite
    logits = dev(logits)
    out = run_forced(logits, 5, block_v=256, n_splits=4)
    assert torch.allclose(out.logsumexp, torch.logsumexp(logits, 1), rtol=1e-6, atol=1e-5)
    assert_matches_reference(out, logits, 5, exact_ids=True)
    part = logits[:, 1800:2700]                               # row 1: 200 -inf, then finite
    out_all = safe_topk(part, 900, backend="triton")          # k = V: the whole distribution
    assert torch.allclose(out_all.logprobs().exp().sum(1), dev(torch.ones(2)), atol=1e-4)


def test_dispatcher_uses_triton_kernels():
    require_backend("triton")
    logits, kw = make_inputs(3, 333, torch.bfloat16, OPTIONS, device=DEVICE)
    inp = validate_safe_topk(logits, 9, **kw)
    vals, idx, lse = _kernels().safe_topk_triton(inp)
    out = safe_topk(logits, 9, backend="triton", **kw)
    assert torch.equal(vals, out.values) and torch.equal(idx, out.indices)
    assert torch.equal(lse, out.logsumexp)
    assert_matches_reference(out, logits, 9, exact_ids=True, **kw)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_launch_plan_covers_the_row(device, monkeypatch):
    require_backend("triton")
    mod = _kernels()
    monkeypatch.setattr(mod, "_sm_count", lambda index: 132)     # plan for an H100 without one
    for B in (1, 3, 8, 64, 1000):
        for V in (1, 31, 1000, 5000, 32000, 151936):
            for k in (1, 5, 50, 1000):
                if k > V:
                    continue
                p = mod.plan_launch(B, V, k, torch.device(device, 0) if device == "cuda" else torch.device("cpu"))
                kp, block, ns, sl = p["KP"], p["BLOCK_V"], p["n_splits"], p["slice_len"]
                assert kp >= k and kp & (kp - 1) == 0 and block >= kp and block & (block - 1) == 0
                assert sl % block == 0 and (ns - 1) * sl < V <= ns * sl, p     # no empty slice
                assert ns * kp <= 16384
                if device == "cpu":
                    assert ns <= 4
    assert mod.plan_launch(1, 151936, 50, torch.device("cuda", 0))["n_splits"] > 16
    assert mod.plan_launch(3, 5000, 5, torch.device("cpu"))["n_splits"] > 1


def test_kernels_compile_for_the_gpu():
    """The interpreter accepts things the GPU compiler rejects: compile both kernels for sm_90
    ahead of time (Triton's bundled ptxas; no GPU needed) in a process without TRITON_INTERPRET."""
    require_backend("triton")
    import os
    import subprocess
    import sys
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    code = ("import fastsafe; from fastsafe.kernels.safe_topk import compile_for_gpu; "
            "print(compile_for_gpu(90, k=50, logits_dtype='bf16'))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and ("No such file" in proc.stderr or "not found" in proc.stderr):
        pytest.skip(f"no ptxas to compile with: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'partial'" in proc.stdout and "'merge'" in proc.stdout

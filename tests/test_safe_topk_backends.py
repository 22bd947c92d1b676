"""Every safe_topk backend against the torch reference (see topk_checks for the tolerances)."""
import pytest
import torch

from fastsafe.ops import pack_bitmask, safe_topk
from tests.conftest import require_backend
from tests.topk_cases import DTYPES, OPTIONS, case_id, large_grid, make_inputs, small_grid
from tests.topk_checks import assert_matches_reference

CPU_BACKENDS = ("torch", "cpp")
SMALL = list(small_grid())
LARGE = list(large_grid())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", SMALL, ids=[case_id(c) for c in SMALL])
def test_small_vocab_grid(backend, case):
    require_backend(backend)
    B, V, k, dtype, opts = case
    logits, kw = make_inputs(B, V, dtype, opts)
    out = safe_topk(logits, k, backend=backend, **kw)
    assert_matches_reference(out, logits, k, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", LARGE, ids=[case_id(c) for c in LARGE])
def test_real_vocab_grid(backend, case):
    require_backend(backend)
    B, V, k, dtype, opts = case
    logits, kw = make_inputs(B, V, dtype, opts)
    out = safe_topk(logits, k, backend=backend, **kw)
    assert_matches_reference(out, logits, k, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_break_by_lower_id(backend, dtype):
    require_backend(backend)
    V = 1000
    logits = torch.zeros(3, V, dtype=dtype)
    logits[0, [7, 3, 900, 500]] = 2.0          # four-way tie at the top
    logits[1] = torch.randint(0, 4, (V,)).to(dtype)   # massive ties
    # row 2: all equal
    out = safe_topk(logits, 5, backend=backend)
    assert out.indices[0].tolist() == [3, 7, 500, 900, 0]
    assert_matches_reference(out, logits, 5, exact_ids=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
def test_all_banned_rows(backend, shared):
    require_backend(backend)
    B, V, k = 3, 100, 5
    logits = torch.randn(B, V)
    allowed = torch.ones(B, V, dtype=torch.bool)
    if shared:
        allowed = torch.zeros(V, dtype=torch.bool)
    else:
        allowed[1] = False
        allowed[2, :] = False
        allowed[2, 42] = True                     # fewer allowed than k
    out = safe_topk(logits, k, banned_bitmask=pack_bitmask(allowed), backend=backend)
    if shared:
        assert out.all_banned.all()
        assert torch.isneginf(out.values).all() and torch.isneginf(out.logsumexp).all()
    else:
        assert out.all_banned.tolist() == [False, True, False]
        assert torch.isneginf(out.values[1]).all()
        assert out.indices[2, 0].item() == 42
        assert torch.isneginf(out.values[2, 1:]).all()
        assert out.logsumexp[2].item() == pytest.approx(logits[2, 42].item(), abs=1e-6)
    assert_matches_reference(out, logits, k, exact_ids=True, banned_bitmask=pack_bitmask(allowed))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_99_percent_banned(backend):
    require_backend(backend)
    B, V, k = 8, 151936, 50
    logits, kw = make_inputs(B, V, torch.float32, ("mask",), ban_fraction=0.99)
    out = safe_topk(logits, k, backend=backend, **kw)
    assert_matches_reference(out, logits, k, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_logits(backend, dtype):
    require_backend(backend)
    base = torch.randn(4, 2 * 1003).to(dtype)
    logits = base[:, ::2]                          # column stride 2
    assert not logits.is_contiguous()
    out = safe_topk(logits, 7, backend=backend)
    assert_matches_reference(out, logits, 7)
    wide = torch.randn(4, 1500).to(dtype)[:, :1003]  # row stride 1500
    out = safe_topk(wide, 7, backend=backend)
    assert_matches_reference(out, wide, 7)
    reward = torch.randn(1003, 4).to(dtype).t()   # transposed reward
    out = safe_topk(wide, 7, dense_reward=reward, reward_weight=0.5, backend=backend)
    assert_matches_reference(out, wide, 7, dense_reward=reward, reward_weight=0.5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_logits(backend):
    """Documented: NaN is never selected, and it makes that row's logsumexp NaN."""
    require_backend(backend)
    logits = torch.randn(3, 64)
    logits[0, 5] = float("nan")
    logits[0, 6] = 100.0
    logits[2, 9] = float("nan")
    allowed = torch.ones(3, 64, dtype=torch.bool)
    allowed[2, 9] = False                         # a banned NaN does not matter
    out = safe_topk(logits, 4, banned_bitmask=pack_bitmask(allowed), backend=backend)
    assert torch.isnan(out.logsumexp[0]) and not torch.isnan(out.logsumexp[1:]).any()
    assert 5 not in out.indices[0].tolist() and out.indices[0, 0].item() == 6
    assert not torch.isnan(out.values).any()
    assert_matches_reference(out, logits, 4, banned_bitmask=pack_bitmask(allowed))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shared_mask_and_1d_bias(backend):
    require_backend(backend)
    logits, _ = make_inputs(5, 777, torch.float32, ())
    allowed = torch.rand(777) > 0.3
    bias = torch.randn(777)
    kw = dict(banned_bitmask=pack_bitmask(allowed), bias_table=bias, bias_scale=2.0)
    out = safe_topk(logits, 9, backend=backend, **kw)
    assert_matches_reference(out, logits, 9, **kw)
    kw = dict(bias_table=torch.randn(6, 777), positions=3)
    out = safe_topk(logits, 9, backend=backend, **kw)
    assert_matches_reference(out, logits, 9, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_logprobs_are_exact(backend):
    require_backend(backend)
    logits, kw = make_inputs(4, 5000, torch.float32, OPTIONS)
    out = safe_topk(logits, 5000, backend=backend, **kw)   # k = V: the whole distribution
    p = out.logprobs().exp()
    finite = torch.isfinite(out.values)
    assert torch.allclose(p.where(finite, torch.zeros_like(p)).sum(1), torch.ones(4), atol=1e-4)

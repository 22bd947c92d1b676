"""safe_topk bad input: each error names the argument and what was expected."""
import pytest
import torch

from fastsafe.ops import backend_for, backends, pack_bitmask, safe_topk

V = 40


def logits(B=2, dtype=torch.float32):
    return torch.randn(B, V, dtype=dtype)


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: safe_topk(torch.randn(V), 3), ValueError, r"logits: expected a 2-D tensor"),
    (lambda: safe_topk(torch.randn(2, 3, V), 3), ValueError, r"logits: expected a 2-D"),
    (lambda: safe_topk(torch.randint(0, 5, (2, V)), 3), TypeError, r"logits: expected dtype float32, float16 or bfloat16"),
    (lambda: safe_topk(torch.randn(2, V, dtype=torch.float64), 3), TypeError, r"logits: expected dtype"),
    (lambda: safe_topk([[1.0]], 1), TypeError, r"logits: expected a torch.Tensor"),
    (lambda: safe_topk(logits(), 0), ValueError, r"k: expected 1 <= k <= V = 40, got 0"),
    (lambda: safe_topk(logits(), V + 1), ValueError, r"k: expected 1 <= k <= V = 40, got 41"),
    (lambda: safe_topk(logits(), 2.5), TypeError, r"k: expected an int"),
    (lambda: safe_topk(logits(), True), TypeError, r"k: expected an int"),
    (lambda: safe_topk(logits(), 3, temperature=0.0), ValueError, r"temperature: expected a number > 0"),
    (lambda: safe_topk(logits(), 3, temperature=-1), ValueError, r"temperature"),
    (lambda: safe_topk(logits(), 3, temperature=float("nan")), ValueError, r"temperature: expected a finite"),
    (lambda: safe_topk(logits(), 3, bias_table=torch.randn(4, V + 1), positions=torch.zeros(2, dtype=torch.long)),
     ValueError, r"bias_table: vocabulary size mismatch.*41.*V = 40"),
    (lambda: safe_topk(logits(), 3, bias_table=torch.randn(2, 3, V)), ValueError, r"bias_table: expected a 1-D or 2-D"),
    (lambda: safe_topk(logits(), 3, bias_table=torch.randn(4, V)), ValueError, r"positions: required when bias_table has L = 4"),
    (lambda: safe_topk(logits(), 3, bias_table=torch.randn(4, V), positions=torch.zeros(2)), TypeError,
     r"positions: expected an integer dtype"),
    (lambda: safe_topk(logits(), 3, bias_table=torch.randn(4, V), positions=torch.zeros(3, dtype=torch.long)),
     ValueError, r"positions: expected shape \[B\] = \[2\]"),
    (lambda: safe_topk(logits(), 3, banned_bitmask=torch.zeros(2, 3, dtype=torch.int32)), ValueError,
     r"banned_bitmask: expected ceil\(V/32\) = 2"),
    (lambda: safe_topk(logits(), 3, banned_bitmask=torch.zeros(2, 2, dtype=torch.int64)), TypeError,
     r"banned_bitmask: expected dtype int32"),
    (lambda: safe_topk(logits(), 3, banned_bitmask=torch.zeros(3, 2, dtype=torch.int32)), ValueError,
     r"banned_bitmask: expected shape \[B, W\] = \[2, 2\]"),
    (lambda: safe_topk(logits(), 3, dense_reward=torch.randn(2, V - 1)), ValueError,
     r"dense_reward: expected shape \[B, V\] = \[2, 40\]"),
    (lambda: safe_topk(logits(), 3, dense_reward=torch.randn(2, V), reward_weight=float("inf")), ValueError,
     r"reward_weight: expected a finite"),
    (lambda: safe_topk(logits(), 3, bias_scale="1"), TypeError, r"bias_scale: expected a real number"),
    (lambda: safe_topk(logits(), 3, backend="nope"), ValueError, r"backend: expected one of"),
    (lambda: safe_topk(logits(), 3, backend="cuda"), ValueError, r"backend: backend 'cuda' does not run on cpu"),
])
def test_bad_input(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_device_mismatch_is_reported():
    meta = torch.empty(2, V, device="meta")
    with pytest.raises(ValueError, match=r"bias_table: expected a tensor on logits's device"):
        safe_topk(logits(), 3, bias_table=meta)


def test_env_override(monkeypatch):
    monkeypatch.setenv("FASTSAFE_BACKEND", "torch")
    assert backend_for(torch.zeros(1, 3)) == "torch"
    monkeypatch.setenv("FASTSAFE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTSAFE_BACKEND"):
        backend_for(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="FASTSAFE_BACKEND"):     # an invalid value raises on every call
        backend_for(torch.zeros(1, 3))


def test_env_override_is_parsed_once_per_distinct_value(monkeypatch):
    from fastsafe.ops import dispatch
    value = "safe_topk:torch, token_logps:torch ,"       # a value no other test sets: its first parse is here
    monkeypatch.setenv("FASTSAFE_BACKEND", value)
    before = dispatch._env_choices.cache_info()
    for _ in range(3):
        assert backend_for(torch.zeros(1, 3)) == "torch"
        assert backend_for(torch.zeros(1, 3), op="token_logps") == "torch"
    after = dispatch._env_choices.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 5)
    monkeypatch.setenv("FASTSAFE_BACKEND", "safe_topk:cpp,safe_topk:torch")   # a new value takes effect at once
    assert backend_for(torch.zeros(1, 3)) == "torch"                          # (the later pair wins)
    monkeypatch.setenv("FASTSAFE_BACKEND", "torch")
    assert backend_for(torch.zeros(1, 3), op="device_matcher") == "torch"     # one name: every op that has it


def test_backends_report_reasons():
    info = backends()
    assert set(info) == {"torch", "cpp", "triton", "cuda"}
    assert info["torch"].available
    for i in info.values():
        assert i.available or i.reason, f"{i.name} unavailable without a reason"
    if not torch.cuda.is_available():
        assert not info["cuda"].available


def test_default_cpu_backend_prefers_cpp():
    expected = "cpp" if backends()["cpp"].available else "torch"
    assert backend_for(torch.zeros(1, 3)) == expected


def test_empty_batch():
    out = safe_topk(torch.empty(0, V), 3)
    assert out.values.shape == (0, 3) and out.indices.shape == (0, 3) and out.logsumexp.shape == (0,)


def test_positions_int_and_clamp():
    x = logits(3)
    table = torch.randn(5, V)
    a = safe_topk(x, 4, bias_table=table, positions=99, backend="torch")
    b = safe_topk(x, 4, bias_table=table[4], backend="torch")
    assert torch.equal(a.indices, b.indices) and torch.allclose(a.values, b.values)
    c = safe_topk(x, 4, bias_table=table, positions=torch.tensor([-3, 0, 0]), backend="torch")
    d = safe_topk(x, 4, bias_table=table[0], backend="torch")
    assert torch.equal(c.indices, d.indices)


def test_dense_reward_dtype_cast_documented():
    """dense_reward is cast to logits.dtype before use (documented in safe_topk)."""
    x = logits(2, torch.float16)
    r = torch.randn(2, V, dtype=torch.float32)
    out = safe_topk(x, 5, dense_reward=r, reward_weight=1.0, backend="torch")
    ref = (x.float() + r.half().float()).topk(5)
    assert torch.allclose(out.values, ref.values)


def test_matches_plain_torch_ops():
    """The full chain written with ordinary torch ops gives the same top-k and logsumexp."""
    x = logits(4)
    table = torch.randn(3, V)
    pos = torch.tensor([0, 1, 2, 7])
    allowed = torch.rand(4, V) > 0.3
    reward = torch.randn(4, V)
    out = safe_topk(x, 6, bias_table=table, positions=pos, bias_scale=0.5, banned_bitmask=pack_bitmask(allowed),
                    dense_reward=reward, reward_weight=0.25, temperature=0.8)
    s = x / 0.8 - 0.5 * table[pos.clamp(max=2)] + 0.25 * reward
    s = s.masked_fill(~allowed, float("-inf"))
    ref = s.topk(6)
    assert torch.allclose(out.values, ref.values, atol=1e-6)
    assert torch.allclose(out.logsumexp, s.logsumexp(1), atol=1e-6)
    assert torch.allclose(out.logprobs(), s.log_softmax(1).gather(1, out.indices), atol=1e-6)

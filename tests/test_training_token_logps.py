"""token_logps (torch chunked path) against the fp32 / fp64 full-logits autograd ground truth.

Tolerances: float32 values 2e-5 abs, float32 gradients 1e-4 relative to the largest gradient entry;
bf16/fp16 judged like Cut Cross-Entropy: the error against the float64 truth must be no worse
than that of the same-dtype full-logits torch reference, plus 5% and a small absolute slack.
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fastsafe.training import token_logps, token_logps_backend
from fastsafe.training.reference import token_logps_reference
from fastsafe.training.token_logps import ChunkedTokenLogps, default_chunk_size

SHAPES = [  # (N, T, H, V)
    (3, 47, 31, 123),
    (2, 5, 16, 7),
    (1, 1, 1, 1),
    (4, 9, 24, 301),
]


def make_inputs(N, T, H, V, dtype=torch.float32, seed=0, bias=True, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, T, H, generator=g) * 0.7).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / max(H, 1) ** 0.25).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.3).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, (N, T), generator=g)
    targets[torch.rand(N, T, generator=g) < ignore_frac] = -100
    ref_hidden = (torch.randn(N, T, H, generator=g) * 0.7).to(dtype)
    ref_weight = (torch.randn(V, H, generator=g) / max(H, 1) ** 0.25).to(dtype)
    upstream = torch.randn(3, N, T, generator=g) * torch.rand(3, N, T, generator=g) * 3  # signed, non-uniform
    return hidden, weight, b, targets, ref_hidden, ref_weight, upstream


def run(fn, hidden, weight, b, targets, upstream, **kw):
    out = fn(hidden, weight, targets, b, **kw)
    out = out if isinstance(out, tuple) else (out,)
    loss = sum((o * upstream[i]).sum() for i, o in enumerate(out))
    params = [p for p in (hidden, weight, b) if p is not None]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [o.detach() for o in out], [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def variants(ref_hidden, ref_weight):
    return [
        dict(),
        dict(temperature=0.7),
        dict(return_entropy=True),
        dict(ref_hidden=ref_hidden, ref_weight=ref_weight, return_kl=True),
        dict(ref_hidden=ref_hidden, ref_weight=ref_weight, return_kl=True, return_entropy=True, temperature=1.3),
    ]


def max_rel(a, b):
    scale = max(b.abs().max().item(), 1e-6)
    return (a.double() - b.double()).abs().max().item() / scale


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_fp32_matches_full_logits(shape, chunk_size):
    hidden, weight, b, targets, rh, rw, up = make_inputs(*shape)
    for kw in variants(rh, rw):
        out, grads = run(token_logps, hidden, weight, b, targets, up, chunk_size=chunk_size, **kw)
        ref_out, ref_grads = run(token_logps_reference, hidden, weight, b, targets, up, **kw)
        for o, r in zip(out, ref_out):
            assert o.dtype == torch.float32 and o.shape == targets.shape
            torch.testing.assert_close(o, r, atol=2e-5, rtol=1e-5)
        for g, r in zip(grads, ref_grads):
            assert max_rel(g, r) < 1e-4, kw


def test_backward_over_several_vocabulary_chunks():
    """V > 4096: the backward sums the weight gradient chunk by chunk (last chunk partial)."""
    hidden, weight, b, targets, rh, rw, up = make_inputs(2, 5, 6, 4096 + 37, seed=4)
    targets[0, :3] = torch.tensor([0, 4095, 4096 + 36])   # targets on both sides of the chunk edge
    kw = dict(ref_hidden=rh, ref_weight=rw, return_kl=True, return_entropy=True)
    out, grads = run(token_logps, hidden, weight, b, targets, up, chunk_size=3, **kw)
    ref_out, ref_grads = run(token_logps_reference, hidden, weight, b, targets, up, **kw)
    for o, r in zip(out, ref_out):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert max_rel(g, r) < 1e-4


def test_outputs_zero_and_no_grad_at_ignored_positions():
    hidden, weight, b, targets, rh, rw, up = make_inputs(3, 47, 31, 123)
    lp, kl, ent = token_logps(hidden, weight, targets, b, ref_hidden=rh, ref_weight=rw, return_kl=True,
                              return_entropy=True)
    ign = targets == -100
    assert ign.any()
    for o in (lp, kl, ent):
        assert (o[ign] == 0).all()
    (lp.sum() + kl.sum() + ent.sum()).backward()
    assert (hidden.grad[ign] == 0).all()
    assert (hidden.grad[~ign].abs().sum(-1) > 0).all()


def test_fully_masked_sequences_and_batch():
    hidden, weight, b, targets, rh, rw, up = make_inputs(3, 6, 8, 11, ignore_frac=0.0)
    targets[1] = -100
    active = torch.ones(3, 6)
    active[2] = 0
    lp, kl = token_logps(hidden, weight, targets, b, active=active, ref_hidden=rh, ref_weight=rw, return_kl=True)
    assert torch.isfinite(lp).all() and (lp[1:] == 0).all() and (kl[1:] == 0).all()
    (lp * up[0]).sum().backward()
    assert (hidden.grad[1:] == 0).all() and torch.isfinite(weight.grad).all()
    # Whole batch masked: defined zeros, backward works and gives zero gradients.
    hidden.grad = weight.grad = b.grad = None
    lp = token_logps(hidden, weight, torch.full_like(targets, -100), b)
    assert (lp == 0).all()
    lp.sum().backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all() and (b.grad == 0).all()


def test_active_mask_equals_ignore_index_and_is_packed():
    hidden, weight, b, targets, rh, rw, up = make_inputs(4, 9, 24, 301, ignore_frac=0.0)
    weights = torch.randn(4, 9) * (torch.rand(4, 9) > 0.5)   # a per-token weight tensor used as `active`
    out_a, g_a = run(token_logps, hidden, weight, b, targets, up, active=weights)
    t2 = targets.masked_fill(weights == 0, -100)
    out_b, g_b = run(token_logps_reference, hidden, weight, b, t2, up)
    torch.testing.assert_close(out_a[0], out_b[0], atol=2e-5, rtol=1e-5)
    for x, y in zip(g_a, g_b):
        assert max_rel(x, y) < 1e-4


def test_packing_skips_inactive_rows():
    """Cost scales with active tokens: only the active rows reach the chunked Function (as
    row indices into the hidden states: no packed copy)."""
    hidden, weight, b, targets, *_ = make_inputs(2, 50, 8, 13, ignore_frac=0.0)
    active = torch.zeros(2, 50, dtype=torch.bool)
    active[0, :3] = True
    seen = {}
    orig = ChunkedTokenLogps.forward

    def spy(ctx, h, weight, bias, targets, *args):
        seen["rows"] = targets.shape[0]
        seen["index"] = args[-1].tolist()
        return orig(ctx, h, weight, bias, targets, *args)

    ChunkedTokenLogps.forward = staticmethod(spy)
    try:
        token_logps(hidden, weight, targets, b, active=active)
    finally:
        ChunkedTokenLogps.forward = staticmethod(orig)
    assert seen["rows"] == 3 and seen["index"] == [0, 1, 2]


def test_two_dim_hidden_and_non_contiguous():
    hidden, weight, b, targets, rh, rw, up = make_inputs(2, 7, 12, 30)
    h2 = hidden.detach().reshape(14, 12).t().contiguous().t().requires_grad_()  # column-major storage
    out, grads = run(token_logps, h2, weight, b, targets.reshape(14), up.reshape(3, 14), chunk_size=4)
    ref, ref_grads = run(token_logps_reference, h2, weight, b, targets.reshape(14), up.reshape(3, 14))
    torch.testing.assert_close(out[0], ref[0], atol=2e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert max_rel(g, r) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_same_dtype_reference(dtype):
    hidden, weight, b, targets, rh, rw, up = make_inputs(3, 47, 31, 123, dtype=dtype)
    for kw in variants(rh, rw)[::2]:
        out, grads = run(token_logps, hidden, weight, b, targets, up, chunk_size=16, **kw)
        ref, ref_grads = run(token_logps_reference, hidden, weight, b, targets, up, **kw)
        kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
        h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hidden, weight, b))
        truth, truth_grads = run(token_logps_reference, h64, w64, b64, targets, up, **kw64)
        for o, r, t in zip(out, ref, truth):
            assert o.dtype == torch.float32
            err, err_ref = (o.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
            assert err <= 1.05 * err_ref + 1e-3, (kw, err, err_ref)
        for g, r, t in zip(grads, ref_grads, truth_grads):
            assert g.dtype == dtype
            err, err_ref = (g.double() - t).abs().max().item(), (r.double() - t).abs().max().item()
            assert err <= 1.05 * err_ref + 2e-3 * t.abs().max().item(), (kw, err, err_ref)


def test_gradcheck_float64_reference_and_chunked():
    hidden, weight, b, targets, rh, rw, _ = make_inputs(2, 3, 5, 7, dtype=torch.float64)
    targets[0, 1] = -100
    for fn in (token_logps_reference, lambda *a, **k: token_logps(*a, chunk_size=2, **k)):
        def f(h, w, bb):
            lp, kl, ent = fn(h, w, targets, bb, ref_hidden=rh, ref_weight=rw, return_kl=True,
                             return_entropy=True, temperature=0.9)
            return lp, kl, ent
        assert torch.autograd.gradcheck(f, (hidden, weight, b), eps=1e-6, atol=1e-6)
    lp = token_logps(hidden, weight, targets, b)
    assert lp.dtype == torch.float64


def test_weight_gradient_is_accumulated_in_fp32():
    """bf16 weight gradient summed over many chunks stays as accurate as one fp32 sum rounded once."""
    hidden, weight, b, targets, *_ = make_inputs(8, 64, 16, 40, dtype=torch.bfloat16, ignore_frac=0.0)
    lp = token_logps(hidden, weight, targets, chunk_size=1)   # 512 chunks
    lp.sum().backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    token_logps_reference(h64, w64, targets).sum().backward()
    rounded_truth = w64.grad.to(torch.bfloat16).double()
    err = (weight.grad.double() - w64.grad).abs().max().item()
    assert err <= 4 * (rounded_truth - w64.grad).abs().max().item() + 1e-3


def test_chunked_path_never_allocates_full_logits():
    M, H, V, C = 2048, 16, 1000, 32
    g = torch.Generator().manual_seed(0)
    h = torch.randn(M, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    t = torch.randint(0, V, (M,), generator=g)

    def biggest(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn().sum().backward()
        return max(e.cpu_memory_usage for e in prof.events())

    full = M * V * 4
    assert biggest(lambda: token_logps_reference(h, w, t)) >= full          # the probe sees [M, V]
    assert biggest(lambda: token_logps(h, w, t, chunk_size=C)) <= 4 * C * V * 4 + 2 * V * H * 4 < full / 5


def test_default_chunk_size_bounds(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert default_chunk_size(10, 50) == 10
    assert default_chunk_size(100000, 151936) == 1                # 1 MiB fp32 tiles on the CPU, one thread
    assert default_chunk_size(100000, 4096) == 64
    assert default_chunk_size(100000, 151936, "cuda") == 110      # 64 MiB on a GPU
    assert default_chunk_size(100000, 10) == 4096
    assert default_chunk_size(100000, 10**9) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert default_chunk_size(100000, 4096) == 1024               # 16 MiB with several threads


def test_cpu_dispatch_defaults_to_torch_even_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert token_logps_backend(torch.zeros(2, 3)) == "torch"
    assert token_logps_backend(torch.zeros(2, 3), "torch") == "torch"
    with pytest.raises(ValueError, match="backend"):
        token_logps_backend(torch.zeros(2, 3), "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        token_logps_backend(torch.zeros(2, 3), "triton")


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def _base():
    return torch.randn(2, 3, 4), torch.randn(10, 4), torch.randint(0, 10, (2, 3))


@pytest.mark.parametrize("case, exc, match", [
    (lambda h, w, t: token_logps(h, w, t[:, :2]), ValueError, "targets: expected shape"),
    (lambda h, w, t: token_logps(h, w[:, :3], t), ValueError, "weight: expected shape"),
    (lambda h, w, t: token_logps(h, w, t.float()), TypeError, "targets: expected an integer"),
    (lambda h, w, t: token_logps(h, w, t + 10), ValueError, r"targets: expected ids in \[0, V\)"),
    (lambda h, w, t: token_logps(h, w, t - 20), ValueError, "out of range"),
    (lambda h, w, t: token_logps(h.bfloat16(), w, t), TypeError, "one dtype"),
    (lambda h, w, t: token_logps(h, w, t, torch.zeros(9)), ValueError, "bias: expected shape"),
    (lambda h, w, t: token_logps(h, w, t, temperature=0), ValueError, "temperature"),
    (lambda h, w, t: token_logps(h, w, t, temperature=float("nan")), ValueError, "temperature"),
    (lambda h, w, t: token_logps(h, w, t, return_kl=True), ValueError, "ref_hidden: required"),
    (lambda h, w, t: token_logps(h, w, t, ref_hidden=h), ValueError, "return_kl=True"),
    (lambda h, w, t: token_logps(h, w, t, ref_hidden=h[:1], return_kl=True), ValueError, "ref_hidden: expected"),
    (lambda h, w, t: token_logps(h, w, t, ref_hidden=h, ref_weight=w[:5], return_kl=True), ValueError, "ref_weight"),
    (lambda h, w, t: token_logps(h, w, t, active=torch.ones(2, 4)), ValueError, "active: expected"),
    (lambda h, w, t: token_logps(h, w, t, chunk_size=0), ValueError, "chunk_size"),
    (lambda h, w, t: token_logps(h, w, t, backend="cpp"), ValueError, "backend"),
    (lambda h, w, t: token_logps(h.int(), w, t), TypeError, "hidden: expected dtype"),
    (lambda h, w, t: token_logps(h[0, 0], w, t), ValueError, "hidden: expected a 2-D or 3-D"),
])
def test_bad_input(case, exc, match):
    h, w, t = _base()
    with pytest.raises(exc, match=match):
        case(h, w, t)


def test_dtype_mix_under_autocast_is_cast():
    h, w, t = _base()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = token_logps(h.bfloat16(), w, t)
    ref = token_logps_reference(h.bfloat16(), w.bfloat16(), t)
    torch.testing.assert_close(lp, ref)


def test_targets_out_of_vocab_at_ignored_or_inactive_positions():
    h, w, t = _base()
    t[0, 0] = -100                         # ignore_index: fine
    token_logps(h, w, t)
    t2 = t.clone()
    t2[0, 1] = 99                          # out of vocabulary, even if inactive: an error
    with pytest.raises(ValueError, match="out of range"):
        token_logps(h, w, t2, active=torch.tensor([[1, 0, 1], [1, 1, 1]]))
    t3 = t.clamp(min=0)
    t3[1, 2] = -7
    lp = token_logps(h, w, t3, ignore_index=-7)  # custom ignore_index
    assert torch.isfinite(lp).all() and lp[1, 2] == 0 and (lp[0] != 0).all()


# ------------------------------------------------------------------------------------------------
# one dispatcher: token_logps and safe_topk share the registry and the override rule
# ------------------------------------------------------------------------------------------------

def test_env_override_is_shared_with_the_decoding_ops(monkeypatch):
    from fastsafe.ops import backend_for, backends
    cpu = torch.zeros(2, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("FASTSAFE_BACKEND", "torch")
    assert token_logps_backend(cpu) == "torch" and backend_for(cpu) == "torch"
    # One name applies to the ops that implement it; token_logps has no cpp backend: its default.
    monkeypatch.setenv("FASTSAFE_BACKEND", "cpp")
    assert token_logps_backend(cpu) == "torch"
    if backends()["cpp"].available:
        assert backend_for(cpu) == "cpp"
    # Per-op choices are strict; token_logps itself follows them.
    monkeypatch.setenv("FASTSAFE_BACKEND", "safe_topk:torch,token_logps:triton")
    assert backend_for(cpu) == "torch"
    with pytest.raises(RuntimeError, match="FASTSAFE_BACKEND: backend 'triton' is unavailable for token_logps"):
        token_logps(*_base())
    monkeypatch.setenv("FASTSAFE_BACKEND", "token_logps:cpp")
    with pytest.raises(ValueError, match="FASTSAFE_BACKEND: token_logps has no 'cpp' backend"):
        token_logps_backend(cpu)
    monkeypatch.setenv("FASTSAFE_BACKEND", "token_logps=torch")
    with pytest.raises(ValueError, match="FASTSAFE_BACKEND: expected"):
        token_logps_backend(cpu)
    # An explicit backend= wins over the environment.
    monkeypatch.setenv("FASTSAFE_BACKEND", "token_logps:triton")
    assert token_logps_backend(cpu, "torch") == "torch"


def test_per_op_backend_listing(monkeypatch):
    from fastsafe.ops import backends
    from fastsafe.ops.dispatch import describe
    monkeypatch.delenv("FASTSAFE_BACKEND", raising=False)
    assert set(backends(op="token_logps")) == {"torch", "triton"}
    assert set(backends(op="safe_topk")) == {"torch", "cpp", "triton", "cuda"}
    with pytest.raises(ValueError, match="op: expected one of"):
        backends(op="nope")
    text = describe()
    header, *rows = text.splitlines()
    assert header.split()[2:] == ["safe_topk", "token_logps", "device_matcher"]
    cpp_row = next(r for r in rows if r.startswith("cpp "))
    assert cpp_row.split()[3] == "-"                       # token_logps has no cpp backend
    assert "token_logps=torch" in text


def test_one_accumulation_dtype_helper():
    import importlib
    from fastsafe.training import _checks, reference
    tl_module = importlib.import_module("fastsafe.training.token_logps")
    assert reference.acc_dtype is _checks.acc_dtype and tl_module.acc_dtype is _checks.acc_dtype
    assert _checks.acc_dtype(torch.bfloat16) == torch.float32
    assert _checks.acc_dtype(None, torch.zeros(1, dtype=torch.float64)) == torch.float64

"""The ops as torch custom ops: opcheck of each op, and fullgraph torch.compile of steps that call them.

``torch.library.opcheck`` checks each op's schema, fake (meta) implementation, autograd
registration and AOT dispatch on small CPU inputs. The compile tests trace a decoding step
(safe_topk + choose) and a training step (token_logps forward + backward) with
``fullgraph=True`` on the default Inductor backend, assert that dynamo saw no graph break, and
compare with eager. They are the slow tests of this file (Inductor builds C++ kernels), so there
are two, on tiny shapes.
"""
import pytest
import torch
from torch._dynamo.utils import counters

import fastsafe.ops
import fastsafe.ops.custom_ops  # noqa: F401  (registers the ops)
from fastsafe.ops import choose, pack_bitmask, safe_topk
from fastsafe.ops.choose_impl import candidate_scores
from fastsafe.ops.custom_ops import safe_topk_op_args
from fastsafe.ops.validate import validate_safe_topk
from fastsafe.training.token_logps_op import check_targets, token_logps_op
from tests.conftest import require_backend

ops = torch.ops.fastsafe


def _topk_inputs(B=3, V=70, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(B, V, generator=g) > 0.3
    return validate_safe_topk(torch.randn(B, V, generator=g), k, bias_table=torch.randn(4, V, generator=g),
                              positions=torch.tensor([0, 3, 9])[:B], bias_scale=0.5,
                              banned_bitmask=pack_bitmask(allowed), dense_reward=torch.randn(B, V, generator=g),
                              reward_weight=0.25, temperature=0.8)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_opcheck_safe_topk(backend):
    if backend != "torch":
        require_backend(backend)
    op = getattr(ops, f"safe_topk_{backend}").default
    torch.library.opcheck(op, safe_topk_op_args(_topk_inputs()))
    plain = validate_safe_topk(torch.randn(2, 40), 3)              # no optional input
    torch.library.opcheck(op, safe_topk_op_args(plain))


def test_opcheck_safe_topk_triton():
    require_backend("triton")
    if not torch.cuda.is_available():
        pytest.skip("fastsafe::safe_topk_triton is a triton_op: its fake tensor tracing goes through "
                    "wrap_triton, which needs compiled (GPU) kernels; TRITON_INTERPRET=1 kernels run "
                    "eagerly only (the eager op is tested by tests/test_safe_topk_triton.py)")
    from fastsafe.kernels.safe_topk import _OP
    inp = _topk_inputs()
    inp.logits = inp.logits.cuda()
    for name in ("bias_table", "positions", "banned_bitmask", "dense_reward"):
        setattr(inp, name, getattr(inp, name).cuda())
    torch.library.opcheck(_OP, safe_topk_op_args(inp) + (None, None, None))


def test_opcheck_choose():
    out = safe_topk(torch.randn(4, 50), 6)
    g = torch.Generator().manual_seed(0)
    reward = torch.randn(4, 6, generator=g)
    allowed = torch.rand(4, 6, generator=g) > 0.3
    allowed[2] = False
    noise = torch.empty(4, 6).exponential_(generator=g)
    base = (out.values, out.indices, out.logsumexp)
    torch.library.opcheck(ops.choose.default, base + (None, None, 0.0, None, 1.0, 0.0, None))
    torch.library.opcheck(ops.choose.default, base + (reward, allowed, 0.5, noise, 0.9, 0.05, 3))


def test_opcheck_token_logps():
    g = torch.Generator().manual_seed(0)
    M, H, V = 7, 6, 19
    h = torch.randn(M, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True)
    t = torch.randint(0, V, (M,), generator=g)
    rh, rw = torch.randn(M, H, generator=g), torch.randn(V, H, generator=g)
    torch.library.opcheck(ops.token_logps_torch.default, (h, w, b, t, rh, rw, None, 0.9, 3, True))
    torch.library.opcheck(ops.token_logps_torch.default, (h, w, None, t, None, None, None, 1.0, 4, False))
    rows = torch.tensor([5, 0, 2, 6])       # the tokens as rows of h (no packed copy)
    torch.library.opcheck(ops.token_logps_torch.default, (h, w, b, t[rows], rh, rw, None, 0.9, 3, True, rows))
    lp, kl, ent, lse, ref_lse, mean_z = ops.token_logps_torch.default(h, w, b, t, rh, rw, None, 0.9, 3, True)
    gs = tuple(torch.randn(M, generator=g) for _ in range(3))
    torch.library.opcheck(ops.token_logps_torch_backward.default,
                          gs + (h.detach(), w.detach(), b.detach(), t, rh, rw, None, lse.detach(), ref_lse.detach(),
                                mean_z.detach(), 0.9, 3, True, True, True, True, True))
    tt = torch.tensor([1, -100, 5, 0])
    torch.library.opcheck(ops.token_targets_valid.default, (tt, -100, 6))


def test_token_logps_triton_op_eager_matches_torch_op():
    require_backend("triton")
    if not torch.cuda.is_available():
        try:
            import fastsafe.kernels.token_logps  # noqa: F401
        except Exception as exc:  # pragma: no cover
            pytest.skip(f"triton token_logps kernels not importable: {exc}")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    M, H, V = 5, 16, 24
    h = torch.randn(M, H, generator=g).to(dev).requires_grad_()
    w = torch.randn(V, H, generator=g).to(dev).requires_grad_()
    t = torch.randint(0, V, (M,), generator=g).to(dev)
    res = {}
    for backend in ("torch", "triton"):
        lp, _, ent = token_logps_op(backend, h, w, None, t, None, None, None, 1.0, 4, True)
        gh, gw = torch.autograd.grad((lp * 0.7 - ent * 0.2).sum(), (h, w))
        res[backend] = (lp, ent, gh, gw)
    for a, b in zip(res["torch"], res["triton"]):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


def test_choose_sampling_draws_like_multinomial():
    """The op takes pre-drawn Exp(1) noise: same ids as torch.multinomial on the same generator state."""
    g = torch.Generator().manual_seed(7)
    out = safe_topk(torch.randn(64, 300, generator=g) * 2, 12)
    reward = torch.randn(64, 12, generator=g)
    for seed in range(4):
        ids = choose(out, reward, 0.5, do_sample=True, generator=torch.Generator().manual_seed(seed))
        probs = candidate_scores(out, reward, 0.5).softmax(-1)
        pick = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(ids, out.indices.gather(1, pick).squeeze(1))


def test_check_targets_message():
    with pytest.raises(ValueError, match=r"targets: expected ids in \[0, V\) = \[0, 6\) .* got 2 out of range "
                                         r"\(min -3, max 9\)"):
        check_targets(torch.tensor([1, 9, -100, -3]), -100, 6)


def _no_graph_break():
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_decoding_step_compiles_fullgraph():
    """safe_topk (default backend and the torch op) + choose (greedy, and sampling from the global RNG)."""
    import torch._inductor.config as inductor_config

    def step(logits, table, positions, mask, reward, cand_reward):
        out = safe_topk(logits, 8, bias_table=table, positions=positions, banned_bitmask=mask,
                        dense_reward=reward, reward_weight=0.5, temperature=0.7)
        ref = safe_topk(logits, 8, banned_bitmask=mask, backend="torch")
        greedy = choose(out, candidate_reward=cand_reward, reward_weight=0.3)
        sampled = choose(ref, do_sample=True, top_p=0.9, fallback_id=0)
        return out.values, out.indices, out.logsumexp, out.all_banned, greedy, sampled

    B, V = 4, 96
    g = torch.Generator().manual_seed(0)
    allowed = torch.rand(B, V, generator=g) > 0.3
    args = [torch.randn(B, V, generator=g), torch.randn(5, V, generator=g), torch.tensor([0, 2, 9, 1]),
            pack_bitmask(allowed), torch.randn(B, V, generator=g), torch.randn(B, 8, generator=g)]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True)
    with inductor_config.patch(fallback_random=True):        # Inductor draws as eager does
        torch.manual_seed(11)
        got = compiled(*args)
        torch.manual_seed(11)
        want = step(*args)
    _no_graph_break()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # value checks run inside the ops, so the compiled step refuses what eager refuses
    args[3] = pack_bitmask(allowed & torch.tensor([True, False, True, True])[:, None])
    with pytest.raises(ValueError, match=r"rows \[1\] is banned or disallowed"):
        compiled(*args)


def test_training_step_compiles_fullgraph():
    """token_logps forward + backward (ignored and inactive positions, KL and entropy) under fullgraph."""
    from fastsafe.training import token_logps

    def step(hidden, weight, bias, targets, active, ref_hidden, coef):
        lp, kl, ent = token_logps(hidden, weight, targets, bias, temperature=0.9, active=active,
                                  ref_hidden=ref_hidden, return_kl=True, return_entropy=True, chunk_size=5)
        return lp, kl, ent, (lp * coef).sum() + 0.1 * kl.sum() - 0.01 * ent.sum()

    g = torch.Generator().manual_seed(1)
    N, T, H, V = 2, 6, 8, 33
    params = [torch.randn(N, T, H, generator=g), torch.randn(V, H, generator=g), torch.randn(V, generator=g)]
    targets = torch.randint(0, V, (N, T), generator=g)
    targets[1, 4:] = -100
    active = torch.rand(N, T, generator=g) > 0.3
    rest = [targets, active, params[0] + 0.1, torch.randn(N, T, generator=g)]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (compiled, step):
        leaves = [p.clone().requires_grad_() for p in params]
        outs = fn(*leaves, *rest)
        outs[-1].backward()                                   # the compiled graph's backward (AOTAutograd)
        results.append(list(outs) + [p.grad for p in leaves])
    _no_graph_break()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    live = active & (targets != -100)
    assert (results[0][0][~live] == 0).all() and (results[0][4][~live] == 0).all()
    args = params + rest
    args[3] = targets.masked_fill(torch.eye(N, T, dtype=torch.bool), V)
    with pytest.raises(ValueError, match=r"targets: expected ids in \[0, V\) = \[0, 33\)"):
        compiled(*args)


def test_compiled_graph_calls_the_chosen_backend_op(monkeypatch):
    """The backend is a trace-time constant: the graph holds the op of backend_for's choice (FASTSAFE_BACKEND too)."""
    seen = []

    def record(gm, example_inputs):
        seen.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    def step(x):
        return safe_topk(x, 3).indices

    x = torch.randn(2, 50)
    expected = "fastsafe.safe_topk_cpp.default" if fastsafe.ops.backends()["cpp"].available else \
        "fastsafe.safe_topk_torch.default"
    for env, op in ((None, expected), ("torch", "fastsafe.safe_topk_torch.default")):
        if env is None:
            monkeypatch.delenv("FASTSAFE_BACKEND", raising=False)
        else:
            monkeypatch.setenv("FASTSAFE_BACKEND", env)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(step, fullgraph=True, backend=record)(x), step(x))
        assert op in seen[-1], seen[-1]
    torch._dynamo.reset()

"""Masked DPO / PPO / RS, TDPO and the fused nn.Module losses.

References are written out independently here (standard DPO, PPO clip, TDPO from the paper's
formulas on full float64 logits). Tolerances: float64 exact to 1e-10, float32 to 1e-5 relative.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastsafe.training import (FusedLinearMaskedDPOLoss, FusedLinearMaskedPPOLoss, kl_estimate, masked_dpo_loss,
                               masked_ppo_loss, masked_rs_loss, tdpo_loss, token_logps)
from fastsafe.training.reference import token_logps_reference

DPO_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def pair_batch(N=4, Tc=7, Tr=5, dtype=torch.float64, seed=0):
    g = gen(seed)
    lp_c = (-torch.rand(N, Tc, generator=g, dtype=dtype) * 3).requires_grad_()
    lp_r = (-torch.rand(N, Tr, generator=g, dtype=dtype) * 3).requires_grad_()
    ref_c = -torch.rand(N, Tc, generator=g, dtype=dtype) * 3
    ref_r = -torch.rand(N, Tr, generator=g, dtype=dtype) * 3
    mask_c = (torch.rand(N, Tc, generator=g) > 0.3).to(dtype)
    mask_r = (torch.rand(N, Tr, generator=g) > 0.3).to(dtype)
    return lp_c, lp_r, ref_c, ref_r, mask_c, mask_r


# ------------------------------------------------------------------------------------------------
# masked DPO
# ------------------------------------------------------------------------------------------------

def standard_dpo(lp_c, lp_r, ref_c, ref_r, mask_c, mask_r, beta):
    pc = (lp_c * mask_c).sum(-1)
    pr = (lp_r * mask_r).sum(-1)
    rc = (ref_c * mask_c).sum(-1)
    rr = (ref_r * mask_r).sum(-1)
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


def test_masked_dpo_with_loss_mask_is_standard_dpo():
    lp_c, lp_r, ref_c, ref_r, mc, mr = pair_batch()
    loss, metrics = masked_dpo_loss(lp_c, lp_r, ref_c, ref_r, mc, mr, beta=0.2)
    ref = standard_dpo(lp_c, lp_r, ref_c, ref_r, mc, mr, 0.2)
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    g = torch.autograd.grad(loss, (lp_c, lp_r))
    rg = torch.autograd.grad(ref, (lp_c, lp_r))
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert set(metrics) == DPO_KEYS
    for v in metrics.values():
        assert v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad
    rc = 0.2 * ((lp_c - ref_c) * mc).sum(-1)
    rr = 0.2 * ((lp_r - ref_r) * mr).sum(-1)
    assert metrics["rewards/chosen"].item() == pytest.approx(rc.mean().item(), rel=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx((rc - rr).mean().item(), rel=1e-6, abs=1e-7)
    assert metrics["rewards/accuracies"].item() == pytest.approx((rc > rr).double().mean().item())


def test_masked_dpo_bool_weights_and_label_smoothing():
    lp_c, lp_r, ref_c, ref_r, mc, mr = pair_batch()
    a, _ = masked_dpo_loss(lp_c, lp_r, ref_c, ref_r, mc.bool(), mr.bool(), beta=0.1)
    b, _ = masked_dpo_loss(lp_c, lp_r, ref_c, ref_r, mc, mr, beta=0.1)
    torch.testing.assert_close(a, b)
    eps = 0.1
    c, _ = masked_dpo_loss(lp_c, lp_r, ref_c, ref_r, mc, mr, beta=0.1, label_smoothing=eps)
    x = 0.1 * (((lp_c - ref_c) * mc).sum(-1) - ((lp_r - ref_r) * mr).sum(-1))
    ref = (-(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)).mean()
    torch.testing.assert_close(c, ref)


def test_masked_dpo_negative_weight_pushes_the_other_way():
    lp_c, lp_r, ref_c, ref_r, _, _ = pair_batch(N=1, Tc=3, Tr=3)
    wc = torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64)
    wr = torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64)
    loss, _ = masked_dpo_loss(lp_c, lp_r, ref_c, ref_r, wc, wr, beta=0.1)
    gc, gr = torch.autograd.grad(loss, (lp_c, lp_r))
    # gradient descent moves logp by -grad: chosen +1 up, chosen -1 down, rejected +1 down, rejected -1 up
    assert gc[0, 0] < 0 < gc[0, 1] and gc[0, 2] == 0
    assert gr[0, 0] > 0 > gr[0, 1] and gr[0, 2] == 0


def test_masked_dpo_fully_masked_pair_is_log2_zero_grad_no_nan():
    lp_c, lp_r, ref_c, ref_r, mc, mr = pair_batch(N=3)
    mc[1] = 0
    mr[1] = 0
    with torch.no_grad():  # padding may hold -inf / NaN log-probs
        lp_c[1] = -float("inf")
        lp_r[1, 0] = float("nan")
    loss, m = masked_dpo_loss(lp_c, lp_r, ref_c, ref_r, mc, mr)
    gc, gr = torch.autograd.grad(loss, (lp_c, lp_r))
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in m.values())
    assert (gc[1] == 0).all() and (gr[1] == 0).all() and torch.isfinite(gc).all() and torch.isfinite(gr).all()
    all_masked, _ = masked_dpo_loss(lp_c, lp_r, ref_c, ref_r, mc * 0, mr * 0)
    assert all_masked.item() == pytest.approx(math.log(2))


def test_gradcheck_losses_float64():
    lp_c, lp_r, ref_c, ref_r, mc, mr = pair_batch(N=2, Tc=3, Tr=4)
    wc = mc * torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: masked_dpo_loss(a, b, ref_c, ref_r, wc, mr, beta=0.5)[0],
                                    (lp_c, lp_r))
    kc = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    kr = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: tdpo_loss(a, b, ref_c, ref_r, c, d, wc, mr, beta=0.5, variant="tdpo1")[0],
        (lp_c, lp_r, kc, kr))
    # TDPO2 stops the gradient through the chosen KL on purpose: check the other inputs only
    assert torch.autograd.gradcheck(
        lambda a, b, d: tdpo_loss(a, b, ref_c, ref_r, kc, d, wc, mr, beta=0.5, alpha=0.3, variant="tdpo2")[0],
        (lp_c, lp_r, kr))
    old = lp_c.detach() + 0.05 * torch.randn(2, 3, dtype=torch.float64, generator=gen(1))
    adv = torch.randn(2, 3, dtype=torch.float64, generator=gen(2))
    assert torch.autograd.gradcheck(
        lambda a: masked_ppo_loss(a, old, adv, wc, ref_logps=ref_c, kl_coef=0.1)[0], (lp_c,))
    assert torch.autograd.gradcheck(lambda a: masked_rs_loss(a, mc, ref_c, beta=0.3)[0], (lp_c,))


@pytest.mark.parametrize("call, exc, match", [
    (lambda b: masked_dpo_loss(b[0], b[1], b[2][:, :3], b[3], b[4], b[5]), ValueError, "ref_chosen_logps"),
    (lambda b: masked_dpo_loss(b[0], b[1], b[2], b[3], b[4][:, :2], b[5]), ValueError, "chosen_weights"),
    (lambda b: masked_dpo_loss(b[0], b[1][:2], b[2], b[3][:2], b[4], b[5][:2]), ValueError, "policy_rejected"),
    (lambda b: masked_dpo_loss(b[0], b[1], b[2], b[3], b[4] * float("nan"), b[5]), ValueError,
     "chosen_weights: expected finite"),
    (lambda b: masked_dpo_loss(b[0], b[1], b[2], b[3], b[4], b[5].masked_fill(b[5] > 0, float("inf"))), ValueError,
     "rejected_weights: expected finite"),
    (lambda b: masked_dpo_loss(b[0], b[1], b[2], b[3], b[4], b[5], beta=0), ValueError, "beta"),
    (lambda b: masked_dpo_loss(b[0], b[1], b[2], b[3], b[4], b[5], label_smoothing=0.5), ValueError,
     "label_smoothing"),
    (lambda b: masked_dpo_loss(b[0][0], b[1], b[2], b[3], b[4], b[5]), ValueError, "policy_chosen_logps"),
    (lambda b: masked_dpo_loss(b[0].long(), b[1], b[2], b[3], b[4], b[5]), TypeError, "policy_chosen_logps"),
    (lambda b: tdpo_loss(*b[:4], b[2], b[3], b[4], b[5], variant="tdpo3"), ValueError, "variant"),
    (lambda b: tdpo_loss(*b[:4], b[2][:, :2], b[3], b[4], b[5]), ValueError, "chosen_kl"),
    (lambda b: tdpo_loss(*b[:4], b[2], b[3], b[4], b[5], alpha=-1), ValueError, "alpha"),
])
def test_loss_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(pair_batch())


# ------------------------------------------------------------------------------------------------
# masked PPO / RS
# ------------------------------------------------------------------------------------------------

def loop_ppo(lp, old, adv, mask, eps_lo, eps_hi):
    num, den, clipped = 0.0, 0.0, 0
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            m = mask[i, t].item()
            if m == 0:
                continue
            r = math.exp(lp[i, t].item() - old[i, t].item())
            a = adv[i, t].item()
            rc = min(max(r, 1 - eps_lo), 1 + eps_hi)
            num += m * -min(r * a, rc * a)
            den += abs(m)
            clipped += rc * a < r * a
    return num / max(den, 1), clipped / max(den, 1)


def test_masked_ppo_matches_loop_and_reports_clip_fraction():
    g = gen(3)
    lp = (-torch.rand(3, 6, generator=g, dtype=torch.float64) * 2).requires_grad_()
    old = lp.detach() + torch.randn(3, 6, generator=g, dtype=torch.float64) * 0.4
    adv = torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.randint(-1, 2, (3, 6), generator=g).double()
    loss, m = masked_ppo_loss(lp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    want, clip_frac = loop_ppo(lp, old, adv, mask, 0.2, 0.28)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert m["clip_fraction"].item() == pytest.approx(clip_frac, rel=1e-6)
    assert 0 < clip_frac < 1
    # per-sequence advantages broadcast over tokens
    a2, _ = masked_ppo_loss(lp, old, adv[:, 0], mask)
    b2, _ = masked_ppo_loss(lp, old, adv[:, :1].expand(3, 6), mask)
    torch.testing.assert_close(a2, b2)


def test_masked_ppo_kl_penalty_and_entropy():
    g = gen(4)
    lp = (-torch.rand(2, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    ref = lp.detach() - 0.3 * torch.rand(2, 5, generator=g, dtype=torch.float64)
    ent = torch.rand(2, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.float64)
    base, _ = masked_ppo_loss(lp, lp.detach(), torch.zeros(2, 5, dtype=torch.float64), mask)
    for est in ("k1", "k2", "k3"):
        loss, m = masked_ppo_loss(lp, lp.detach(), torch.zeros(2, 5, dtype=torch.float64), mask, ref_logps=ref,
                                  kl_coef=0.5, kl_estimator=est, entropy=ent, entropy_coef=0.1)
        d = ref - lp.detach()
        kl = {"k1": -d, "k2": 0.5 * d * d, "k3": torch.exp(d) - d - 1}[est].mean()
        assert loss.item() == pytest.approx(base.item() + 0.5 * kl.item() - 0.1 * ent.mean().item(), rel=1e-9)
        assert m["kl"].item() == pytest.approx(kl.item(), rel=1e-6)
    assert (kl_estimate(lp, ref, "k3") >= 0).all()


def test_masked_ppo_fully_masked_zero_loss_zero_grad():
    lp = torch.randn(2, 4, requires_grad=True)
    old = torch.full((2, 4), -float("inf"))          # garbage on padding: exp would overflow
    loss, m = masked_ppo_loss(lp, old, torch.full((2, 4), float("nan")), torch.zeros(2, 4),
                              ref_logps=old, kl_coef=0.1)
    (g,) = torch.autograd.grad(loss, lp)
    assert loss.item() == 0 and (g == 0).all() and all(torch.isfinite(v) for v in m.values())


def test_masked_ppo_bad_input():
    lp = torch.randn(2, 4)
    with pytest.raises(ValueError, match="advantages"):
        masked_ppo_loss(lp, lp, torch.randn(3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="advantages: expected finite"):
        masked_ppo_loss(lp, lp, torch.full((2, 4), float("nan")), torch.ones(2, 4))
    with pytest.raises(ValueError, match="ref_logps: required"):
        masked_ppo_loss(lp, lp, torch.randn(2), torch.ones(2, 4), kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_estimator"):
        masked_ppo_loss(lp, lp, torch.randn(2), torch.ones(2, 4), kl_estimator="k4")
    with pytest.raises(ValueError, match="mask"):
        masked_ppo_loss(lp, lp, torch.randn(2), torch.ones(2, 5))
    with pytest.raises(ValueError, match="clip_eps"):
        masked_ppo_loss(lp, lp, torch.randn(2), torch.ones(2, 4), clip_eps=1.5)


def test_masked_rs_loss_values():
    g = gen(5)
    lp = (-torch.rand(2, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    ref = -torch.rand(2, 5, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.float64)
    loss, m = masked_rs_loss(lp, mask, ref, beta=0.25)
    sel = mask.bool()
    d = (ref - lp.detach())[sel]
    want = -lp.detach()[sel].mean() + 0.25 * (torch.exp(d) - d - 1).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    kl = torch.rand(2, 5, dtype=torch.float64)
    loss2, m2 = masked_rs_loss(lp, mask, beta=0.5, kl=kl)
    assert loss2.item() == pytest.approx((-lp.detach()[sel].mean() + 0.5 * kl[sel].mean()).item(), rel=1e-10)
    (g0,) = torch.autograd.grad(loss2, lp)
    assert (g0[~sel] == 0).all()
    with pytest.raises(ValueError, match="mask: expected weights >= 0"):
        masked_rs_loss(lp, -mask, ref)
    with pytest.raises(ValueError, match="ref_logps: required"):
        masked_rs_loss(lp, mask, beta=0.1)
    nll_only, _ = masked_rs_loss(lp, mask, beta=0.0)
    assert nll_only.item() == pytest.approx(-lp.detach()[sel].mean().item())


# ------------------------------------------------------------------------------------------------
# TDPO against the paper's formulas on full float64 logits
# ------------------------------------------------------------------------------------------------

def tdpo_from_logits(logits_c, logits_r, ref_logits_c, ref_logits_r, y_c, y_r, m_c, m_r, beta, alpha, variant):
    def parts(logits, ref_logits, y, m):
        logp = torch.log_softmax(logits, -1)
        ref_logp = torch.log_softmax(ref_logits, -1)
        lp = logp.gather(-1, y[..., None]).squeeze(-1)
        rlp = ref_logp.gather(-1, y[..., None]).squeeze(-1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # KL(pi_ref || pi) per position
        return ((lp - rlp) * m).sum(-1), (kl * m).sum(-1)
    ratio_c, kl_c = parts(logits_c, ref_logits_c, y_c, m_c)
    ratio_r, kl_r = parts(logits_r, ref_logits_r, y_r, m_r)
    if variant == "tdpo1":
        x = (ratio_c - ratio_r) - (kl_r - kl_c)
    else:
        x = (ratio_c - ratio_r) - alpha * (kl_r - kl_c.detach())
    return -F.logsigmoid(beta * x).mean()


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_tdpo_matches_paper_formula_through_fused_logps(variant):
    g = gen(6)
    N, T, H, V = 2, 6, 8, 19
    W = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    RW = W.detach() + 0.1 * torch.randn(V, H, generator=g, dtype=torch.float64)
    hc, hr = (torch.randn(N, T, H, generator=g, dtype=torch.float64) for _ in range(2))
    rhc, rhr = hc + 0.05, hr - 0.05
    yc, yr = (torch.randint(0, V, (N, T), generator=g) for _ in range(2))
    mc = (torch.rand(N, T, generator=g) > 0.2).double()
    mr = (torch.rand(N, T, generator=g) > 0.2).double()
    lp_c, kl_c = token_logps(hc, W, yc, active=mc, ref_hidden=rhc, ref_weight=RW, return_kl=True)
    lp_r, kl_r = token_logps(hr, W, yr, active=mr, ref_hidden=rhr, ref_weight=RW, return_kl=True)
    ref_c = token_logps(rhc, RW, yc, active=mc)
    ref_r = token_logps(rhr, RW, yr, active=mr)
    loss, m = tdpo_loss(lp_c, lp_r, ref_c, ref_r, kl_c, kl_r, mc, mr, beta=0.3, alpha=0.7, variant=variant)
    want = tdpo_from_logits(hc @ W.t(), hr @ W.t(), rhc @ RW.t(), rhr @ RW.t(), yc, yr, mc, mr, 0.3, 0.7, variant)
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    (g1,) = torch.autograd.grad(loss, W)
    (g2,) = torch.autograd.grad(want, W)
    torch.testing.assert_close(g1, g2, atol=1e-10, rtol=1e-8)
    assert {"kl/chosen", "kl/rejected", "kl", "rewards/accuracies", "rewards/margins"} <= set(m)
    assert m["kl/chosen"].item() >= 0


def test_tdpo2_stops_gradient_through_chosen_kl():
    lp_c, lp_r, ref_c, ref_r, mc, mr = pair_batch(N=2, Tc=3, Tr=3)
    kc = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    kr = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    l2, _ = tdpo_loss(lp_c, lp_r, ref_c, ref_r, kc, kr, mc, mr, variant="tdpo2")
    gc2, gr2 = torch.autograd.grad(l2, (kc, kr), allow_unused=True)
    assert gc2 is None
    l1, _ = tdpo_loss(lp_c, lp_r, ref_c, ref_r, kc, kr, mc, mr, variant="tdpo1")
    gc1, _ = torch.autograd.grad(l1, (kc, kr))
    assert (gr2[mr.bool()] > 0).all() and (gc1[mc.bool()] < 0).all()


# ------------------------------------------------------------------------------------------------
# fused nn.Modules against the unfused pipeline
# ------------------------------------------------------------------------------------------------

def dpo_batch(N=3, T=7, H=12, V=41, seed=7):
    g = gen(seed)
    h = torch.randn(2 * N, T, H, generator=g, requires_grad=True)
    W = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    rh = h.detach() + 0.1 * torch.randn(2 * N, T, H, generator=g)
    RW = W.detach() + 0.05 * torch.randn(V, H, generator=g)
    y = torch.randint(0, V, (2 * N, T), generator=g)
    y[:, :2] = -100                                     # prompt positions
    w = torch.randint(-1, 2, (2 * N, T), generator=g).float()
    w[y == -100] = 0
    w[1] = 0                                            # a fully masked chosen row
    return h, W, rh, RW, y, w


def test_fused_dpo_module_matches_unfused():
    h, W, rh, RW, y, w = dpo_batch()
    loss_fn = FusedLinearMaskedDPOLoss(beta=0.2, chunk_size=4)
    loss, m = loss_fn(h, W, y, w, ref_hidden=rh, ref_weight=RW)
    g = torch.autograd.grad(loss, (h, W))
    lp = token_logps_reference(h, W, y)
    ref = token_logps_reference(rh, RW, y)
    want, wm = masked_dpo_loss(lp[:3], lp[3:], ref[:3], ref[3:], w[:3], w[3:], beta=0.2)
    rg = torch.autograd.grad(want, (h, W))
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for k in wm:
        torch.testing.assert_close(m[k], wm[k], atol=1e-5, rtol=1e-5)
    # precomputed per-token reference log-probs give the same loss
    loss2, _ = loss_fn(h, W, y, w, ref_logps=ref)
    torch.testing.assert_close(loss2, loss, atol=1e-6, rtol=1e-6)


def test_fused_dpo_module_bad_input():
    h, W, rh, RW, y, w = dpo_batch()
    loss_fn = FusedLinearMaskedDPOLoss()
    with pytest.raises(ValueError, match="even batch"):
        loss_fn(h[:5], W, y[:5], w[:5], ref_hidden=rh[:5])
    with pytest.raises(ValueError, match="ref_hidden: required"):
        loss_fn(h, W, y, w)
    with pytest.raises(ValueError, match="token_weights"):
        loss_fn(h, W, y, w[:, :3], ref_hidden=rh)
    with pytest.raises(ValueError, match="token_weights: expected finite"):
        loss_fn(h, W, y, w * float("nan"), ref_hidden=rh)
    with pytest.raises(ValueError, match="not both"):
        loss_fn(h, W, y, w, ref_hidden=rh, ref_logps=torch.zeros_like(w))
    with pytest.raises(ValueError, match="backend"):
        FusedLinearMaskedDPOLoss(backend="cuda")
    with pytest.raises(ValueError, match="beta"):
        FusedLinearMaskedDPOLoss(beta=-1)


def test_fused_ppo_module_matches_unfused():
    h, W, rh, RW, y, w = dpo_batch(seed=9)
    g = gen(10)
    old = token_logps_reference(h.detach(), W.detach(), y) + 0.1 * torch.randn(y.shape, generator=g)
    adv = torch.randn(y.shape[0], generator=g)
    loss_fn = FusedLinearMaskedPPOLoss(clip_eps=0.2, kl_coef=0.1, entropy_coef=0.01, chunk_size=5)
    loss, m = loss_fn(h, W, y, old, adv, w, ref_hidden=rh, ref_weight=RW)
    grads = torch.autograd.grad(loss, (h, W))
    lp, ent = token_logps_reference(h, W, y, return_entropy=True)
    ref = token_logps_reference(rh, RW, y)
    want, wm = masked_ppo_loss(lp, old, adv, w, clip_eps=0.2, ref_logps=ref, kl_coef=0.1, entropy=ent,
                               entropy_coef=0.01)
    rgrads = torch.autograd.grad(want, (h, W))
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert set(wm) == set(m) and "clip_fraction" in m and "kl" in m
    with pytest.raises(ValueError, match="ref_hidden: required"):
        loss_fn(h, W, y, old, adv, w)

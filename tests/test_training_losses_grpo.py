"""masked_grpo_loss and FusedLinearMaskedGRPOLoss against a loop reference written from the formulas.

The reference walks every sequence and token in float64 Python-level loops (TRL's GRPO clipped
surrogate, the k3 KL, the four aggregations). Tolerances: float64 to 1e-10, the fused module
(float32 token_logps vs float64 full logits) to 1e-5.
"""
import math

import pytest
import torch

from fastsafe.training import FusedLinearMaskedGRPOLoss, masked_grpo_loss, schmitt_mask
from fastsafe.training.losses_ppo import GRPO_LOSS_TYPES


def batch(N=4, T=6, seed=0, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(N, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = lp.detach() + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)
    ref = lp.detach() + 0.2 * torch.randn(N, T, generator=g, dtype=torch.float64)
    adv = torch.randn((N, T) if per_token_adv else (N,), generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[0] = T
    comp = (torch.arange(T)[None] < lengths[:, None]).long()
    mask = torch.randint(-1, 2, (N, T), generator=g).to(torch.int8)
    return lp, old, ref, adv, comp, mask


def loop_reference(lp, old, adv, comp, mask, *, loss_type, eps_low=0.2, eps_high=0.2, ratio_max=None, ref=None,
                   beta=0.0, kl_correction=False, max_len=None, num_items=None):
    N, T = lp.shape
    seq_losses, total, count = [], 0.0, 0
    for i in range(N):
        s, n = 0.0, 0
        for t in range(T):
            if not comp[i, t]:
                continue
            a = adv[i, t] if adv.dim() == 2 else adv[i]
            ratio = torch.exp(lp[i, t] - old[i, t])
            r1 = ratio if ratio_max is None else torch.clamp(ratio, max=ratio_max)
            r2 = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
            l_t = -torch.minimum(r1 * a, r2 * a)
            if mask is not None:
                l_t = float(mask[i, t]) * l_t
            if beta:
                d = ref[i, t] - lp[i, t]
                kl = torch.exp(d) - d - 1
                l_t = l_t + beta * (kl * ratio if kl_correction else kl)
            s, n = s + l_t, n + 1
        seq_losses.append(s / max(n, 1))
        total, count = total + s, count + n
    if loss_type == "grpo":
        return sum(seq_losses) / N
    if loss_type == "bnpo":
        return total / max(count, 1)
    if loss_type == "dr_grpo":
        return total / (N * (T if max_len is None else max_len))
    return total / max(count if num_items is None else num_items, 1)


CASES = [
    dict(),
    dict(beta=0.05),
    dict(eps_high=0.28, ratio_max=1.5),
    dict(beta=0.1, kl_correction=True, per_token_adv=True),
]


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_loop_reference_value_and_gradient(loss_type, case):
    kw = dict(CASES[case])
    lp, old, ref, adv, comp, mask = batch(seed=case, per_token_adv=kw.pop("per_token_adv", False))
    extra = {"max_len": 9} if loss_type == "dr_grpo" else {"num_items": 11} if loss_type == "dapo" else {}
    want = loop_reference(lp, old, adv, comp, mask, loss_type=loss_type, ref=ref, **kw, **extra)
    got, metrics = masked_grpo_loss(
        lp, old, adv, comp, mask, loss_type=loss_type, clip_eps=kw.get("eps_low", 0.2),
        clip_eps_high=kw.get("eps_high"), ratio_max=kw.get("ratio_max"), ref_logps=ref, beta=kw.get("beta", 0.0),
        kl_importance_correction=kw.get("kl_correction", False), max_completion_length=extra.get("max_len"),
        num_items=extra.get("num_items"))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    g_got, = torch.autograd.grad(got, lp)
    g_want, = torch.autograd.grad(want, lp)
    assert g_want.abs().sum() > 0
    torch.testing.assert_close(g_got, g_want, atol=1e-10, rtol=1e-10)
    assert {"policy_loss", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
            "mask/positive_fraction", "mask/negative_fraction"} <= set(metrics)
    for v in metrics.values():
        assert v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad
    on = comp.bool()
    assert metrics["mask/negative_fraction"].item() == pytest.approx((mask[on] < 0).double().mean().item())


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_all_ones_mask_is_unmasked_and_signs_act_per_token(loss_type):
    lp, old, _, adv, comp, _ = batch(seed=3)
    plain, _ = masked_grpo_loss(lp, old, adv, comp, loss_type=loss_type)
    ones, _ = masked_grpo_loss(lp, old, adv, comp, torch.ones_like(comp), loss_type=loss_type)
    assert plain.item() == ones.item()
    g_plain, = torch.autograd.grad(plain, lp)
    mask = torch.ones(comp.shape, dtype=torch.int8)
    mask[:, 1] = -1   # reverse the push of token 1
    mask[:, 2] = 0    # drop token 2
    masked, _ = masked_grpo_loss(lp, old, adv, comp, mask, loss_type=loss_type)
    g, = torch.autograd.grad(masked, lp)
    torch.testing.assert_close(g[:, 1], -g_plain[:, 1], atol=1e-12, rtol=0)
    assert torch.all(g[:, 2] == 0)
    keep = torch.ones(comp.shape[1], dtype=torch.bool)
    keep[1:3] = False
    torch.testing.assert_close(g[:, keep], g_plain[:, keep], atol=1e-12, rtol=0)


def test_all_zero_mask_zero_loss_zero_grad_and_kl_still_applies():
    lp, old, ref, adv, comp, _ = batch(seed=4)
    zero = torch.zeros(comp.shape)
    loss, m = masked_grpo_loss(lp, old, adv, comp, zero, loss_type="dapo")
    g, = torch.autograd.grad(loss, lp)
    assert loss.item() == 0 and torch.all(g == 0) and m["mask/positive_fraction"].item() == 0
    with_kl, m = masked_grpo_loss(lp, old, adv, comp, zero, loss_type="bnpo", ref_logps=ref, beta=0.1)
    assert with_kl.item() == pytest.approx(0.1 * m["kl"].item(), rel=1e-6) and with_kl.item() > 0


def test_padding_may_hold_anything():
    lp, old, ref, adv, comp, mask = batch(seed=5)
    dirty_old = torch.where(comp.bool(), old, torch.full_like(old, float("nan")))
    dirty_ref = torch.where(comp.bool(), ref, torch.full_like(ref, float("inf")))
    a, _ = masked_grpo_loss(lp, old, adv, comp, mask, ref_logps=ref, beta=0.1)
    b, _ = masked_grpo_loss(lp, dirty_old, adv, comp, mask, ref_logps=dirty_ref, beta=0.1)
    assert math.isfinite(b.item()) and a.item() == b.item()


def test_schmitt_mask_of_token_rewards_composes():
    lp, old, _, adv, comp, _ = batch(seed=6)
    rewards = torch.randn(comp.shape, generator=torch.Generator().manual_seed(0))
    mask = schmitt_mask(rewards, 0.3, attention_mask=comp)
    loss, m = masked_grpo_loss(lp, old, adv, comp, mask)
    want = loop_reference(lp, old, adv, comp, mask, loss_type="grpo")
    torch.testing.assert_close(loss, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(loss_type="sapo"), ValueError, "loss_type: expected one of"),
    (dict(token_mask=torch.ones(4, 5)), ValueError, r"token_mask: expected the shape of logps \[4, 6\]"),
    (dict(token_mask=torch.full((4, 6), float("nan"))), ValueError, "token_mask: expected finite values"),
    (dict(completion_mask=torch.ones(4, 7)), ValueError, "completion_mask: expected the shape of logps"),
    (dict(advantages=torch.ones(3)), ValueError, r"advantages: expected \[N\] = \[4\]"),
    (dict(advantages=torch.full((4,), float("nan"), dtype=torch.float64)), ValueError, "advantages: expected finite"),
    (dict(beta=0.1), ValueError, "ref_logps: required when beta != 0"),
    (dict(clip_eps=1.5), ValueError, "clip_eps: expected 0 <= clip_eps < 1"),
    (dict(ratio_max=0.5), ValueError, "ratio_max: expected a number > 1"),
    (dict(max_completion_length=0), ValueError, "max_completion_length: expected an int >= 1"),
])
def test_bad_input(kwargs, exc, match):
    lp, old, _, adv, comp, _ = batch()
    args = dict(logps=lp, old_logps=old, advantages=adv, completion_mask=comp)
    for k in list(kwargs):
        if k in args:
            args[k] = kwargs.pop(k)
    with pytest.raises(exc, match=match):
        masked_grpo_loss(args["logps"], args["old_logps"], args["advantages"], args["completion_mask"], **kwargs)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_fused_module_matches_full_logits(loss_type):
    g = torch.Generator().manual_seed(1)
    N, T, H, V = 3, 5, 8, 40
    hidden = torch.randn(N, T, H, generator=g, requires_grad=True)
    weight = (0.5 * torch.randn(V, H, generator=g)).requires_grad_()
    targets = torch.randint(0, V, (N, T), generator=g)
    targets[1, 3:] = -100
    comp = targets != -100
    ref_hidden = hidden.detach() + 0.1 * torch.randn(N, T, H, generator=g)
    adv = torch.randn(N, generator=g)
    mask = torch.randint(-1, 2, (N, T), generator=g)
    old = torch.randn(N, T, generator=g) * 0.1

    def full_logps(h, w):
        lp = torch.log_softmax((h.double() @ w.double().T), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return torch.where(comp, lp, torch.zeros((), dtype=lp.dtype))

    lp64 = full_logps(hidden, weight)
    old_lp = lp64.detach() + old.double()
    fn = FusedLinearMaskedGRPOLoss(loss_type=loss_type, beta=0.05)
    got, _ = fn(hidden, weight, targets, adv, mask, old_logps=old_lp.float(), ref_hidden=ref_hidden)
    want, _ = masked_grpo_loss(lp64, old_lp, adv.double(), comp, mask, loss_type=loss_type,
                               ref_logps=full_logps(ref_hidden, weight).detach(), beta=0.05)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    g_got = torch.autograd.grad(got, (hidden, weight))
    g_want = torch.autograd.grad(want, (hidden, weight))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="loss_type: expected one of"):
        FusedLinearMaskedGRPOLoss(loss_type="cispo")
    with pytest.raises(ValueError, match="ref_hidden: required"):
        fn(hidden, weight, targets, adv, mask)

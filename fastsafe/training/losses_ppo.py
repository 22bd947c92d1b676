"""Token-masked PPO clipped surrogate (eq. 9) with an optional KL penalty."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._checks import (acc_dtype, as_weights, check_finite, check_float, check_logps, check_real,
                      check_same_device, metric)

__all__ = ["masked_ppo_loss", "kl_estimate", "masked_mean"]

KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_mean(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w * x) / max(sum(|w|), 1)``; ``x`` must already be 0 (finite) where ``w == 0``."""
    return (weights * x).sum() / weights.abs().sum().clamp(min=1)


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token sample estimate of ``KL(pi || pi_ref)`` at tokens sampled from ``pi``.

    With ``d = ref_logps - logps``: ``k1 = -d``, ``k2 = d**2 / 2``, ``k3 = exp(d) - d - 1``
    (unbiased and >= 0; Schulman's estimators). Shapes are kept.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: expected one of {KL_ESTIMATORS}, got {estimator!r}")
    d = ref_logps - logps
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.expm1(d) - d


def masked_ppo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, *, clip_eps: float = 0.2, clip_eps_high: Optional[float] = None,
                    ref_logps: Optional[torch.Tensor] = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                    entropy: Optional[torch.Tensor] = None, entropy_coef: float = 0.0,
                    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO clipped surrogate times a token mask, as a masked mean (eq. 9).

    ``ratio_t = exp(logps_t - old_logps_t)``; per token
    ``l_t = -min(ratio_t * A_t, clip(ratio_t, 1 - clip_eps, 1 + clip_eps_high) * A_t)``;
    ``loss = sum_t M_t * l_t / sum_t |M_t|`` (+ ``kl_coef`` times the masked mean of a KL estimate
    against ``ref_logps``, - ``entropy_coef`` times the masked mean entropy). A mask entry of ``-1``
    (a Schmitt mask's "bad token") flips that token's surrogate: the update moves it against its
    advantage. Masked positions are zeroed before any arithmetic, so padding may hold anything.

    Args:
        logps: ``[N, T]`` per-token log-probs of the current policy (with gradient).
        old_logps: ``[N, T]`` log-probs of the policy that sampled the tokens.
        advantages: ``[N, T]`` per-token or ``[N]`` per-sequence advantages (finite).
        mask: ``[N, T]`` finite real token mask/weights (bool, {0, 1} or {1, 0, -1}, ...).
        clip_eps, clip_eps_high: clip range ``[1 - clip_eps, 1 + clip_eps_high]``
            (``clip_eps_high=None`` means ``clip_eps``).
        ref_logps, kl_coef, kl_estimator: optional KL penalty (``"k1"``, ``"k2"`` or ``"k3"``).
        entropy, entropy_coef: optional per-token entropy ``[N, T]`` and its bonus coefficient.

    Returns:
        ``(loss, metrics)`` with detached 0-d float32 metrics: ``policy_loss``, ``clip_fraction``
        (fraction of masked-in tokens where the clipped branch is active), ``approx_kl``
        (``mean((logps - old_logps)**2) / 2``), ``ratio/mean``, and ``kl`` (with ``ref_logps``),
        ``entropy`` (with ``entropy``). An all-zero mask gives loss 0 and zero gradients.

    Example:
        >>> lp = torch.randn(2, 6, requires_grad=True)
        >>> loss, m = masked_ppo_loss(lp, lp.detach() + 0.1, torch.randn(2), torch.ones(2, 6))
        >>> loss.backward(); m["clip_fraction"].item()
    """
    check_logps("logps", logps)
    check_logps("old_logps", old_logps, logps, "logps")
    check_float("advantages", advantages, ndims=(1, 2))
    check_same_device("advantages", advantages, logps, "logps")
    if advantages.dim() == 1:
        if advantages.shape[0] != logps.shape[0]:
            raise ValueError(f"advantages: expected [N, T] = {list(logps.shape)} or [N] = [{logps.shape[0]}], "
                             f"got {list(advantages.shape)}")
        advantages = advantages[:, None].expand_as(logps)
    elif advantages.shape != logps.shape:
        raise ValueError(f"advantages: expected [N, T] = {list(logps.shape)} or [N] = [{logps.shape[0]}], "
                         f"got {list(advantages.shape)}")
    acc = acc_dtype(logps, old_logps, advantages)
    w = as_weights("mask", mask, logps, "logps").to(acc)
    clip_eps = check_real("clip_eps", clip_eps)
    clip_eps_high = clip_eps if clip_eps_high is None else check_real("clip_eps_high", clip_eps_high)
    if not 0 <= clip_eps < 1 or clip_eps_high < 0:
        raise ValueError(f"clip_eps: expected 0 <= clip_eps < 1 and clip_eps_high >= 0, "
                         f"got clip_eps={clip_eps}, clip_eps_high={clip_eps_high}")
    kl_coef = check_real("kl_coef", kl_coef)
    entropy_coef = check_real("entropy_coef", entropy_coef)
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: expected one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if kl_coef != 0 and ref_logps is None:
        raise ValueError(f"ref_logps: required when kl_coef != 0 (got kl_coef={kl_coef}), got None")
    on = w != 0
    zero = torch.zeros((), dtype=acc, device=logps.device)

    def clean(x):
        return torch.where(on, x.to(acc), zero)

    adv = clean(advantages)
    check_finite("advantages", adv)
    lp, old = clean(logps), clean(old_logps)
    log_ratio = lp - old
    ratio = torch.exp(log_ratio)
    surr = ratio * adv
    surr_clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps_high) * adv
    per_token = -torch.minimum(surr, surr_clipped)
    policy_loss = masked_mean(per_token, w)
    loss = policy_loss
    metrics = {}
    with torch.no_grad():
        absw = w.abs()
        metrics["policy_loss"] = metric(policy_loss)
        metrics["clip_fraction"] = metric(masked_mean((surr_clipped < surr).to(acc), absw))
        metrics["approx_kl"] = metric(masked_mean(0.5 * log_ratio * log_ratio, absw))
        metrics["ratio/mean"] = metric(masked_mean(torch.where(on, ratio, zero), absw))
    if ref_logps is not None:
        check_logps("ref_logps", ref_logps, logps, "logps")
        kl = kl_estimate(lp, clean(ref_logps), kl_estimator)
        kl_mean = masked_mean(kl, w.abs())
        if kl_coef != 0:
            loss = loss + kl_coef * kl_mean
        metrics["kl"] = metric(kl_mean)
    if entropy is not None:
        check_logps("entropy", entropy, logps, "logps")
        ent_mean = masked_mean(clean(entropy), w.abs())
        if entropy_coef != 0:
            loss = loss - entropy_coef * ent_mean
        metrics["entropy"] = metric(ent_mean)
    return loss, metrics

"""Token-masked PPO / GRPO clipped surrogates (eq. 9) with an optional KL penalty.

- :func:`masked_ppo_loss`: masked mean over the tokens the mask selects (``sum |M|``).
- :func:`masked_grpo_loss`: the mask multiplies each token's surrogate; aggregated like TRL's
  ``GRPOTrainer`` (``loss_type`` grpo, bnpo, dr_grpo, dapo), so an all-ones mask is TRL's loss.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._checks import (acc_dtype, as_weights, check_finite, check_float, check_logps, check_real,
                      check_same_device, metric)

__all__ = ["masked_ppo_loss", "masked_grpo_loss", "kl_estimate", "masked_mean", "GRPO_LOSS_TYPES"]

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


def _clip_range(clip_eps, clip_eps_high) -> Tuple[float, float]:
    """The checked clip range ``(clip_eps, clip_eps_high)`` (``clip_eps_high=None`` means ``clip_eps``)."""
    clip_eps = check_real("clip_eps", clip_eps)
    clip_eps_high = clip_eps if clip_eps_high is None else check_real("clip_eps_high", clip_eps_high)
    if not 0 <= clip_eps < 1 or clip_eps_high < 0:
        raise ValueError(f"clip_eps: expected 0 <= clip_eps < 1 and clip_eps_high >= 0, "
                         f"got clip_eps={clip_eps}, clip_eps_high={clip_eps_high}")
    return clip_eps, clip_eps_high


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
    clip_eps, clip_eps_high = _clip_range(clip_eps, clip_eps_high)
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


#: Aggregations of :func:`masked_grpo_loss` (the ``loss_type`` names of TRL's ``GRPOTrainer``).
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def masked_grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                     completion_mask: torch.Tensor, token_mask: Optional[torch.Tensor] = None, *,
                     loss_type: str = "grpo", clip_eps: float = 0.2, clip_eps_high: Optional[float] = None,
                     ratio_max: Optional[float] = None, ref_logps: Optional[torch.Tensor] = None,
                     beta: float = 0.0, kl_importance_correction: bool = False,
                     max_completion_length: Optional[int] = None, num_items: Optional[torch.Tensor] = None,
                     ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GRPO clipped surrogate with a signed token mask (eq. 9), aggregated as TRL's ``loss_type``.

    Per completion token (``c_t = completion_mask``, ``M_t = token_mask``, default all ones):
    ``ratio_t = exp(logps_t - old_logps_t)``;
    ``s_t = -min(min(ratio_t, ratio_max) * A, clip(ratio_t, 1 - clip_eps, 1 + clip_eps_high) * A)``;
    ``l_t = M_t * s_t + beta * kl_t`` with the k3 estimate
    ``kl_t = exp(ref_t - logps_t) - (ref_t - logps_t) - 1`` (times ``ratio_t`` when
    ``kl_importance_correction``). ``M_t = 1`` keeps the token's push, ``0`` drops it, ``-1``
    reverses it; the KL penalty is not masked. With a sequence-level advantage the push's sign is
    the advantage's, so to move tokens by their own quality (harmful down, good up, in completions
    better and worse than their group) pass ``sign(A) * M``, as ``MaskedGRPOTrainer`` does for the
    Schmitt mask. The token mask does not change the normaliser, so
    an all-ones mask is exactly TRL's GRPO loss and an all-zero mask (with ``beta=0``) gives 0:

    - ``"grpo"``: ``mean_i(sum_t c l / max(sum_t c, 1))`` (per-sequence mean, then batch mean);
    - ``"bnpo"``: ``sum c l / max(sum c, 1)``;
    - ``"dr_grpo"``: ``sum c l / (N * max_completion_length)`` (default ``T``);
    - ``"dapo"``: ``sum c l / max(num_items, 1)`` (default ``sum c``; TRL passes the token count of
      the whole generation batch over processes, rescaled to one accumulation window).

    Gradient accumulation is the caller's: divide the loss by the number of micro-batches for
    ``grpo``/``bnpo``/``dr_grpo``, or pass the window's ``num_items`` for ``dapo``.

    Args:
        logps: ``[N, T]`` per-token log-probs of the policy (with gradient).
        old_logps: ``[N, T]`` log-probs of the sampling policy (``logps.detach()`` when on-policy).
        advantages: ``[N]`` per-completion or ``[N, T]`` per-token advantages (finite).
        completion_mask: ``[N, T]`` nonzero on completion tokens (padding may hold anything).
        token_mask: optional ``[N, T]`` finite real mask (``{1, 0, -1}`` from :func:`schmitt_mask`,
            or any weights); multiplies each token's clipped surrogate.
        loss_type: one of :data:`GRPO_LOSS_TYPES`.
        clip_eps, clip_eps_high: clip range ``[1 - clip_eps, 1 + clip_eps_high]`` (``None``: ``clip_eps``).
        ratio_max: optional upper bound of the unclipped ratio (TRL's two-sided clipping ``delta``).
        ref_logps, beta: reference log-probs ``[N, T]`` and the KL coefficient (``ref_logps``
            required when ``beta != 0``).
        kl_importance_correction: multiply the KL estimate by ``ratio_t`` (with its gradient), as
            TRL's ``use_bias_correction_kl``.
        max_completion_length: the ``dr_grpo`` constant (default ``T``).
        num_items: the ``dapo`` normaliser, a number or 0-d tensor (default ``sum c``).

    Returns:
        ``(loss, metrics)``; metrics are detached 0-d float32 means over the completion tokens:
        ``policy_loss`` (the loss without the KL term), ``kl`` (with ``ref_logps``),
        ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``,
        ``mask/positive_fraction``, ``mask/negative_fraction``.

    Example:
        >>> lp = torch.randn(4, 6, requires_grad=True)
        >>> mask = torch.tensor([1, 0, -1, 1, 1, 1]).expand(4, 6)
        >>> loss, m = masked_grpo_loss(lp, lp.detach(), torch.randn(4), torch.ones(4, 6), mask, loss_type="dapo")
        >>> loss.backward()
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    check_logps("logps", logps)
    check_logps("old_logps", old_logps, logps, "logps")
    check_float("advantages", advantages, ndims=(1, 2))
    check_same_device("advantages", advantages, logps, "logps")
    N, T = logps.shape
    if advantages.shape not in (torch.Size([N]), logps.shape):
        raise ValueError(f"advantages: expected [N] = [{N}] or [N, T] = {list(logps.shape)}, "
                         f"got {list(advantages.shape)}")
    acc = acc_dtype(logps, old_logps, advantages, ref_logps)
    c = as_weights("completion_mask", completion_mask, logps, "logps") != 0
    m = None if token_mask is None else as_weights("token_mask", token_mask, logps, "logps").to(acc)
    clip_eps, clip_eps_high = _clip_range(clip_eps, clip_eps_high)
    if ratio_max is not None and check_real("ratio_max", ratio_max) <= 1:
        raise ValueError(f"ratio_max: expected a number > 1 or None, got {ratio_max}")
    beta = check_real("beta", beta)
    if beta != 0 and ref_logps is None:
        raise ValueError(f"ref_logps: required when beta != 0 (got beta={beta}), got None")
    if max_completion_length is not None and (isinstance(max_completion_length, bool)
                                              or not isinstance(max_completion_length, int)
                                              or max_completion_length < 1):
        raise ValueError(f"max_completion_length: expected an int >= 1 or None, got {max_completion_length!r}")
    zero = torch.zeros((), dtype=acc, device=logps.device)

    def clean(x):
        return torch.where(c, x.to(acc), zero)

    adv = advantages[:, None].expand(N, T) if advantages.dim() == 1 else advantages
    adv = clean(adv)
    check_finite("advantages", adv)
    lp, old = clean(logps), clean(old_logps)
    ratio = torch.exp(lp - old)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps_high)
    unclipped = ratio if ratio_max is None else ratio.clamp(max=ratio_max)
    surrogate = -torch.minimum(unclipped * adv, clipped * adv)
    if m is not None:
        surrogate = torch.where(c & (m != 0), m * surrogate, zero)
    cf = c.to(acc)

    def aggregate(x):
        if loss_type == "grpo":
            return ((x * cf).sum(-1) / cf.sum(-1).clamp(min=1)).mean()
        if loss_type == "bnpo":
            return (x * cf).sum() / cf.sum().clamp(min=1)
        if loss_type == "dr_grpo":
            return (x * cf).sum() / (N * (T if max_completion_length is None else max_completion_length))
        items = cf.sum() if num_items is None else torch.as_tensor(num_items, dtype=acc, device=logps.device)
        return (x * cf).sum() / items.clamp(min=1)

    policy_loss = aggregate(surrogate)
    loss = policy_loss
    metrics = {}
    if ref_logps is not None:
        check_logps("ref_logps", ref_logps, logps, "logps")
        kl = kl_estimate(lp, clean(ref_logps), "k3")
        if kl_importance_correction:
            kl = kl * ratio
        if beta != 0:
            loss = aggregate(surrogate + beta * kl)
        metrics["kl"] = metric(masked_mean(kl, cf))
    with torch.no_grad():
        low = (ratio < 1 - clip_eps) & (adv < 0)
        high = (ratio > 1 + clip_eps_high) & (adv > 0)
        metrics["policy_loss"] = metric(policy_loss)
        metrics["clip_ratio/low_mean"] = metric(masked_mean(low.to(acc), cf))
        metrics["clip_ratio/high_mean"] = metric(masked_mean(high.to(acc), cf))
        metrics["clip_ratio/region_mean"] = metric(masked_mean((low | high).to(acc), cf))
        sign = cf if m is None else torch.where(c, m, zero)
        metrics["mask/positive_fraction"] = metric(masked_mean((sign > 0).to(acc), cf))
        metrics["mask/negative_fraction"] = metric(masked_mean((sign < 0).to(acc), cf))
    return loss, metrics

"""Masked rejection-sampling fine-tuning loss (eq. 11): masked NLL + beta * KL(pi || pi_ref)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._checks import acc_dtype, as_weights, check_logps, check_real, metric
from .losses_ppo import KL_ESTIMATORS, kl_estimate, masked_mean

__all__ = ["masked_rs_loss"]


def masked_rs_loss(logps: torch.Tensor, mask: torch.Tensor, ref_logps: Optional[torch.Tensor] = None,
                   beta: float = 0.1, *, kl: Optional[torch.Tensor] = None, kl_estimator: str = "k3",
                   ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``sum_t M_t * (-logp_t + beta * KL_t) / sum_t M_t`` over the masked-in tokens of accepted samples.

    ``KL_t`` is the per-token ``KL(pi || pi_ref)``: the ``kl`` tensor when given (for instance a
    full-vocabulary value), else a sample estimate at the target token from ``ref_logps``
    (``kl_estimator``, default ``k3 = exp(d) - d - 1`` with ``d = ref_logp - logp``: unbiased for
    tokens sampled from ``pi``, which rejection sampling produces).

    Args:
        logps: ``[N, T]`` per-token policy log-probs of the accepted samples.
        mask: ``[N, T]`` finite, non-negative weights (bool, {0, 1} or soft). Negative weights are
            rejected: a negative NLL weight is unbounded below (use the DPO/PPO losses for signed masks).
        ref_logps: ``[N, T]`` reference log-probs (needed for the estimate when ``beta > 0`` and ``kl`` is None).
        beta: KL coefficient (>= 0).
        kl: optional per-token ``[N, T]`` KL values to use instead of the estimate.

    Returns:
        ``(loss, metrics)`` with detached 0-d float32 metrics ``nll`` (masked mean) and ``kl``
        (masked mean, when available). An all-zero mask gives loss 0 and zero gradients.

    Example:
        >>> lp = torch.randn(2, 5, requires_grad=True) - 3
        >>> loss, m = masked_rs_loss(lp, torch.ones(2, 5), ref_logps=lp.detach() - 0.2, beta=0.1)
    """
    check_logps("logps", logps)
    acc = acc_dtype(logps)
    w = as_weights("mask", mask, logps, "logps").to(acc)
    if bool((w < 0).any()):
        raise ValueError(f"mask: expected weights >= 0 (a negative NLL weight is unbounded below), got min "
                         f"{w.min().item()}")
    beta = check_real("beta", beta)
    if beta < 0:
        raise ValueError(f"beta: expected a number >= 0, got {beta}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator: expected one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    on = w != 0
    zero = torch.zeros((), dtype=acc, device=logps.device)
    lp = torch.where(on, logps.to(acc), zero)
    nll = masked_mean(-lp, w)
    loss = nll
    metrics = {"nll": metric(nll)}
    per_kl = None
    if kl is not None:
        check_logps("kl", kl, logps, "logps")
        per_kl = torch.where(on, kl.to(acc), zero)
    elif ref_logps is not None:
        check_logps("ref_logps", ref_logps, logps, "logps")
        per_kl = kl_estimate(lp, torch.where(on, ref_logps.to(acc), zero), kl_estimator)
    elif beta > 0:
        raise ValueError(f"ref_logps: required for the KL term when beta = {beta} > 0 and kl is None, got None")
    if per_kl is not None:
        kl_mean = masked_mean(per_kl, w)
        if beta > 0:
            loss = loss + beta * kl_mean
        metrics["kl"] = metric(kl_mean)
    return loss, metrics

"""Token-level DPO (TDPO, Zeng et al. 2024): DPO with the sequential forward KL per token."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from ._checks import acc_dtype, check_logps, check_pair_inputs, check_real, metric
from .losses_dpo import pair_metrics, weighted_logratio

__all__ = ["tdpo_loss", "TDPO_VARIANTS"]

TDPO_VARIANTS = ("tdpo1", "tdpo2")


def tdpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
              chosen_kl: torch.Tensor, rejected_kl: torch.Tensor,
              chosen_weights: torch.Tensor, rejected_weights: torch.Tensor,
              beta: float = 0.1, alpha: float = 0.5, variant: str = "tdpo2",
              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """TDPO1 / TDPO2 loss on per-token log-probs and per-token ``KL(pi_ref || pi)``.

    With ``u = sum_t w^c_t (logp - ref)_t - sum_t w^r_t (logp - ref)_t`` (as in
    :func:`masked_dpo_loss`) and the sequential KLs ``SeqKL = sum_t |w_t| * KL_t``:

    - TDPO1: ``-logsigmoid(beta * (u - (SeqKL_rejected - SeqKL_chosen)))``
    - TDPO2: ``-logsigmoid(beta * (u - alpha * (SeqKL_rejected - sg(SeqKL_chosen))))``
      (``sg`` = stop-gradient), averaged over pairs.

    ``chosen_kl`` / ``rejected_kl`` are the full-vocabulary per-position
    ``KL(pi_ref(.|x, y<t) || pi(.|x, y<t))``: take them from
    ``token_logps(..., ref_hidden=..., return_kl=True)``, which computes them from logsumexps
    (never ``softmax().log()``), chunked, without the ``[N, T, V]`` logits.

    Args:
        policy_*_logps, ref_*_logps: ``[N, T]`` per-token log-probs (chosen and rejected may differ in T).
        chosen_kl, rejected_kl: ``[N, T]`` per-token KL(pi_ref || pi), with gradient to the policy.
        chosen_weights, rejected_weights: ``[N, T]`` finite token weights (0/1 loss masks for plain TDPO).
        beta: > 0. alpha: TDPO2's KL weight (> 0; ignored by TDPO1). variant: ``"tdpo1"`` or ``"tdpo2"``.

    Returns:
        ``(loss, metrics)``; metrics (detached 0-d float32) follow the TDPO reference code:
        ``rewards/chosen = beta * (ratio_chosen + SeqKL_chosen)`` (same for rejected),
        ``rewards/accuracies``, ``rewards/margins``, ``kl/chosen``, ``kl/rejected`` (SeqKL batch
        means), ``kl`` (their mean), ``logps/chosen``, ``logps/rejected``.

    Example:
        >>> from fastsafe.training import token_logps
        >>> lp_c, kl_c = token_logps(h_c, w, y_c, ref_hidden=rh_c, ref_weight=rw, return_kl=True)
        >>> ...
        >>> loss, m = tdpo_loss(lp_c, lp_r, ref_lp_c, ref_lp_r, kl_c, kl_r, mask_c, mask_r, beta=0.1)
    """
    wc, wr = check_pair_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               chosen_weights, rejected_weights)
    check_logps("chosen_kl", chosen_kl, policy_chosen_logps, "policy_chosen_logps")
    check_logps("rejected_kl", rejected_kl, policy_rejected_logps, "policy_rejected_logps")
    beta = check_real("beta", beta, positive=True)
    alpha = check_real("alpha", alpha, positive=True)
    if variant not in TDPO_VARIANTS:
        raise ValueError(f"variant: expected one of {TDPO_VARIANTS}, got {variant!r}")

    acc = acc_dtype(policy_chosen_logps, chosen_kl)
    ratio_c = weighted_logratio(policy_chosen_logps, ref_chosen_logps, wc)
    ratio_r = weighted_logratio(policy_rejected_logps, ref_rejected_logps, wr)
    zero = torch.zeros((), dtype=acc, device=policy_chosen_logps.device)
    seq_kl_c = (wc.abs().to(acc) * torch.where(wc != 0, chosen_kl.to(acc), zero)).sum(-1)
    seq_kl_r = (wr.abs().to(acc) * torch.where(wr != 0, rejected_kl.to(acc), zero)).sum(-1)
    margin = ratio_c - ratio_r
    if variant == "tdpo1":
        logits = margin - (seq_kl_r - seq_kl_c)
    else:
        logits = margin - alpha * (seq_kl_r - seq_kl_c.detach())
    losses = -F.logsigmoid(beta * logits)
    loss = losses.mean() if losses.numel() else losses.sum()

    with torch.no_grad():
        rc, rr = beta * (ratio_c + seq_kl_c), beta * (ratio_r + seq_kl_r)
        metrics = pair_metrics(rc, rr, policy_chosen_logps, policy_rejected_logps, wc, wr, acc)
        metrics.update({
            "kl/chosen": metric(seq_kl_c.mean()),
            "kl/rejected": metric(seq_kl_r.mean()),
            "kl": metric(0.5 * (seq_kl_c.mean() + seq_kl_r.mean())),
        })
    return loss, metrics

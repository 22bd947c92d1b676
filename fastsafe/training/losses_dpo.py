"""Token-weighted (masked) DPO on per-token log-probs."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from ._checks import acc_dtype, check_pair_inputs, check_real, metric

__all__ = ["masked_dpo_loss", "weighted_logratio"]


def weighted_logratio(logps: torch.Tensor, ref_logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_t w_t * (logps_t - ref_logps_t)`` per sequence, ``[N]``, in at least fp32.

    Positions with ``w_t == 0`` are zeroed *before* the subtraction, so padding that holds
    ``-inf`` or NaN log-probs contributes neither a value nor a NaN gradient.
    """
    acc = acc_dtype(logps, ref_logps, weights)
    on = weights != 0
    zero = torch.zeros((), dtype=acc, device=logps.device)
    lp = torch.where(on, logps.to(acc), zero)
    ref = torch.where(on, ref_logps.to(acc), zero)
    return (weights.to(acc) * (lp - ref)).sum(-1)


def masked_dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                    chosen_weights: torch.Tensor, rejected_weights: torch.Tensor, beta: float = 0.1, *,
                    label_smoothing: float = 0.0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Sigmoid DPO with a weight per token.

    Each response's log-ratio is ``sum_t w_t * (logp_t - ref_logp_t)``; the loss is
    ``-logsigmoid(beta * (ratio_chosen - ratio_rejected))`` averaged over the ``N`` pairs
    (with ``label_smoothing = eps``: ``-(1 - eps) logsigmoid(x) - eps logsigmoid(-x)``, cDPO).
    With 0/1 weights equal to the loss mask this is exactly the standard DPO loss.

    What a weight means. ``+1``: the token counts as in standard DPO (a chosen token is pushed
    up, a rejected token is pushed down). ``0``: the token is ignored (no gradient). ``-1``: the
    token's log-ratio enters with the opposite sign, so it is pushed the *other* way: a chosen
    token with ``-1`` is pushed down, a rejected token with ``-1`` is pushed up. This lets one
    preference pair carry token-level corrections: a harmful span inside an otherwise preferred
    answer is still unlearned, and a good span inside a rejected answer is still reinforced.
    With a Schmitt mask from token rewards (``+1`` good, ``-1`` bad), use
    ``chosen_weights = M_chosen`` and ``rejected_weights = -M_rejected``: good tokens are then
    always pushed up and bad tokens down, whichever response they are in. Other real values
    scale a token's contribution.

    Args:
        policy_chosen_logps, ref_chosen_logps: ``[N, Tc]`` per-token log-probs (float).
        policy_rejected_logps, ref_rejected_logps: ``[N, Tr]`` per-token log-probs.
        chosen_weights: ``[N, Tc]`` finite real weights (bool / int / float); 0 on padding.
        rejected_weights: ``[N, Tr]`` finite real weights.
        beta: DPO temperature (> 0).
        label_smoothing: cDPO label-noise rate in ``[0, 0.5)``.

    Returns:
        ``(loss, metrics)``: a 0-d loss (float32, float64 for float64 inputs) and a dict of
        detached 0-d float32 tensors: ``rewards/chosen``, ``rewards/rejected``,
        ``rewards/accuracies``, ``rewards/margins`` (``beta *`` weighted log-ratios, batch means),
        ``logps/chosen``, ``logps/rejected`` (weighted policy log-prob sums, batch means).
        A pair with all weights 0 contributes ``log 2`` and no gradient.

    Example:
        >>> lp_c, lp_r = torch.randn(2, 5, requires_grad=True), torch.randn(2, 4, requires_grad=True)
        >>> loss, m = masked_dpo_loss(lp_c, lp_r, torch.randn(2, 5), torch.randn(2, 4),
        ...                           torch.ones(2, 5), torch.tensor([[1, -1, 0, 1], [1, 1, 1, 0]]))
        >>> loss.backward(); m["rewards/margins"].item()
    """
    wc, wr = check_pair_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               chosen_weights, rejected_weights)
    beta = check_real("beta", beta, positive=True)
    label_smoothing = check_real("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: expected a number in [0, 0.5), got {label_smoothing}")

    chosen_ratio = weighted_logratio(policy_chosen_logps, ref_chosen_logps, wc)
    rejected_ratio = weighted_logratio(policy_rejected_logps, ref_rejected_logps, wr)
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -F.logsigmoid(logits)
    if label_smoothing > 0:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    loss = losses.mean() if losses.numel() else losses.sum()

    with torch.no_grad():
        rc, rr = beta * chosen_ratio, beta * rejected_ratio
        metrics = pair_metrics(rc, rr, policy_chosen_logps, policy_rejected_logps, wc, wr, rc.dtype)
    return loss, metrics


def pair_metrics(rc: torch.Tensor, rr: torch.Tensor, policy_chosen_logps: torch.Tensor,
                 policy_rejected_logps: torch.Tensor, wc: torch.Tensor, wr: torch.Tensor,
                 dtype: torch.dtype) -> Dict[str, float]:
    """The metrics DPO trainers log, from the implicit rewards ``rc``, ``rr`` ``[N]``: rewards/chosen,
    rewards/rejected, rewards/accuracies, rewards/margins, and logps/chosen, logps/rejected (the
    weighted sums ``sum_t w_t * logp_t`` in ``dtype``, positions with ``w_t == 0`` left out)."""
    zero = torch.zeros((), dtype=dtype, device=rc.device)
    lp_c = (wc.to(dtype) * torch.where(wc != 0, policy_chosen_logps.to(dtype), zero)).sum(-1)
    lp_r = (wr.to(dtype) * torch.where(wr != 0, policy_rejected_logps.to(dtype), zero)).sum(-1)
    return {
        "rewards/chosen": metric(rc.mean()),
        "rewards/rejected": metric(rr.mean()),
        "rewards/accuracies": metric((rc > rr).float().mean()),
        "rewards/margins": metric((rc - rr).mean()),
        "logps/chosen": metric(lp_c.mean()),
        "logps/rejected": metric(lp_r.mean()),
    }

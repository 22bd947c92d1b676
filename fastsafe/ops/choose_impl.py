"""The tensor program of :func:`fastsafe.ops.choose` (what the ``fastsafe::choose`` op runs).

Sampling takes pre-drawn noise instead of a ``torch.Generator`` (a custom op cannot take one):
``torch.multinomial(p, 1, generator=g)`` is ``argmax(p / q)`` with ``q = empty_like(p).exponential_(1,
generator=g)`` (PyTorch's single-sample path), so drawing ``q`` the same way outside the op and
taking ``argmax(p / q)`` inside gives the same ids for the same generator state (see
:func:`sampling_noise`).
"""
from __future__ import annotations

from typing import Optional

import torch

NEG_INF = float("-inf")

__all__ = ["top_p_filter", "min_p_filter", "candidate_scores", "sampling_noise", "choose_ids"]


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Hugging Face ``TopPLogitsWarper`` semantics over ``[B, k]`` scores (keeps at least one)."""
    sorted_scores, order = torch.sort(scores, dim=-1, descending=False, stable=True)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1.0 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return scores.masked_fill(remove, NEG_INF)


def min_p_filter(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Hugging Face ``MinPLogitsWarper`` semantics over ``[B, k]`` scores (keeps the best)."""
    probs = scores.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return scores.masked_fill(probs < threshold, NEG_INF)


def _scores(values, logsumexp, candidate_reward, reward_weight, candidate_allowed):
    s = values - logsumexp.unsqueeze(-1)
    s = s.masked_fill(torch.isneginf(values), NEG_INF)   # all-banned rows: -inf - -inf would be NaN
    if candidate_reward is not None and reward_weight != 0.0:
        s = s + reward_weight * candidate_reward.float()
    if candidate_allowed is not None:
        s = s.masked_fill(~candidate_allowed, NEG_INF)
    return s


def candidate_scores(out, candidate_reward=None, reward_weight: float = 0.0,
                     candidate_allowed=None) -> torch.Tensor:
    """``[B, k]`` float32 ``s = (values - logsumexp) + reward_weight * candidate_reward``, ``-inf`` where disallowed."""
    return _scores(out.values, out.logsumexp, candidate_reward, reward_weight, candidate_allowed)


def sampling_noise(values: torch.Tensor, logsumexp: torch.Tensor, candidate_reward=None,
                   reward_weight: float = 0.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[B, k]`` Exp(1) noise drawn from ``generator`` exactly as ``torch.multinomial(probs, 1)`` draws it.

    ``probs`` (the softmax of the candidate scores) is contiguous with the scores' dtype, so the
    noise is too. Example:
        >>> q = sampling_noise(torch.zeros(2, 5), torch.zeros(2), generator=torch.Generator().manual_seed(0))
        >>> q.shape, bool((q > 0).all())
        (torch.Size([2, 5]), True)
    """
    dtype = torch.promote_types(values.dtype, logsumexp.dtype)
    if candidate_reward is not None and reward_weight != 0.0:
        dtype = torch.promote_types(dtype, torch.float32)
    return torch.empty(values.shape, dtype=dtype, device=values.device).exponential_(1.0, generator=generator)


def _rows(mask: torch.Tensor) -> list:
    return mask.nonzero().flatten().tolist()[:16]


def choose_ids(values, indices, logsumexp, candidate_reward, candidate_allowed, reward_weight: float,
               noise, top_p: float, min_p: float, fallback_id, check: bool = True) -> torch.Tensor:
    """``[B]`` int64 ids picked from the ``[B, k]`` candidates; ``noise=None`` is greedy.

    ``check``: refuse NaN rows, NaN rewards, rows with nothing allowed when ``fallback_id`` is None,
    and an invalid sampling distribution, with the errors of :func:`fastsafe.ops.choose` (in that
    order of precedence). The flags are read on the host once, at the end; the op turns the
    checks off while a CUDA graph is captured.
    """
    checks = []                        # (0-d bool flag, error to raise), in order of precedence
    if check:
        nan_rows = torch.isnan(logsumexp)
        checks.append((nan_rows.any(), lambda: ValueError(
            f"out.logsumexp: NaN in rows {_rows(nan_rows)}: the logits of these rows contain NaN at allowed tokens")))
    s = _scores(values, logsumexp, candidate_reward, reward_weight, candidate_allowed)
    if check and candidate_reward is not None:
        checks.append((torch.isnan(s).any(), lambda: ValueError("candidate_reward: contains NaN at allowed candidates")))
    dead = torch.isneginf(s).all(dim=-1)
    if check and fallback_id is None:
        checks.append((dead.any(), lambda: ValueError(
            f"candidate_allowed: every candidate of rows {_rows(dead)} is banned or disallowed; "
            f"pass fallback_id= (e.g. the EOS id) to emit it instead")))
    if noise is None:
        pick = s.argmax(dim=-1)                  # a dead row picks 0; overwritten below
    else:
        s = s.masked_fill(dead.unsqueeze(-1), 0.0)   # keep the math finite; overwritten below
        if top_p < 1.0:
            s = top_p_filter(s, top_p)
        if min_p > 0.0:
            s = min_p_filter(s, min_p)
        probs = s.softmax(dim=-1)
        if check and probs.numel():       # torch.multinomial's own check of its input
            checks.append((~((probs.max() < float("inf")) & (probs.min() >= 0)), lambda: RuntimeError(
                "probability tensor contains either `inf`, `nan` or element < 0")))
        pick = (probs / noise).argmax(dim=-1)
    if checks:                           # one host read for every flag
        hits = [checks[0][0].item()] if len(checks) == 1 else torch.stack([f for f, _ in checks]).tolist()
        for hit, (_, error) in zip(hits, checks):
            if hit:
                raise error()
    ids = indices.gather(1, pick.unsqueeze(-1)).squeeze(-1)
    if fallback_id is not None:
        ids = ids.masked_fill(dead, int(fallback_id))
    return ids

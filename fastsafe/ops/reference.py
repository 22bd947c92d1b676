"""Plain-PyTorch reference of the fused decoding step: the specification every backend matches.

The score of token ``v`` in row ``b`` is computed in float32 in exactly this order::

    s = logits[b, v] / temperature
    s = s - bias_scale * bias_table[positions[b], v]        # if bias_table
    s = s + reward_weight * dense_reward[b, v]              # if dense_reward
    s = -inf                                                # if the bitmask bit of v is 0

Selection: the k largest scores, descending; equal scores are ordered by lower token id; NaN
scores count as ``-inf`` for selection. ``logsumexp`` is over all V scores, so it is NaN when an
allowed score is NaN and ``-inf`` when no score is finite.
"""
from __future__ import annotations

import torch

from .bitmask import unpack_bitmask
from .types import SafeTopKInputs


def processed_scores(inp: SafeTopKInputs) -> torch.Tensor:
    """``[B, V]`` float32 processed scores (see the module docstring)."""
    s = inp.logits.float() / inp.temperature
    if inp.bias_table is not None:
        s = s - inp.bias_scale * inp.bias_table.index_select(0, inp.positions)
    if inp.dense_reward is not None:
        s = s + inp.reward_weight * inp.dense_reward.float()
    if inp.banned_bitmask is not None:
        allowed = unpack_bitmask(inp.banned_bitmask, inp.vocab_size)
        s = s.masked_fill(~allowed, float("-inf"))
    return s


def topk_lowest_id_ties(scores: torch.Tensor, k: int):
    """Top-k of ``[B, V]`` float32 ``scores`` with ties broken by lower index (NaN counts as -inf).

    Returns ``(values [B, k], indices [B, k] int64)``.
    """
    B, V = scores.shape
    key = scores.masked_fill(torch.isnan(scores), float("-inf"))
    if B == 0:
        return key.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=scores.device)
    top = torch.topk(key, k, dim=1, sorted=True)
    kth = top.values[:, k - 1:k]                                                # [B, 1]
    tie = key == kth
    if bool((tie.sum(1, keepdim=True) == (top.values == kth).sum(1, keepdim=True)).all()):
        # Fast path: no tie straddles the k-th place, so the set is right; order ties by id.
        idx = torch.sort(top.indices, dim=1).values
    else:
        above = key > kth
        need = k - above.sum(1, keepdim=True)                                   # ties to take
        take = above | (tie & (tie.cumsum(1) <= need))                          # exactly k per row
        idx = take.nonzero()[:, 1].reshape(B, k)                                # ascending ids
    vals = key.gather(1, idx)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), idx.gather(1, order)


def safe_topk_reference(inp: SafeTopKInputs):
    """Reference backend: returns ``(values [B,k] fp32, indices [B,k] int64, logsumexp [B] fp32)``."""
    s = processed_scores(inp)
    values, indices = topk_lowest_id_ties(s, inp.k)
    lse = torch.logsumexp(s, dim=1) if s.shape[0] else s.new_empty(0)
    return values, indices, lse

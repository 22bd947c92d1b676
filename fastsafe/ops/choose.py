"""``choose``: mix candidate rewards into the top-k log-probabilities and pick one token per row."""
from __future__ import annotations


import torch

from .types import SafeTopK
from .validate import check_real, check_same_device, check_tensor, FLOAT_DTYPES

NEG_INF = float("-inf")


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


def candidate_scores(out: SafeTopK, candidate_reward=None, reward_weight: float = 0.0,
                     candidate_allowed=None) -> torch.Tensor:
    """``[B, k]`` float32 ``s = (values - logsumexp) + reward_weight * candidate_reward``, ``-inf`` where disallowed."""
    s = out.values - out.logsumexp.unsqueeze(-1)
    s = s.masked_fill(torch.isneginf(out.values), NEG_INF)   # all-banned rows: -inf - -inf would be NaN
    if candidate_reward is not None and reward_weight != 0.0:
        s = s + reward_weight * candidate_reward.float()
    if candidate_allowed is not None:
        s = s.masked_fill(~candidate_allowed, NEG_INF)
    return s


def choose(out: SafeTopK, candidate_reward=None, reward_weight: float = 0.0, candidate_allowed=None,
           do_sample: bool = False, top_p: float = 1.0, min_p: float = 0.0, generator=None,
           fallback_id: int | None = None) -> torch.Tensor:
    """Pick one token per row from the candidates of :func:`safe_topk`.

    ``s = (out.values - out.logsumexp) + reward_weight * candidate_reward``; disallowed candidates
    get ``-inf``; then greedy argmax (ties: the earlier candidate, i.e. the higher log-prob / lower
    id), or top-p then min-p over the k candidates (Hugging Face's warper order after temperature
    and top-k, which ``safe_topk`` already applied) and sampling with ``generator``.

    Args:
        out: the :class:`SafeTopK` of ``safe_topk`` (``values``/``indices`` ``[B, k]``).
        candidate_reward: optional ``[B, k]`` float safety reward of each candidate.
        reward_weight: ``w`` in ``s = log p + w * r``.
        candidate_allowed: optional ``[B, k]`` bool; False drops the candidate (phrase-level bans).
        do_sample: sample instead of greedy argmax.
        top_p: nucleus threshold in ``(0, 1]``; ``min_p``: in ``[0, 1]``.
        generator: optional ``torch.Generator`` for reproducible sampling.
        fallback_id: token id returned for a row whose candidates are all disallowed (e.g. EOS);
            if None, such a row raises ``ValueError``.

    Returns:
        ``[B]`` int64 token ids.

    Example:
        >>> out = safe_topk(torch.randn(2, 100), 5)
        >>> ids = choose(out)                                       # greedy == argmax
        >>> ids = choose(out, do_sample=True, top_p=0.9, generator=torch.Generator().manual_seed(0))
    """
    for name in ("values", "indices", "logsumexp"):
        if not isinstance(getattr(out, name, None), torch.Tensor):
            raise TypeError(f"out: expected the SafeTopK result of safe_topk, got {type(out).__name__}")
    values = out.values
    check_tensor("out.values", values, ndims=(2,))
    B, k = values.shape
    if candidate_reward is not None:
        check_tensor("candidate_reward", candidate_reward, ndims=(2,), dtypes=FLOAT_DTYPES + (torch.float64,),
                     kind="a floating point type")
        check_same_device("candidate_reward", candidate_reward, values, "out.values")
        if tuple(candidate_reward.shape) != (B, k):
            raise ValueError(f"candidate_reward: expected shape [B, k] = [{B}, {k}], got {tuple(candidate_reward.shape)}")
    if candidate_allowed is not None:
        check_tensor("candidate_allowed", candidate_allowed, ndims=(2,), dtypes=(torch.bool,), kind="bool")
        check_same_device("candidate_allowed", candidate_allowed, values, "out.values")
        if tuple(candidate_allowed.shape) != (B, k):
            raise ValueError(f"candidate_allowed: expected shape [B, k] = [{B}, {k}], got {tuple(candidate_allowed.shape)}")
    reward_weight = check_real("reward_weight", reward_weight)
    top_p = check_real("top_p", top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected 0 < top_p <= 1, got {top_p}")
    min_p = check_real("min_p", min_p)
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p: expected 0 <= min_p <= 1, got {min_p}")
    if fallback_id is not None:          # a token id: an int >= 0 (callers that know V also check < V)
        if isinstance(fallback_id, torch.Tensor) and fallback_id.numel() == 1 and not fallback_id.is_floating_point():
            fallback_id = int(fallback_id.item())
        if isinstance(fallback_id, bool) or not isinstance(fallback_id, int) or fallback_id < 0:
            raise ValueError(f"fallback_id: expected a token id (an int >= 0) or None, got {fallback_id!r}")

    nan_rows = torch.isnan(out.logsumexp)
    if bool(nan_rows.any()):
        rows = nan_rows.nonzero().flatten().tolist()
        raise ValueError(f"out.logsumexp: NaN in rows {rows[:16]}: the logits of these rows contain NaN "
                         f"at allowed tokens")

    s = candidate_scores(out, candidate_reward, reward_weight, candidate_allowed)
    if candidate_reward is not None and bool(torch.isnan(s).any()):
        raise ValueError("candidate_reward: contains NaN at allowed candidates")
    dead = torch.isneginf(s).all(dim=-1)
    any_dead = bool(dead.any())
    if any_dead and fallback_id is None:
        rows = dead.nonzero().flatten().tolist()
        raise ValueError(f"candidate_allowed: every candidate of rows {rows[:16]} is banned or disallowed; "
                         f"pass fallback_id= (e.g. the EOS id) to emit it instead")
    if any_dead:
        s = s.masked_fill(dead.unsqueeze(-1), 0.0)   # keep the math finite; overwritten below

    if not do_sample:
        pick = s.argmax(dim=-1)
    else:
        if top_p < 1.0:
            s = top_p_filter(s, top_p)
        if min_p > 0.0:
            s = min_p_filter(s, min_p)
        probs = s.softmax(dim=-1)
        pick = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    ids = out.indices.gather(1, pick.unsqueeze(-1)).squeeze(-1)
    if any_dead:
        ids = ids.masked_fill(dead, int(fallback_id))
    return ids

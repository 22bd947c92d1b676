"""``choose``: mix candidate rewards into the top-k log-probabilities and pick one token per row."""
from __future__ import annotations

import torch

from .choose_impl import NEG_INF, candidate_scores, min_p_filter, sampling_noise, top_p_filter
from .custom_ops import choose_op
from .types import SafeTopK
from .validate import check_real, check_same_device, check_tensor, FLOAT_DTYPES

# the filters and score helpers of choose_impl are importable from here too
__all__ = ["choose", "NEG_INF", "candidate_scores", "min_p_filter", "sampling_noise", "top_p_filter"]


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

    The pick runs as the op ``torch.ops.fastsafe.choose`` (see :mod:`fastsafe.ops.custom_ops`); the
    sampling noise is drawn here from ``generator``, exactly as ``torch.multinomial`` would draw it,
    so seeded results are those of ``torch.multinomial``. Under ``torch.compile`` pass
    ``generator=None`` (dynamo cannot trace a ``torch.Generator``): the noise then comes from the
    global RNG (Inductor's own unless ``torch._inductor.config.fallback_random = True``).

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

    noise = None
    if do_sample:
        noise = sampling_noise(values, out.logsumexp, candidate_reward, reward_weight, generator)
    return choose_op(values, out.indices, out.logsumexp, candidate_reward, candidate_allowed, reward_weight,
                     noise, top_p, min_p, None if fallback_id is None else int(fallback_id))

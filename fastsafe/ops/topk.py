"""``safe_topk``: the fused decoding step over ``[B, V]`` logits."""
from __future__ import annotations

import torch

from .custom_ops import safe_topk_op_args
from .dispatch import backend_for
from .types import SafeTopK
from .validate import validate_safe_topk


def safe_topk(logits: torch.Tensor, k: int, *, bias_table=None, positions=None, bias_scale: float = 1.0,
              banned_bitmask=None, dense_reward=None, reward_weight: float = 0.0,
              temperature: float = 1.0, backend: str | None = None) -> SafeTopK:
    """One pass over the logits: TSDI bias, bans, dense reward, top-k and an exact logsumexp.

    ``score = logits / temperature - bias_scale * bias_table[positions] + reward_weight * dense_reward``,
    then ``-inf`` wherever ``banned_bitmask`` has a 0 bit. Only ``[B, k]`` and ``[B]`` are written.

    Args:
        logits: ``[B, V]`` float32, float16 or bfloat16 (any row stride).
        k: number of candidates, ``1 <= k <= V``.
        bias_table: optional ``[L, V]`` (or ``[V]``) float TSDI bias (converted to float32; keep it
            float32 to avoid a copy per call).
        positions: ``[B]`` integer (or an int for every row) response position of each row; the
            bias row is ``bias_table[clamp(positions, 0, L-1)]``. Required when ``L > 1``.
        bias_scale: multiplier of the bias (``tsdi_scale``).
        banned_bitmask: optional packed int32 ``[B, ceil(V/32)]`` or ``[ceil(V/32)]`` (shared by
            every row); **bit = 1 means allowed** (see :func:`pack_bitmask`).
        dense_reward: optional ``[B, V]`` float reward per token (cast to ``logits.dtype``).
        reward_weight: multiplier of ``dense_reward``.
        temperature: ``> 0``; divides the logits before anything else.
        backend: ``"torch" | "cpp" | "triton" | "cuda"``; default: the fastest available for the
            device (``FASTSAFE_BACKEND`` overrides). Each backend is its own torch op
            (``torch.ops.fastsafe.safe_topk_<backend>``, see :mod:`fastsafe.ops.custom_ops`); under
            ``torch.compile`` the choice is made once, when the graph is traced.

    Returns:
        :class:`SafeTopK` with ``values [B, k]`` float32 (descending; ties by lower id),
        ``indices [B, k]`` int64, ``logsumexp [B]`` float32, ``all_banned [B]`` bool.
        ``values - logsumexp[:, None]`` are exact log-probabilities of the processed distribution.

    NaN: a NaN score is never selected (it counts as ``-inf`` for top-k), but it makes the row's
    ``logsumexp`` NaN, so the row's log-probabilities are NaN and :func:`choose` refuses the row.
    A row with no finite score returns ``-inf`` values and ``all_banned = True``.

    Example:
        >>> logits = torch.randn(2, 1000)
        >>> allowed = torch.ones(1000, dtype=torch.bool); allowed[:10] = False
        >>> out = safe_topk(logits, 5, banned_bitmask=pack_bitmask(allowed))
        >>> out.indices.shape, bool((out.indices >= 10).all())
        (torch.Size([2, 5]), True)
    """
    inp = validate_safe_topk(logits, k, bias_table=bias_table, positions=positions, bias_scale=bias_scale,
                             banned_bitmask=banned_bitmask, dense_reward=dense_reward,
                             reward_weight=reward_weight, temperature=temperature)
    B = inp.batch
    if B == 0:
        dev = inp.logits.device
        return SafeTopK(torch.empty(0, inp.k, device=dev), torch.empty(0, inp.k, dtype=torch.int64, device=dev),
                        torch.empty(0, device=dev), torch.empty(0, dtype=torch.bool, device=dev))
    name = backend_for(inp.logits, backend)          # under torch.compile: a trace-time constant
    values, indices, lse = getattr(torch.ops.fastsafe, "safe_topk_" + name).default(*safe_topk_op_args(inp))
    return SafeTopK(values, indices, lse, torch.isneginf(lse))

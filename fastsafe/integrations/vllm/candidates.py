"""The text check's top-k candidates on the CPU without a full top-k pass over ``[B, V]``.

:func:`top_candidates` returns exactly what ``fastsafe.ops.safe_topk(x, k)`` returns as values and
indices (ties by the lower id), and ``x.amax(-1)``, from one max-reduction over chunks of
``chunk`` consecutive tokens: the ``k`` chunks with the highest maxima (ties: the lower chunk) hold
the top ``k`` tokens, so ``safe_topk`` runs on those ``k * chunk`` tokens only, gathered in id
order. (Each chunk ranked before a top-k token's chunk holds a token ranked before it, and fewer
than ``k`` tokens are.) ``safe_topk`` also computes an exact logsumexp over every token, which the
adapter does not use: at ``B = 32, V = 49,152`` its pass is the largest part of a step on one CPU
thread. Rows with a NaN, or with fewer than ``k`` finite scores, take the full pass (same results).

Example:
    >>> import torch
    >>> x = torch.tensor([[0.0, 5.0, 1.0, 5.0, 2.0, 3.0, 4.0, 0.5]])
    >>> values, indices, row_max = top_candidates(x, 2, chunk=2)
    >>> values.tolist(), indices.tolist(), row_max.tolist()
    ([[5.0, 5.0]], [[1, 3]], [5.0])
"""
from __future__ import annotations

import os

import numpy as np
import torch

from fastsafe.ops import backend_for, safe_topk
from fastsafe.ops.dispatch import native_module

__all__ = ["top_candidates", "CHUNK"]

#: Tokens per chunk (``V = 49,152``: 192 chunks, 2,560 tokens gathered at ``k = 10``).
CHUNK = 256


_NATIVE: dict = {}


def _topk(x: torch.Tensor, k: int):
    """``safe_topk(x, k)``'s values and indices; the C++ kernel called directly where ``safe_topk``
    would pick it (``x``: float ``[B >= 1, V]`` rows of unit stride, ``1 <= k <= V``, checked by the
    caller). Its Python layer (argument checks, backend choice, the op dispatcher) costs more than
    the kernel on small inputs when the step starts with cold caches."""
    env = os.environ.get("FASTSAFE_BACKEND")
    fn = _NATIVE.get(env)
    if fn is None:
        fn = native_module().safe_topk_cpu if backend_for(x) == "cpp" else False
        _NATIVE[env] = fn
    if fn is False or x.device.type != "cpu":
        top = safe_topk(x, k)
        return top.values, top.indices
    values, indices, _ = fn(x, k, None, None, 1.0, None, None, 0.0, 1.0)
    return values, indices


_OFFSETS: dict = {}


def _offsets(n: int, device) -> torch.Tensor:
    """``arange(n)`` on ``device`` (kept)."""
    hit = _OFFSETS.get((n, device))
    if hit is None:
        if len(_OFFSETS) > 64:
            _OFFSETS.clear()
        hit = _OFFSETS[(n, device)] = torch.arange(n, device=device)
    return hit


def _full(x: torch.Tensor, k: int):
    return _topk(x, k) + (x.amax(dim=-1),)


def top_candidates(x: torch.Tensor, k: int, *, chunk: int = CHUNK):
    """The top ``k`` scores of each row and the row maxima, through chunk maxima (see the module docstring).

    Args:
        x: ``[B, V]`` float32 / float16 / bfloat16 logits on the CPU.
        k: candidates per row, ``1 <= k <= V``.
        chunk: tokens per chunk.

    Returns:
        ``values [B, k]`` float32 (descending), ``indices [B, k]`` int64 (as ``safe_topk(x, k)``),
        ``row_max [B]`` in ``x.dtype`` (``x.amax(-1)``).
    """
    B, V = x.shape
    if x.device.type != "cpu":
        raise ValueError(f"x: expected a CPU tensor (other devices take safe_topk), got {x.device}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not 1 <= k <= V:
        raise ValueError(f"x, k: expected float32/float16/bfloat16 logits [B, V] and 1 <= k <= V, got {x.dtype} "
                         f"{list(x.shape)} and k={k!r}")
    if B == 0:
        top = safe_topk(x, k)
        return top.values, top.indices, x.amax(dim=-1) if V else x.new_empty(0)
    if x.stride(1) != 1:
        x = x.contiguous()
    n = V // chunk if chunk else 0
    if n <= k:
        return _full(x, k)
    cm = x[:, :n * chunk].unflatten(1, (n, chunk)).amax(dim=-1)                 # [B, n] chunk maxima
    tail = V - n * chunk
    if tail:
        cm = torch.cat([cm, x[:, n * chunk:].amax(dim=-1, keepdim=True)], dim=1)
    row_max = cm.amax(dim=-1)
    if np.isnan(row_max.float().numpy()).any():      # a NaN hides its chunk's other scores from the ranking
        return _full(x, k)
    sel = _topk(cm.contiguous(), k)[1].sort(dim=1).values                              # [B, k] chunks, ascending
    if tail:
        idx = (sel.unsqueeze(2) * chunk + _offsets(chunk, x.device)).flatten(1)      # ids in order
        buf = x.gather(1, idx.clamp(max=V - 1))
        buf.masked_fill_(idx >= V, float("-inf"))  # past V (the short last chunk): never chosen below
        values, at = _topk(buf, k)
        ids = idx.gather(1, at)
    else:                                          # the chunks' tokens in id order, [B, k * chunk]
        if x.is_contiguous():                      # whole chunks as rows of a [B * n, chunk] view (row copies)
            buf = x.view(B * n, chunk).index_select(0, (sel + _offsets(B, x.device)[:, None] * n).flatten())
            buf = buf.view(B, k * chunk)
        else:
            buf = x.unflatten(1, (n, chunk)).gather(1, sel.unsqueeze(2).expand(B, k, chunk)).flatten(1)
        values, at = _topk(buf, k)
        a = at.numpy()
        ids = torch.from_numpy(np.take_along_axis(sel.numpy(), a // chunk, axis=1) * chunk + a % chunk)
    if not np.isfinite(values.numpy()[:, -1]).all():    # < k finite scores: -inf slots pick ids differently
        return _full(x, k)
    return values, ids, row_max

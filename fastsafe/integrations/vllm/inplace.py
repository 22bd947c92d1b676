"""In-place edits of vLLM's logits by the adapter's step: token bans and the all-banned fallback.

Two forms of each, with the same results:

- **sparse** (CPU tensors only; the default there): only the banned entries are touched. A
  matcher's packed bitmask (``[b, ceil(V/32)]`` int32, bit = 1 allowed) has few zero bits, so the
  words holding one are found first (``b * V / 32`` compares), then only their bits are unpacked
  (numpy on the host arrays). The cost is linear in the banned tokens, not in ``V``: at ``B = 32,
  V = 49,152`` about 0.1-0.2 ms where unpacking the mask and a masked fill over ``[B, V]`` took
  ~8 ms on one CPU thread.
- **dense** (the default on other devices): unpack the mask to ``[b, V]`` and fill; no host sync, so
  a step stays capturable in a CUDA graph, and on a GPU the ``[b, V]`` passes cost microseconds.

Both also report, for the audit, whether a token at the row's maximum (before the bans) was banned
and the lowest such token id: the intervention "the model's best token was banned". A token a
previous matcher of the same row already banned is not reported again.

Example:
    >>> import torch
    >>> from fastsafe.ops import pack_bitmask
    >>> logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    >>> allowed = torch.tensor([[True, False, True, True]])
    >>> best, hit = ban_(logits, torch.tensor([0]), pack_bitmask(allowed), logits.amax(-1), sparse=True)
    >>> logits.tolist(), best.tolist(), hit.tolist()
    ([[0.0, -inf, 1.0, 2.0]], [1], [True])
"""
from __future__ import annotations

import numpy as np
import torch

from fastsafe.ops.bitmask import unpack_bitmask

__all__ = ["banned_positions", "ban_", "ban_max_", "fallback_"]

_NEG_INF = float("-inf")
_HOST_DTYPES = (torch.float32, torch.float64, torch.float16)     # logits the sparse form edits through numpy


def banned_positions(words: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(row, token)`` pairs whose bit is 0 in a packed bitmask (the banned tokens), sparse.

    Args:
        words: ``[b, ceil(V/32)]`` int32 (bit = 1 allowed), on the CPU.
        vocab_size: ``V`` (padding bits past it are ignored).

    Returns:
        ``rows [n]``, ``tokens [n]`` int64 (CPU), ordered by row then token id.

    Example:
        >>> from fastsafe.ops import pack_bitmask
        >>> m = pack_bitmask(torch.tensor([[True, False, True], [False, True, True]]))
        >>> [t.tolist() for t in banned_positions(m, 3)]
        [[0, 1], [1, 0]]
    """
    rows, tokens = _banned(words.contiguous().numpy(), vocab_size)
    return torch.from_numpy(rows), torch.from_numpy(tokens)


def _banned(w: np.ndarray, vocab_size: int, cols=None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`banned_positions` on the host array ``w`` (``[b, W]`` int32); ``cols``: the ascending
    word columns that hold a banned bit in some row (the others are skipped), if known."""
    if cols is None:
        W = w.shape[1]
        at = np.flatnonzero(w.reshape(-1) != -1)                    # the words holding a banned bit
        wr, wc, vals = at // W, at % W, w.reshape(-1)[at]
    else:
        sub = w[:, cols]
        wr, j = np.nonzero(sub != -1)                               # row-major: by row, then column
        wc, vals = cols[j], sub[wr, j]
    bits = np.unpackbits(vals.astype("<i4").view(np.uint8).reshape(-1, 4), axis=1,
                         bitorder="little")                          # [n_words, 32], 1 = allowed
    j, b = np.nonzero(bits == 0)
    rows, tokens = wr[j].astype(np.int64), wc[j].astype(np.int64) * 32 + b
    if vocab_size % 32:                                               # padding bits of the last word
        keep = tokens < vocab_size
        rows, tokens = rows[keep], tokens[keep]
    return rows, tokens


#: A sparse ban splits off the tokens every row bans when they fill more than this many words (then
#: one column fill and one column gather serve all rows, instead of per-entry writes).
SHARED_MIN_WORDS = 32
_SHARED: dict = {}


def _shared_bans(union: np.ndarray, V: int):
    """The token ids every row bans (sorted int64 tensor, cached by content), or ``None`` when few.

    ``union``: ``[ceil(V/32)]`` int32, the bitwise or of the rows' packed masks (bit 0: banned in every row)."""
    if int((union != -1).sum()) < SHARED_MIN_WORDS:
        return None
    key = (V, union.tobytes())
    hit = _SHARED.get(key)
    if hit is None:
        bits = np.unpackbits(union.astype("<i4").view(np.uint8), bitorder="little")[:V]
        hit = torch.from_numpy(np.flatnonzero(bits == 0).astype(np.int64))
        if len(_SHARED) >= 16:
            _SHARED.clear()
        _SHARED[key] = hit
    return hit if len(hit) else None        # (the padding bits past V count as banned in the words)


def ban_(logits: torch.Tensor, rows: torch.Tensor, words: torch.Tensor, row_max: torch.Tensor, *,
         sparse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Set the tokens ``words`` bans to ``-inf`` in the logits rows ``rows`` (in place).

    Args:
        logits: ``[B, V]`` float, modified in place.
        rows: ``[b]`` int64, the logits rows of the ``b`` mask rows (device).
        words: ``[b, ceil(V/32)]`` int32 packed "allowed" mask of each of those rows.
        row_max: ``[b]`` float, each row's maximum before any ban (for the audit).
        sparse: the sparse form (CPU; see the module docstring) or the dense one.

    Returns:
        ``best [b]`` int64 (the lowest banned token id at ``row_max``, 0 where none) and ``hit [b]``
        bool (a finite token at the row's maximum was banned here).
    """
    V = logits.shape[1]
    if sparse:                       # the CPU: small host arrays (numpy), a few torch ops on the logits
        bmax, bid = _ban_sparse(logits, rows, words)
        hit = np.isfinite(bmax) & (bmax == row_max.float().numpy())
        return torch.from_numpy(np.where(hit, bid, 0)), torch.from_numpy(hit)
    allowed = unpack_bitmask(words, V)
    x = logits.index_select(0, rows)
    at_max = ~allowed & (x == row_max[:, None].to(x.dtype)) & torch.isfinite(x)
    hit = at_max.any(dim=-1)
    ids = torch.arange(V, device=logits.device)
    best = torch.where(at_max, ids, V).amin(dim=-1)
    x.masked_fill_(~allowed, _NEG_INF)
    logits.index_copy_(0, rows, x)
    return torch.where(hit, best, 0), hit


def ban_max_(logits: torch.Tensor, rows: torch.Tensor, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse form of :func:`ban_` (CPU) when the row maxima are not known yet: in place, it
    returns the highest value it banned in each row and the lowest id at it.

    Each row's maximum before the bans is ``max(banned_max, the row's maximum after them)``, so a
    caller that reduces the rows after the bans anyway needs no reduction before them: ``hit =
    isfinite(banned_max) & (banned_max == that maximum)`` and ``best = banned_id`` are then
    :func:`ban_`'s results.

    Args:
        logits, rows, words: as for :func:`ban_` (CPU tensors).

    Returns:
        ``banned_max [b]`` float32 (``-inf`` where nothing finite was banned; NaN where a NaN was)
        and ``banned_id [b]`` int64 (the lowest banned id holding ``banned_max``, ``V`` where none).

    Example:
        >>> from fastsafe.ops import pack_bitmask
        >>> logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
        >>> bmax, bid = ban_max_(logits, torch.tensor([0]), pack_bitmask(torch.tensor([[False, True, False, True]])))
        >>> logits.tolist(), bmax.tolist(), bid.tolist()
        ([[-inf, 3.0, -inf, 2.0]], [1.0], [2])
    """
    bmax, bid = _ban_sparse(logits, rows, words)
    return torch.from_numpy(bmax), torch.from_numpy(bid)


def _ban_sparse(logits: torch.Tensor, rows: torch.Tensor, words: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """:func:`ban_max_` on host arrays (``banned_max`` float32, ``banned_id`` int64)."""
    V = logits.shape[1]
    b = rows.shape[0]
    w = words.contiguous().numpy()
    shared = cols = None
    if b >= 2:
        cols = np.flatnonzero(np.bitwise_and.reduce(w, axis=0) != -1)      # words with a ban in some row
        if len(cols) >= SHARED_MIN_WORDS:              # (else fewer words are banned in every row)
            union = np.bitwise_or.reduce(w, axis=0)                        # bit 0: banned in every row
            shared = _shared_bans(union, V)            # (a large set's single-token entities)
            if shared is not None:
                w = w | ~union                         # the rest: each row's own bans
    rn, tn = _banned(w, V, cols)
    ln = logits.numpy() if logits.dtype in _HOST_DTYPES and not logits.requires_grad else None
    lrn = rows.numpy()[rn]
    v = (ln[lrn, tn] if ln is not None else logits[torch.from_numpy(lrn), torch.from_numpy(tn)].float().numpy())
    v = v.astype(np.float32, copy=False)
    bmax = np.full(b, _NEG_INF, dtype=np.float32)
    np.maximum.at(bmax, rn, v)                          # NaN propagates (as amax does)
    bid = np.full(b, V, dtype=np.int64)
    at = (v == bmax[rn]) & np.isfinite(v)
    np.minimum.at(bid, rn[at], tn[at])
    if shared is not None:
        every = b == logits.shape[0] and bool((rows == torch.arange(b)).all())
        xs = logits.index_select(1, shared) if every else logits[rows[:, None], shared[None, :]]
        smax, sarg = xs.float().max(dim=1)                 # first index of the max: the lowest id
        smax, sarg = smax.numpy(), shared.numpy()[sarg.numpy()]
        bid = np.where(smax > bmax, sarg, np.where(smax == bmax, np.minimum(bid, sarg), bid))
        bmax = np.maximum(bmax, smax)
        if every:
            logits.index_fill_(1, shared, _NEG_INF)
        else:
            logits.index_put_((rows[:, None], shared[None, :]), torch.tensor(_NEG_INF, dtype=logits.dtype))
    if ln is not None:
        ln[lrn, tn] = _NEG_INF
    else:
        logits.index_put_((torch.from_numpy(lrn), torch.from_numpy(tn)), torch.tensor(_NEG_INF, dtype=logits.dtype))
    return bmax, bid


def fallback_(logits: torch.Tensor, rows: torch.Tensor, dead: torch.Tensor, eos_token_id: int, *,
              sparse: bool, all_rows: bool = False) -> None:
    """Rows left with nothing get EOS only (``0`` at ``eos_token_id``, ``-inf`` elsewhere), in place.

    Args:
        logits: ``[B, V]`` float.
        rows: ``[b]`` int64 logits rows.
        dead: ``[b]`` bool, which of them have no allowed token.
        eos_token_id: the token a dead row emits.
        sparse: touch only the dead rows (CPU: reads ``dead`` on the host); else a sync-free
            ``[b, V]`` pass.
        all_rows: ``rows`` is ``0..B-1`` (the dense form then works on ``logits`` itself).
    """
    if sparse:
        if not bool(dead.any()):
            return
        d = rows[dead]
        logits.index_fill_(0, d, _NEG_INF)
        logits[d, eos_token_id] = 0.0
        return
    x = logits if all_rows else logits.index_select(0, rows)
    x.masked_fill_(dead[:, None], _NEG_INF)
    x[:, eos_token_id] = torch.where(dead, 0.0, x[:, eos_token_id])
    if not all_rows:
        logits.index_copy_(0, rows, x)

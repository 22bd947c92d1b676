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

__all__ = ["banned_positions", "ban_", "fallback_"]

_NEG_INF = float("-inf")


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
    w = words.contiguous().numpy()
    W = w.shape[1]
    at = np.flatnonzero(w.reshape(-1) != -1)                        # the words holding a banned bit
    bits = np.unpackbits(w.reshape(-1)[at].astype("<i4").view(np.uint8).reshape(-1, 4), axis=1,
                         bitorder="little")                          # [n_words, 32], 1 = allowed
    j, b = np.nonzero(bits == 0)
    rows, tokens = at[j] // W, (at[j] % W) * 32 + b
    if vocab_size % 32:                                               # padding bits of the last word
        keep = tokens < vocab_size
        rows, tokens = rows[keep], tokens[keep]
    return torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(tokens.astype(np.int64))


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
    return hit


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
    b = rows.shape[0]
    if sparse:                       # the CPU: small host arrays (numpy), a few torch ops on the logits
        w = words.contiguous().numpy()
        union = np.bitwise_or.reduce(w, axis=0) if b >= 2 else None       # bit 0: banned in every row
        shared = None if union is None else _shared_bans(union, V)  # (a large set's single-token entities)
        if shared is not None:
            w = w | ~union                                 # the rest: each row's own bans
        r, tok = banned_positions(torch.from_numpy(w), V)
        lr = torch.from_numpy(rows.numpy()[r.numpy()])
        v = logits[lr, tok].float().numpy()
        rn, tn = r.numpy(), tok.numpy()
        m = row_max.float().numpy()
        at = (v == m[rn]) & np.isfinite(v)
        best = np.full(b, V, dtype=np.int64)
        np.minimum.at(best, rn[at], tn[at])
        neg = torch.tensor(_NEG_INF, dtype=logits.dtype)
        if shared is not None:
            every = b == logits.shape[0] and bool((rows == torch.arange(b)).all())
            xs = logits.index_select(1, shared) if every else logits[rows[:, None], shared[None, :]]
            smax, sarg = xs.float().max(dim=1)                 # first index of the max: the lowest id
            smax, sarg = smax.numpy(), shared.numpy()[sarg.numpy()]
            best = np.where((smax == m) & np.isfinite(smax), np.minimum(best, sarg), best)
            if every:
                logits.index_fill_(1, shared, _NEG_INF)
            else:
                logits.index_put_((rows[:, None], shared[None, :]), neg)
        hit = best < V
        logits.index_put_((lr, tok), neg)
        return torch.from_numpy(np.where(hit, best, 0)), torch.from_numpy(hit)
    allowed = unpack_bitmask(words, V)
    x = logits.index_select(0, rows)
    at_max = ~allowed & (x == row_max[:, None].to(x.dtype)) & torch.isfinite(x)
    hit = at_max.any(dim=-1)
    ids = torch.arange(V, device=logits.device)
    best = torch.where(at_max, ids, V).amin(dim=-1)
    x.masked_fill_(~allowed, _NEG_INF)
    logits.index_copy_(0, rows, x)
    return torch.where(hit, best, 0), hit


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

"""Packed token bitmasks: ``int32`` words, ``ceil(V / 32)`` per row, **bit = 1 means allowed**.

Token ``t`` lives in word ``t // 32`` at bit ``t % 32`` (least significant bit first), the
convention of xgrammar, vLLM and SGLang, so a grammar mask and a safety mask combine with ``&``.
"""
from __future__ import annotations

import torch

__all__ = ["pack_bitmask", "unpack_bitmask", "bitmask_words", "full_bitmask", "ban_tokens_", "fit_bitmask"]

_SHIFTS_CACHE: dict = {}


def bitmask_words(vocab_size: int) -> int:
    """Number of ``int32`` words that hold one row of ``vocab_size`` bits."""
    return (int(vocab_size) + 31) // 32


def _shifts(device: torch.device, dtype=torch.int64) -> torch.Tensor:
    key = (str(device), dtype)
    t = _SHIFTS_CACHE.get(key)
    if t is None:
        t = torch.arange(32, dtype=dtype, device=device)
        _SHIFTS_CACHE[key] = t
    return t


def pack_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """Pack a boolean "allowed" mask into ``int32`` words.

    Args:
        allowed: ``[..., V]`` bool (True = token allowed).

    Returns:
        ``[..., ceil(V/32)]`` int32; bits past ``V`` in the last word are 0.

    Example:
        >>> allowed = torch.ones(2, 40, dtype=torch.bool); allowed[0, 3] = False
        >>> words = pack_bitmask(allowed)            # [2, 2] int32
        >>> bool(unpack_bitmask(words, 40)[0, 3])
        False
    """
    if not isinstance(allowed, torch.Tensor):
        raise TypeError(f"allowed: expected a torch.Tensor of dtype bool, got {type(allowed).__name__}")
    if allowed.dtype != torch.bool:
        raise TypeError(f"allowed: expected dtype torch.bool, got {allowed.dtype}")
    if allowed.dim() < 1:
        raise ValueError("allowed: expected at least 1 dimension [..., V], got a scalar")
    v = allowed.shape[-1]
    w = bitmask_words(v)
    pad = w * 32 - v
    a = allowed
    if pad:
        a = torch.nn.functional.pad(a, (0, pad), value=False)
    a = a.reshape(*allowed.shape[:-1], w, 32).to(torch.int64)
    words = (a << _shifts(a.device)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_bitmask(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Unpack ``int32`` words into a boolean "allowed" mask.

    Args:
        words: ``[..., ceil(V/32)]`` int32.
        vocab_size: ``V``.

    Returns:
        ``[..., V]`` bool (True = allowed).

    Example:
        >>> unpack_bitmask(torch.tensor([5], dtype=torch.int32), 4)
        tensor([ True, False,  True, False])
    """
    if not isinstance(words, torch.Tensor) or words.dtype != torch.int32:
        got = words.dtype if isinstance(words, torch.Tensor) else type(words).__name__
        raise TypeError(f"words: expected an int32 torch.Tensor, got {got}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size: expected a positive int, got {vocab_size!r}")
    w = bitmask_words(vocab_size)
    if words.dim() < 1 or words.shape[-1] != w:
        raise ValueError(
            f"words: expected last dimension ceil({vocab_size}/32) = {w}, got shape {tuple(words.shape)}")
    # arithmetic shift of int32 keeps bit j at position 0; "& 1" drops the sign extension
    bits = (words.unsqueeze(-1) >> _shifts(words.device, torch.int32)) & 1
    return bits.reshape(*words.shape[:-1], w * 32)[..., :vocab_size].bool()


def full_bitmask(vocab_size: int, batch: int | None = None, device=None) -> torch.Tensor:
    """A bitmask that allows every token: ``[ceil(V/32)]`` or ``[batch, ceil(V/32)]`` int32."""
    allowed = torch.ones(vocab_size if batch is None else (batch, vocab_size), dtype=torch.bool, device=device)
    return pack_bitmask(allowed)


def ban_tokens_(words: torch.Tensor, token_ids, row: int | None = None) -> torch.Tensor:
    """Clear the bits of ``token_ids`` (ban them) in place; ``row`` selects a row of a 2-D mask.

    Example:
        >>> m = full_bitmask(64); ban_tokens_(m, [0, 33]); unpack_bitmask(m, 64).sum().item()
        62
    """
    ids = torch.as_tensor(token_ids, dtype=torch.int64, device=words.device).reshape(-1)
    if ids.numel() == 0:
        return words
    target = words if row is None else words[row]
    uniq = torch.unique(ids)
    clear = torch.zeros(target.shape[-1], dtype=torch.int64, device=words.device)
    clear.index_add_(0, uniq // 32, torch.ones_like(uniq) << (uniq % 32))  # distinct bits: sum == OR
    clear = torch.where(clear >= 2**31, clear - 2**32, clear).to(torch.int32)
    target.bitwise_and_(~clear)
    return words


def fit_bitmask(mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Widen a ``[..., W']`` bitmask built for fewer tokens to ``[..., ceil(vocab_size/32)]``.

    The tokens beyond the matcher's vocabulary (padding rows of a model's embedding) are allowed.
    A mask wider than ``vocab_size`` is a tokenizer/model mismatch and raises ``ValueError``.

    Example:
        >>> fit_bitmask(torch.zeros(2, 1, dtype=torch.int32), 64).shape
        torch.Size([2, 2])
    """
    W = bitmask_words(vocab_size)
    if mask.shape[-1] == W:
        return mask
    if mask.shape[-1] > W:
        raise ValueError(f"banned_bitmask: the matcher covers {mask.shape[-1] * 32} tokens but the logits have "
                         f"V = {vocab_size}; tokenizer/model vocabulary mismatch")
    return torch.nn.functional.pad(mask, (0, W - mask.shape[-1]), value=-1)

"""The per-vocabulary tables of the device text check, cached by what they depend on.

:func:`~fastsafe.safety.token_chars.token_slots` (each token's character classes, ``[V + 1, max_len]``)
and :meth:`~fastsafe.safety.char_automaton.CharAlphabet.codepoint_classes` (``[CP_LIMIT, 2]``) depend only
on the tokenizer and the alphabet (the folded characters of the phrases and their run caps), not on
the phrases themselves. A matcher built for a request (the vLLM adapter's ``banned_phrases``) would
spend most of its build on them (about 0.7-1.6 s of a 1,000-phrase build with the SmolLM2 tokenizer);
here they are kept in a small LRU keyed by ``(tokenizer_fingerprint, vocab_size, alphabet.key)``, and
:func:`~fastsafe.safety.char_automaton.build_char_automaton` gives small phrase sets a canonical
alphabet so that typical request sets share one entry.

Memory: at most :data:`MAX_ALPHABETS` entries (each about ``4 * (V + 1) * (max_len + 6)`` bytes plus
0.8 MB: ~5 MB for a 49k vocabulary) plus :data:`MAX_TOKENIZERS` lists of token bytes. The cached
arrays are shared by every matcher built from them; nothing writes into them.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from .char_automaton import CharAlphabet
from .token_chars import token_bytes, token_slots

__all__ = ["text_tables", "clear_text_tables", "cache_info", "MAX_ALPHABETS", "MAX_TOKENIZERS"]

#: Alphabets (per tokenizer) whose tables are kept.
MAX_ALPHABETS = 4
#: Tokenizers whose token bytes are kept.
MAX_TOKENIZERS = 2

_lock = threading.Lock()
_tables: "OrderedDict[tuple, tuple[dict, np.ndarray]]" = OrderedDict()
_bytes: "OrderedDict[tuple, list[bytes]]" = OrderedDict()
_stats = {"hits": 0, "misses": 0}


def _get(cache: OrderedDict, key):
    with _lock:
        v = cache.get(key)
        if v is not None:
            cache.move_to_end(key)
        return v


def _put(cache: OrderedDict, key, value, limit: int) -> None:
    with _lock:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > limit:
            cache.popitem(last=False)


def _fingerprint(tokenizer) -> tuple:
    from ..safety_builder import tokenizer_fingerprint      # fastsafe.safety_builder imports this package
    return tokenizer_fingerprint(tokenizer)


def text_tables(tokenizer, vocab_size: int, alphabet: CharAlphabet) -> tuple[dict, np.ndarray]:
    """``(token_slots(tokenizer, vocab_size, alphabet), alphabet.codepoint_classes())``, cached.

    Args:
        tokenizer: a Hugging Face tokenizer (its :func:`~fastsafe.safety_builder.tokenizer_fingerprint` is the key).
        vocab_size: ``V``.
        alphabet: the character classes (:attr:`CharAlphabet.key` is the key).

    Returns:
        The dict of :func:`~fastsafe.safety.token_chars.token_slots` (here every field int32:
        ``"slots"`` ``[V + 1, max_len]``, the others ``[V + 1]``) and the ``[CP_LIMIT, 2]`` codepoint
        classes (int32, -1: none).
        Shared between callers: do not write into them.

    Example:
        >>> slots, cpc = text_tables(tok, len(tok), matcher_alphabet)    # ~1 s the first time, ~0 after
    """
    fp = _fingerprint(tokenizer)
    key = (fp, int(vocab_size), alphabet.key)
    hit = _get(_tables, key)
    if hit is not None:
        _stats["hits"] += 1
        return hit
    _stats["misses"] += 1
    bkey = (fp, int(vocab_size))
    tb = _get(_bytes, bkey)
    if tb is None:
        tb = token_bytes(tokenizer, vocab_size)
        _put(_bytes, bkey, tb, MAX_TOKENIZERS)
    slots = token_slots(tokenizer, vocab_size, alphabet, token_bytes_list=tb)
    # int32 here, once: the matcher's tables are int32, and torch.as_tensor converting dtypes costs
    # ~15 ms per [V] array on a build that should take well under 150 ms
    slots = {k: np.ascontiguousarray(v, np.int32) for k, v in slots.items()}
    value = (slots, alphabet.codepoint_classes().astype(np.int32))
    _put(_tables, key, value, MAX_ALPHABETS)
    return value


def clear_text_tables() -> None:
    """Empty the cache (tests; a tokenizer changed in place keeps its fingerprint until its size changes)."""
    with _lock:
        _tables.clear()
        _bytes.clear()


def cache_info() -> dict:
    """``{"hits", "misses", "entries", "tokenizers"}`` of the cache."""
    with _lock:
        return {**_stats, "entries": len(_tables), "tokenizers": len(_bytes)}

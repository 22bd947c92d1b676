"""The entity list a matcher is built from: config entries (phrases, token-id lists, regexes)
first, then a store's active entities, the set of EOS ids that are never banned, and ``V``.

Shared by :class:`fastsafe.safety.PhraseMatcher` (the host reference) and
:class:`fastsafe.safety.DeviceMatcher`, so both see the same entities in the same order (the
entity ids their checks return index this list).

Example:
    >>> ents = config_entities(["make a bomb"], [[5, 7]], [r"b[o0]mb"])
    >>> [(e.kind, e.phrase) for e in ents]
    [('phrase', 'make a bomb'), ('token_ids', '5 7'), ('regex', 'b[o0]mb')]
"""
from __future__ import annotations

import re
from typing import Iterable

import torch

from .store import RiskEntity

__all__ = ["config_entities", "active_entities", "eos_id_set", "matcher_vocab_size"]


def config_entities(phrases: Iterable = (), token_id_phrases: Iterable = (), regexes: Iterable = ()) -> list:
    """``RiskEntity`` objects (``source="config"``) for a config's phrases, token-id lists and regexes.

    Phrases may already be ``RiskEntity`` objects; compiled regexes keep ``re.IGNORECASE`` as ``(?i)``.

    Raises:
        TypeError / ValueError: naming ``phrases``, ``token_id_phrases`` or ``regexes``.
    """
    ents: list[RiskEntity] = []
    if isinstance(phrases, str):
        raise TypeError("phrases: expected a list of str, got a single str (wrap it in a list)")
    for p in phrases:
        if isinstance(p, RiskEntity):
            ents.append(p)
        elif isinstance(p, str):
            ents.append(RiskEntity(0, p, "phrase", source="config"))
        else:
            raise TypeError(f"phrases: expected str items, got {type(p).__name__} ({p!r})")
    for seq in token_id_phrases:
        if isinstance(seq, torch.Tensor):
            seq = seq.tolist()
        if not isinstance(seq, (list, tuple)) or not seq or any(
                isinstance(t, bool) or not isinstance(t, int) for t in seq):
            raise ValueError(f"token_id_phrases: expected non-empty lists of ints, got {seq!r}")
        ents.append(RiskEntity(0, " ".join(str(int(t)) for t in seq), "token_ids", source="config"))
    if isinstance(regexes, (str, re.Pattern)):
        regexes = [regexes]
    for r in regexes:
        pat = r.pattern if isinstance(r, re.Pattern) else r
        if not isinstance(pat, str):
            raise TypeError(f"regexes: expected str or compiled patterns, got {type(r).__name__}")
        if isinstance(r, re.Pattern) and r.flags & re.IGNORECASE:
            pat = "(?i)" + pat
        ents.append(RiskEntity(0, pat, "regex", source="config"))
    return ents


def active_entities(entities) -> list:
    """The active ``RiskEntity`` objects of a store snapshot (``None``: none)."""
    out = []
    for e in entities or ():
        if not isinstance(e, RiskEntity):
            raise TypeError(f"entities: expected RiskEntity items, got {type(e).__name__}")
        if e.active:
            out.append(e)
    return out


def eos_id_set(tokenizer, eos_token_id) -> set:
    """EOS ids as a set of ints (``eos_token_id``: int, list or tensor; ``None``: the tokenizer's)."""
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, torch.Tensor):
        return {int(x) for x in eos_token_id.reshape(-1).tolist()}
    if isinstance(eos_token_id, int):
        return {int(eos_token_id)}
    return {int(x) for x in eos_token_id}


def matcher_vocab_size(tokenizer, vocab_size) -> int:
    """``V`` of a matcher: ``vocab_size``, or ``len(tokenizer)`` when it is None; a positive int.

    Raises:
        ValueError: ``vocab_size`` None without a tokenizer, or not a positive int.

    Example:
        >>> matcher_vocab_size(None, 10)
        10
    """
    if vocab_size is None:
        if tokenizer is None:
            raise ValueError("vocab_size: required when tokenizer is None")
        vocab_size = len(tokenizer)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size: expected a positive int, got {vocab_size!r}")
    return vocab_size

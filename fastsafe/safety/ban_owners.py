"""Which entity a token ban completes, on the device (for ``token_ban`` events without a host read).

The token automaton (:mod:`~fastsafe.safety.token_automaton`) keeps bans as packed bitmask words,
which no longer say whose they are. This module keeps one more small table beside it: for every
banned sequence ``p + [t]``, the key ``state(p) * V + t`` (``state(p)``: the automaton state of the
prefix ``p``, which is an inner trie node) and the entity that owns the sequence. A token ``t``
banned after a row in state ``s`` completes a sequence whose prefix is ``s`` or a node on its
failure chain, so :func:`banned_entity` walks the chain a fixed number of times (no
data-dependent control flow) and keeps the entity of highest severity found, the shortest prefix on
a tie (the choice of :meth:`PhraseMatcher.explain_token_ban`, which lists single-token bans first).

Announced for the native kernels (H4): this is a separate tensor program of the step, called once
per step on the ``[B]`` best tokens when ``report_token_bans`` is on; it reads ``goto_keys``,
``goto_next`` only at build time and ``chain_next`` per step.

Example:
    >>> keys, ents = ban_owner_table(automaton, flat, lens, owner)         # doctest: +SKIP
    >>> banned_entity(keys_t, ents_t, chain_next_t, depth, V, state[:, 0], best)  # [B] int32, -1: none
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["ban_owner_table", "banned_entity"]


def ban_owner_table(automaton, flat: np.ndarray, lens: np.ndarray, owner: np.ndarray,
                    severity=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(keys, entity, severity)``: sorted int64 keys ``state(prefix) * V + last token`` of every
    banned sequence, the int32 entity id owning it (the most severe, then the first listed, where
    several own one key) and that entity's int32 severity.

    Args:
        automaton: the :class:`~fastsafe.safety.token_automaton.TokenAutomaton` built from ``flat, lens``.
        flat, lens: CSR banned sequences (:func:`~fastsafe.safety.token_sequences.banned_sequences`).
        owner: ``[len(lens)]`` entity index of each sequence.
        severity: per entity (indexed by ``owner``); default all 0.
    """
    V = int(automaton.vocab_size)
    n = len(lens)
    if n == 0:
        return np.asarray([np.iinfo(np.int64).max]), np.asarray([-1], np.int32), np.asarray([0], np.int32)
    lens = np.asarray(lens, np.int64)
    starts = np.cumsum(lens) - lens
    cur = np.zeros(n, np.int64)
    gk, gn = automaton.goto_keys, automaton.goto_next
    for j in range(int(lens.max()) - 1):            # walk each prefix from the root, one level at a time
        live = np.nonzero(lens > j + 1)[0]
        key = cur[live] * V + flat[starts[live] + j]
        idx = np.minimum(np.searchsorted(gk, key), len(gk) - 1)
        if not np.array_equal(gk[idx], key):
            raise AssertionError("ban_owner_table: a banned prefix is missing from the token automaton")
        cur[live] = gn[idx]
    keys = cur * V + flat[starts + lens - 1]
    owner = np.asarray(owner, np.int64)
    sev = np.zeros(len(owner), np.int64) if severity is None else np.asarray(severity, np.int64)[owner]
    order = np.lexsort((owner, -sev, keys))          # per key: most severe, then the first listed
    keys, ents, sev = keys[order], owner[order], sev[order]
    first = np.ones(len(keys), bool)
    first[1:] = keys[1:] != keys[:-1]
    return keys[first], ents[first].astype(np.int32), sev[first].astype(np.int32)


def banned_entity(keys: torch.Tensor, entity: torch.Tensor, severity: torch.Tensor, chain_next: torch.Tensor,
                  chain_depth: int, vocab_size: int, token_state: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` int32: the entity whose sequence ``token_ids`` would complete after rows in
    ``token_state`` (the state tensor's column 0), -1 where none (the token is not banned).

    Args:
        keys, entity, severity: :func:`ban_owner_table` on the device (int64 sorted, int32, int32).
        chain_next: ``[S]`` failure chain of the token automaton; ``chain_depth`` its fixed length.
        vocab_size: ``V``.
        token_state: ``[B]`` int64 token-automaton states.
        token_ids: ``[B]`` int64 tokens.
    """
    t = token_ids.to(torch.int64)
    valid = (t >= 0) & (t < vocab_size)
    E = keys.shape[0]
    cur = token_state.to(torch.int64)
    res = torch.full_like(cur, -1)
    best = torch.full_like(cur, torch.iinfo(torch.int64).min)
    for _ in range(chain_depth):                     # the state, then its failure chain (shorter prefixes)
        key = cur * vocab_size + t
        idx = torch.searchsorted(keys, key).clamp(max=E - 1)
        sev = severity[idx].to(torch.int64)
        take = (keys[idx] == key) & valid & (sev >= best)
        res = torch.where(take, entity[idx].to(torch.int64), res)
        best = torch.where(take, sev, best)
        cur = chain_next[cur].to(torch.int64)
    return res.to(torch.int32)

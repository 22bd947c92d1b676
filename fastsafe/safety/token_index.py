"""Vectorised lookup of "which tokens complete a banned sequence after this history".

A banned sequence ``s = (t_1, ..., t_n)`` bans ``t_n`` for a row whose history ends with
``t_1 .. t_{n-1}`` (the rule of transformers' ``NoBadWordsLogitsProcessor``); ``n == 1`` bans
``t_1`` always. :class:`TokenIndex` stores the distinct prefixes ``t_1 .. t_{n-1}`` keyed by a
64-bit hash of the prefix read *backwards* (last token first), so one step is:

1. per row, the hashes of the last ``d = 1 .. D`` history tokens (read backwards) -- ``D`` numpy
   multiply-adds over ``[B]`` vectors;
2. one ``searchsorted`` of the ``[B, D]`` hashes in the sorted prefix-hash table;
3. the hits are verified token by token (hashes are only a filter: results are exact);
4. the completions of the verified prefixes are gathered (CSR arrays) into ``(row, token)`` pairs.

Everything is numpy; memory is a few int arrays (about 30 bytes per banned sequence).
"""
from __future__ import annotations

import numpy as np

__all__ = ["TokenIndex"]

_MULT = np.uint64(0x9E3779B97F4A7C15)        # odd 64-bit constants (golden ratio, splitmix)
_MULT2 = np.uint64(0xBF58476D1CE4E5B9)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices ``starts[i] + 0..lengths[i]-1`` for all i, and the owner i of each."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    first = np.cumsum(lengths) - lengths
    pos = np.arange(total) - np.repeat(first, lengths)
    return np.repeat(starts, lengths) + pos, owner


class TokenIndex:
    """Exact prefix -> completions table over token-id sequences (see the module docstring).

    Args:
        sequences: list of token-id lists (length >= 1).
        values: one int per sequence (e.g. the entity index).
        priority: optional number per sequence; where the same sequence occurs more than once, the
            value of the highest priority is kept (ties: the first).

    Attributes:
        static: ``{token: value}`` of the single-token sequences (always banned).
        max_prefix: longest prefix (``max len - 1``).
        num_prefixes: distinct prefixes.
    """

    def __init__(self, sequences, values, priority=None):
        lens = np.fromiter((len(x) for x in sequences), dtype=np.int64, count=len(sequences))
        flat = np.fromiter((t for x in sequences for t in x), dtype=np.int64, count=int(lens.sum()))
        self._build(flat, lens, np.asarray(values, dtype=np.int64),
                    np.zeros(len(lens)) if priority is None else np.asarray(priority, dtype=np.float64))

    @classmethod
    def from_arrays(cls, flat: np.ndarray, lens: np.ndarray, values: np.ndarray, priority: np.ndarray) -> "TokenIndex":
        """Build from CSR arrays: sequence ``i`` is ``flat[sum(lens[:i]) : sum(lens[:i+1])]``."""
        self = cls.__new__(cls)
        self._build(np.asarray(flat, np.int64), np.asarray(lens, np.int64), np.asarray(values, np.int64),
                    np.asarray(priority, np.float64))
        return self

    def _build(self, flat, lens, vals_all, pri_all):
        ends_all = np.cumsum(lens)
        single = np.nonzero(lens == 1)[0]
        static: dict[int, int] = {}
        if len(single):
            toks = flat[ends_all[single] - 1]
            order = np.lexsort((single, -pri_all[single], toks))       # best first within a token
            toks, sv = toks[order], vals_all[single][order]
            keep = np.ones(len(toks), bool)
            keep[1:] = toks[1:] != toks[:-1]
            static = dict(zip(toks[keep].tolist(), sv[keep].tolist()))
        self.static = static
        multi = np.nonzero(lens > 1)[0]
        n = len(multi)
        self.max_prefix = 0
        self.num_prefixes = 0
        self._hashes = np.zeros(0, np.uint64)
        if n == 0:
            return
        ends = ends_all[multi]
        lens = lens[multi]
        starts = ends - lens
        vals = vals_all[multi]
        pri = pri_all[multi]
        plen = lens - 1
        last = flat[ends - 1]
        self.max_prefix = int(plen.max())
        # hash every prefix read backwards: h = ((h * M) ^ (tok + 1)) * M2, over d = 1 .. plen
        h = np.zeros(n, np.uint64)
        with np.errstate(over="ignore"):
            for d in range(1, self.max_prefix + 1):
                sel = plen >= d
                tok = flat[ends[sel] - 1 - d].astype(np.uint64) + np.uint64(1)
                h[sel] = ((h[sel] * _MULT) ^ tok) * _MULT2
        # sort by (hash, prefix length, last token, -priority, input order); dedupe (prefix, last)
        order = np.lexsort((np.arange(n), -pri, last, plen, h))
        h, plen, last, vals, starts = h[order], plen[order], last[order], vals[order], starts[order]
        new_pair = np.ones(n, bool)
        new_pair[1:] = (h[1:] != h[:-1]) | (plen[1:] != plen[:-1]) | (last[1:] != last[:-1])
        h, plen, last, vals, starts = h[new_pair], plen[new_pair], last[new_pair], vals[new_pair], starts[new_pair]
        new_prefix = np.ones(len(h), bool)
        new_prefix[1:] = (h[1:] != h[:-1]) | (plen[1:] != plen[:-1])
        first = np.nonzero(new_prefix)[0]
        # exactness: prefixes that share a hash must be identical token by token
        same_hash = np.nonzero(~new_prefix)[0]
        if len(same_hash):
            prev_first = first[np.searchsorted(first, same_hash, side="right") - 1]
            a_idx, _ = _ranges(starts[same_hash], plen[same_hash])
            b_idx, _ = _ranges(starts[prev_first], plen[prev_first])
            if not np.array_equal(flat[a_idx], flat[b_idx]):
                raise RuntimeError("TokenIndex: 64-bit hash collision between two prefixes (please report)")
        ph = h[first]
        if len(ph) > 1 and np.any(ph[1:] == ph[:-1]):
            raise RuntimeError("TokenIndex: 64-bit hash collision between prefixes of different lengths")
        self.num_prefixes = len(first)
        self._hashes = ph
        self._plen = plen[first].astype(np.int64)
        # reversed prefix tokens, CSR (for verification)
        pidx, _ = _ranges(starts[first], plen[first])
        fwd = flat[pidx]
        self._pstart = np.concatenate(([0], np.cumsum(self._plen)[:-1])).astype(np.int64)
        # reverse each prefix in place: position p in prefix i -> start + (len - 1 - p)
        r_idx, r_own = _ranges(self._pstart, self._plen)
        pos = r_idx - self._pstart[r_own]
        self._ptok = np.empty(len(fwd), np.int32)
        self._ptok[self._pstart[r_own] + (self._plen[r_own] - 1 - pos)] = fwd
        self._cstart = np.concatenate((first, [len(h)])).astype(np.int64)
        self._ctok = last.astype(np.int64)
        self._cval = vals.astype(np.int32)

    # ------------------------------------------------------------------ lookup
    def hits(self, rev: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Verified prefix hits.

        Args:
            rev: ``[B, D]`` int64, each row's last ``D`` tokens read backwards (``rev[b, 0]`` is the
                last token); entries past ``lengths[b]`` are ignored.
            lengths: ``[B]`` valid entries per row.

        Returns:
            ``(rows, prefix_ids)`` of every prefix that the row's history ends with.
        """
        B, D = rev.shape
        if self.num_prefixes == 0 or D == 0 or B == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        H = np.empty((B, D), np.uint64)
        h = np.zeros(B, np.uint64)
        with np.errstate(over="ignore"):
            for d in range(D):
                h = ((h * _MULT) ^ (rev[:, d].astype(np.uint64) + np.uint64(1))) * _MULT2
                H[:, d] = h
        idx = np.searchsorted(self._hashes, H.reshape(-1))
        idx_c = np.minimum(idx, self.num_prefixes - 1)
        dlen = np.tile(np.arange(1, D + 1), B)
        ok = (self._hashes[idx_c] == H.reshape(-1)) & (self._plen[idx_c] == dlen)
        ok &= dlen <= np.repeat(lengths, D)
        cand = np.nonzero(ok)[0]
        if len(cand) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        rows = cand // D
        pids = idx_c[cand]
        # verify token by token
        plen = self._plen[pids]
        p_idx, own = _ranges(self._pstart[pids], plen)
        pos = p_idx - self._pstart[pids][own]
        mism = self._ptok[p_idx] != rev[rows[own], pos]
        bad = np.zeros(len(cand), bool)
        if mism.any():
            bad[np.unique(own[mism])] = True
        return rows[~bad], pids[~bad]

    def completions(self, rows: np.ndarray, pids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rows, tokens, values)`` of every completion of the hit prefixes."""
        if len(pids) == 0:
            z = np.zeros(0, np.int64)
            return z, z, z
        cnt = self._cstart[pids + 1] - self._cstart[pids]
        c_idx, own = _ranges(self._cstart[pids], cnt)
        return rows[own], self._ctok[c_idx], self._cval[c_idx]

    def lookup(self, prefix_rev) -> list[tuple[int, int]]:
        """``[(token, value)]`` completing exactly this prefix (given backwards); for explanations."""
        rev = np.asarray([list(prefix_rev)], dtype=np.int64)
        if rev.shape[1] == 0:
            return []
        rows, pids = self.hits(rev, np.asarray([rev.shape[1]]))
        out = []
        for p in pids[self._plen[pids] == rev.shape[1]].tolist():
            for i in range(int(self._cstart[p]), int(self._cstart[p + 1])):
                out.append((int(self._ctok[i]), int(self._cval[i])))
        return out

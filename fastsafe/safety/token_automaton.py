"""The token-level ban automaton: Aho-Corasick over banned token sequences, in compact arrays.

A row's state is the trie node of the longest suffix of its history that is a prefix of some
banned sequence. Token ``t`` is banned after the history when some suffix of the history that is
a trie node ``u`` has a child ``u·t`` that is a whole banned sequence (the rule of transformers'
``NoBadWordsLogitsProcessor``); those ``u`` are exactly the state and its failure chain.

Arrays (numpy here, torch on the device in :class:`~fastsafe.safety.DeviceMatcher`):

* states are the trie's *inner* nodes (a node without children behaves exactly like its failure
  node, so transitions into it go there instead);
* transitions: sorted ``goto_keys = state * V + token`` and ``goto_next``; ``chain_next[s]`` is the
  next inner node on ``s``'s failure chain (root: 0). A step tries the state, then its chain, at
  most ``chain_depth`` lookups (a fixed count: no data-dependent control flow);
* bans: ``ban_first[s]`` is the first node on the chain (the state included) that bans something,
  ``ban_next`` the next one; a banning node's bans are ``(word, and-mask)`` pairs of the packed
  bitmask, at most ``ban_width`` per node (nodes with more own a dense row in ``heavy_rows``).
  Tokens banned after every history (single-token sequences) are in ``base``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .automaton import build_trie, failure_links, sorted_unique

__all__ = ["TokenAutomaton", "build_token_automaton"]


@dataclass
class TokenAutomaton:
    vocab_size: int
    goto_keys: np.ndarray      # [E] int64 sorted
    goto_next: np.ndarray      # [E] int64
    chain_next: np.ndarray     # [S] int64
    chain_depth: int
    ban_first: np.ndarray      # [S] int64 banning-node index or -1
    ban_next: np.ndarray       # [NB] int64
    ban_depth: int
    ban_off: np.ndarray        # [NB] int64
    ban_cnt: np.ndarray        # [NB] int64
    ban_word: np.ndarray       # [P] int64
    ban_mask: np.ndarray       # [P] int32
    ban_width: int
    heavy_id: np.ndarray       # [NB] int64 (-1: light)
    heavy_rows: np.ndarray     # [NH + 1, W] int32 (row 0: all allowed)
    base: np.ndarray           # [W] int32
    max_sequence: int

    @property
    def num_states(self) -> int:
        return len(self.chain_next)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in ("goto_keys", "goto_next", "chain_next", "ban_first", "ban_next",
                                                     "ban_off", "ban_cnt", "ban_word", "ban_mask", "heavy_id",
                                                     "heavy_rows", "base"))


def _pairs(tokens: np.ndarray, owners: np.ndarray):
    """Group (owner, token) into (owner, word, and-mask) pairs, sorted by owner then word."""
    key = sorted_unique(owners * (1 << 20) + tokens)    # distinct (owner, token), sorted
    own, rest = key >> 20, key & ((1 << 20) - 1)
    w, bit = rest // 32, rest % 32
    ow = own * (1 << 16) + w                             # non-decreasing along key
    first = np.ones(len(ow), bool)
    first[1:] = ow[1:] != ow[:-1]
    start = np.nonzero(first)[0]
    uniq = ow[start]
    bits = np.left_shift(np.int64(1), bit)
    m = np.add.reduceat(bits, start) if len(bits) else bits     # distinct bits: sum == OR
    mask = (~m & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
    return uniq >> 16, uniq & ((1 << 16) - 1), mask


def build_token_automaton(flat: np.ndarray, lens: np.ndarray, vocab_size: int, *, ban_width: int = 32) -> TokenAutomaton:
    """Build from CSR banned sequences (``flat``, ``lens``: see :mod:`fastsafe.safety.token_sequences`)."""
    V = int(vocab_size)
    W = (V + 31) // 32
    if V > (1 << 20):
        raise ValueError(f"vocab_size: at most {1 << 20} supported, got {V}")
    base = np.full(W, 0xFFFFFFFF, np.int64)
    if V % 32:
        base[-1] = (1 << (V % 32)) - 1            # bits past V stay 0 (as in fastsafe.ops.full_bitmask)
    trie = build_trie(flat, lens, V)
    N = trie.num_nodes
    fail = failure_links(trie)
    nchild = np.bincount(trie.parent[1:], minlength=N)
    inner = nchild > 0
    inner[0] = True
    # equivalent inner node of every node: itself if inner, else the first inner node on its chain
    eq = np.where(inner, np.arange(N), -1)
    ls = trie.level_starts
    for d in range(1, len(ls) - 1):
        v = np.arange(ls[d], ls[d + 1])
        eq[v] = np.where(inner[v], v, eq[fail[v]])
    sid = np.cumsum(inner) - 1                     # node -> state id (inner nodes only)
    S = int(inner.sum())
    # transitions: every edge, target replaced by its equivalent inner node
    child = np.arange(1, N)
    par = trie.parent[1:]
    goto_keys = sid[par] * V + trie.symbol[1:]
    goto_next = sid[eq[child]]
    # failure chain over inner nodes
    cf = np.zeros(N, np.int64)
    cf[1:] = eq[fail[1:]]
    inner_nodes = np.nonzero(inner)[0]
    chain_next = sid[cf[inner_nodes]]
    depth = np.zeros(N, np.int64)
    for d in range(1, len(ls) - 1):
        v = np.arange(ls[d], ls[d + 1])
        depth[v] = 1 + depth[cf[v]]
    chain_depth = int(depth[inner].max()) + 1 if S else 1
    # bans: own bans of each node = last tokens of the sequences whose prefix is the node
    term = trie.end
    own_node = trie.parent[term]
    own_tok = trie.symbol[term]
    at_root = own_node == 0
    if at_root.any():
        t = np.unique(own_tok[at_root])
        np.bitwise_and.at(base, t // 32, ~np.left_shift(np.int64(1), t % 32) & 0xFFFFFFFF)
    base32 = (base & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
    own_node, own_tok = own_node[~at_root], own_tok[~at_root]
    banning = np.zeros(N, bool)
    banning[own_node] = True
    bidx = np.cumsum(banning) - 1                 # node -> banning index
    NB = int(banning.sum())
    # nearest banning node on the failure chain (itself included), over all nodes in BFS order
    nb = np.where(banning, np.arange(N), -1)
    nb[0] = -1
    for d in range(1, len(ls) - 1):
        v = np.arange(ls[d], ls[d + 1])
        nb[v] = np.where(banning[v], v, nb[fail[v]])
    bnodes = np.nonzero(banning)[0]
    nxt = nb[fail[bnodes]]
    ban_next = np.where(nxt >= 0, bidx[np.maximum(nxt, 0)], -1)
    ban_first = np.where(nb[inner_nodes] >= 0, bidx[np.maximum(nb[inner_nodes], 0)], -1)
    bdepth = np.zeros(N, np.int64)
    for d in range(1, len(ls) - 1):
        v = np.arange(ls[d], ls[d + 1])
        bdepth[v] = banning[v] + bdepth[fail[v]]
    ban_depth = int(bdepth.max()) if NB else 0
    # (word, mask) pairs per banning node
    po, pw, pm = _pairs(own_tok, bidx[own_node]) if NB else (np.zeros(0, np.int64),) * 3
    cnt = np.bincount(po, minlength=NB).astype(np.int64)
    off = np.cumsum(cnt) - cnt
    heavy = cnt > ban_width
    heavy_id = np.full(NB, -1, np.int64)
    hn = np.nonzero(heavy)[0]
    heavy_id[hn] = np.arange(1, len(hn) + 1)
    heavy_rows = np.full((len(hn) + 1, W), -1, np.int32)
    if len(hn):
        sel = heavy[po]
        heavy_rows[heavy_id[po[sel]], pw[sel]] = pm[sel]
        keep = ~sel
        po, pw, pm = po[keep], pw[keep], pm[keep]
        cnt[heavy] = 0
        off = np.searchsorted(po, np.arange(NB))
    return TokenAutomaton(V, goto_keys.astype(np.int64), goto_next.astype(np.int64), chain_next.astype(np.int64),
                          chain_depth, ban_first.astype(np.int64), ban_next.astype(np.int64), ban_depth,
                          off.astype(np.int64), cnt, pw.astype(np.int64), pm.astype(np.int32), int(ban_width),
                          heavy_id, heavy_rows, base32, int(lens.max()) if len(lens) else 0)

"""The vectorised Aho-Corasick build (safety.automaton) against a plain Python construction."""
from __future__ import annotations

import random

import numpy as np
import pytest

from fastsafe.safety.automaton import (build_trie, dense_transitions, failure_links, goto_lookup, sorted_search,
                                       sorted_unique)


def naive(patterns, alphabet):
    """Trie (node ids by string), failure links and the full automaton, by the textbook loops."""
    nodes = {(): 0}
    order = [()]
    for depth in range(max(map(len, patterns)) + 1):
        level = sorted({tuple(p[:depth]) for p in patterns if len(p) >= depth} - set(nodes))
        for s in level:
            nodes[s] = len(order)
            order.append(s)
    fail = {}
    for s in order:
        t = s[1:]
        while t not in nodes:
            t = t[1:]
        fail[s] = nodes[t] if s else 0
    delta = np.zeros((len(order), alphabet), np.int64)
    for i, s in enumerate(order):
        for a in range(alphabet):
            t = s + (a,)
            while t not in nodes:
                t = t[1:]
            delta[i, a] = nodes[t]
    return nodes, [fail[s] for s in order], delta


@pytest.mark.parametrize("seed", range(4))
def test_trie_failure_links_and_transitions_equal_the_textbook_build(seed):
    rng = random.Random(seed)
    A = [2, 3, 5, 40][seed]
    pats = [[rng.randrange(A) for _ in range(rng.randint(1, 7))] for _ in range(rng.choice([3, 30, 300]))]
    flat = np.asarray([x for p in pats for x in p], np.int64)
    lens = np.asarray([len(p) for p in pats], np.int64)
    trie = build_trie(flat, lens, A)
    nodes, fail, delta = naive(pats, A)
    assert trie.num_nodes == len(nodes)
    assert [nodes[tuple(p)] for p in pats] == trie.end.tolist()
    got_fail = failure_links(trie)
    assert got_fail.tolist() == fail
    assert np.array_equal(dense_transitions(trie, got_fail), delta)
    # every edge found, non-edges -1
    par, sym = trie.parent[1:], trie.symbol[1:]
    assert np.array_equal(goto_lookup(trie, par, sym), np.arange(1, trie.num_nodes))


def test_sorted_helpers_equal_numpy():
    rng = np.random.default_rng(0)
    for n in (0, 5, 10000):
        x = rng.integers(-50, 10 ** 6, n)
        assert np.array_equal(sorted_unique(x), np.unique(x))
        keys = np.sort(rng.integers(0, 10 ** 6, 20000))
        assert np.array_equal(sorted_search(keys, x), np.searchsorted(keys, x))

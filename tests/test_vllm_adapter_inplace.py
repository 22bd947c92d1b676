"""vLLM adapter: the in-place bans and fallback (sparse and dense forms) against a plain torch reference. No vLLM needed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastsafe.integrations.vllm.inplace import ban_, banned_positions, fallback_
from fastsafe.ops import pack_bitmask

NEG = float("-inf")


def _case(V, B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g).round(decimals=1)       # rounded: ties at the row maximum happen
    logits[1, 3] = NEG                                                 # an entry already -inf
    logits[4] = NEG                                                    # a row with nothing finite
    rows = torch.tensor([5, 0, 2, 4])                                  # a subset, out of order
    allowed = torch.rand(len(rows), V, generator=g) > 0.2
    allowed[1] = True                                                  # a row that bans nothing
    allowed[2, logits[2].argmax()] = False                             # the best token of row 2 is banned
    return logits, rows, allowed


def _reference(logits, rows, allowed):
    out = logits.clone()
    x = out[rows]
    row_max = x.amax(-1)
    at_max = ~allowed & (x == row_max[:, None]) & torch.isfinite(x)
    hit = at_max.any(-1)
    best = torch.tensor([int(r.nonzero()[0]) if r.any() else 0 for r in at_max])
    x[~allowed] = NEG
    out[rows] = x
    return out, best, hit


@pytest.mark.parametrize("V", [64, 77])                                 # a whole number of words, and padding bits
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_ban_equals_the_reference(V, sparse):
    logits, rows, allowed = _case(V)
    want, best_ref, hit_ref = _reference(logits, rows, allowed)
    got = logits.clone()
    best, hit = ban_(got, rows, pack_bitmask(allowed), got.amax(-1).index_select(0, rows), sparse=sparse)
    assert torch.equal(got, want)
    assert hit.tolist() == hit_ref.tolist() and bool(hit[2]) and not bool(hit[1]) and not bool(hit[3])
    assert best.tolist() == best_ref.tolist()


def test_banned_positions_lists_every_zero_bit_below_v():
    V = 77
    allowed = torch.rand(3, V, generator=torch.Generator().manual_seed(1)) > 0.5
    r, t = banned_positions(pack_bitmask(allowed), V)
    assert torch.equal(torch.stack([r, t], 1), (~allowed).nonzero())
    r, t = banned_positions(pack_bitmask(torch.ones(2, V, dtype=torch.bool)), V)
    assert r.numel() == 0 and t.numel() == 0


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("all_rows", [True, False])
def test_fallback_gives_eos_only_to_dead_rows(sparse, all_rows):
    V, eos = 40, 7
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(2))
    rows = torch.arange(4) if all_rows else torch.tensor([3, 1])
    dead = torch.tensor([True, False, False, True]) if all_rows else torch.tensor([True, False])
    want = logits.clone()
    for r, d in zip(rows.tolist(), dead.tolist()):
        if d:
            want[r] = NEG
            want[r, eos] = 0.0
    got = logits.clone()
    fallback_(got, rows, dead, eos, sparse=sparse, all_rows=all_rows)
    assert torch.equal(got, want)


@pytest.mark.parametrize("all_rows", [True, False])
def test_bans_every_row_shares_take_the_column_path_and_equal_the_reference(all_rows):
    """A large set bans the same tokens in every row (its single-token entities): split off and filled
    per column (more than SHARED_MIN_WORDS words of them), with the rows' own bans on top."""
    from fastsafe.integrations.vllm import inplace
    V, B = 40 * 32 + 5, 5
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, V, generator=g).round(decimals=1)
    rows = torch.arange(B) if all_rows else torch.tensor([4, 1, 2])
    shared = torch.rand(V, generator=g) < 0.3
    allowed = ~shared & (torch.rand(len(rows), V, generator=g) > 0.05)
    x = logits[rows]
    logits[rows[0], int((x[0] * shared).argmax())] = 9.0          # row 0: its best token is a shared ban
    logits[rows[1], 3] = 9.0                                        # row 1: a tie at the max ...
    allowed[1, 3] = True
    shared_id = int(shared.nonzero()[5])
    logits[rows[1], shared_id] = 9.0                                # ... with a shared ban of a higher id
    want, best_ref, hit_ref = _reference(logits, rows, allowed)
    got = logits.clone()
    words = pack_bitmask(allowed)
    assert inplace._shared_bans(np.bitwise_or.reduce(words.numpy(), axis=0), V) is not None       # the column path is the one tested
    best, hit = ban_(got, rows, words, got.amax(-1).index_select(0, rows), sparse=True)
    assert torch.equal(got, want)
    assert hit.tolist() == hit_ref.tolist() and best.tolist() == best_ref.tolist() and bool(hit[0]) and bool(hit[1])

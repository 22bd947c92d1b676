"""pack_bitmask / unpack_bitmask: property tests (hypothesis) and the documented bit layout."""
import torch
from hypothesis import given, settings, strategies as st

from fastsafe.ops import ban_tokens_, bitmask_words, full_bitmask, pack_bitmask, unpack_bitmask
import pytest


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=200), st.integers(1, 3))
def test_roundtrip(bits, rows):
    allowed = torch.tensor([bits] * rows)
    words = pack_bitmask(allowed)
    assert words.dtype == torch.int32 and words.shape == (rows, bitmask_words(len(bits)))
    assert torch.equal(unpack_bitmask(words, len(bits)), allowed)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=100))
def test_bit_layout_lsb_first(bits):
    words = pack_bitmask(torch.tensor(bits))
    for t, b in enumerate(bits):
        word = int(words[t // 32]) & 0xFFFFFFFF
        assert ((word >> (t % 32)) & 1) == int(b)
    # bits past V are zero
    last = int(words[-1]) & 0xFFFFFFFF
    assert last >> (len(bits) - 32 * (len(words) - 1)) == 0 if len(bits) % 32 else True


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=100), st.lists(st.booleans(), min_size=1, max_size=100))
def test_and_combines_masks(a, b):
    n = min(len(a), len(b))
    ta, tb = torch.tensor(a[:n]), torch.tensor(b[:n])
    combined = pack_bitmask(ta) & pack_bitmask(tb)
    assert torch.equal(unpack_bitmask(combined, n), ta & tb)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.lists(st.integers(0, 299), max_size=40))
def test_ban_tokens(V, ids):
    ids = [i for i in ids if i < V]
    m = full_bitmask(V)
    ban_tokens_(m, ids)
    expect = torch.ones(V, dtype=torch.bool)
    expect[ids] = False
    assert torch.equal(unpack_bitmask(m, V), expect)


def test_word_31_is_sign_bit():
    allowed = torch.zeros(32, dtype=torch.bool)
    allowed[31] = True
    assert pack_bitmask(allowed).item() == -(2**31)


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="allowed"):
        pack_bitmask(torch.ones(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="words"):
        unpack_bitmask(torch.ones(3, dtype=torch.int64), 64)
    with pytest.raises(ValueError, match="ceil"):
        unpack_bitmask(torch.ones(3, dtype=torch.int32), 64)
    with pytest.raises(ValueError, match="vocab_size"):
        unpack_bitmask(torch.ones(3, dtype=torch.int32), 0)

"""Cached per-vocabulary text tables, the vectorised codepoint classes and the canonical alphabet
(fastsafe.safety.text_tables, CharAlphabet.codepoint_classes, build_char_automaton(canonical=True)):
the cached and canonical builds give the tables / decisions of the plain build."""
import random

import numpy as np
import pytest
import torch

from fastsafe.safety import DeviceMatcher
from fastsafe.safety.char_automaton import CANONICAL_CHARS, CharAlphabet, _fold_table, build_char_automaton
from fastsafe.safety.text_tables import cache_info, clear_text_tables, text_tables
from fastsafe.safety.token_chars import token_slots
from tests.test_matcher import tiny_tokenizer

# non-ASCII, confusables (Cyrillic / fullwidth / Greek look-alikes), leetspeak, diacritics, CJK,
# separators, repeated punctuation: the cases where the alphabet and the run caps matter
WORDS = ["bomb", "b0mb", "бомб", "ｂｏｍｂ", "make a", "he-she", "café", "naïve", "ß", "straße", "e-mail",
         "##tag", "a&b", "it's", "你好", "操", "x.y", "ok!!", "boom", "killian", "ill", "аpple", "ΑΒΓ", "😀go",
         "C++", "50%", "\u201cquote\u201d", "dash\u2014", "√2", "mr.", "?!?"]


def _reference_codepoint_classes(alpha: CharAlphabet) -> np.ndarray:
    """The loop the vectorised version replaced (classes of the first two folded characters)."""
    ids, strings = _fold_table()
    per = np.full((len(strings), 2), -1, np.int16)
    for j, f in enumerate(strings):
        if f:
            cl = alpha.classes(f[:2])
            per[j, 0] = cl[0]
            if len(cl) > 1:
                per[j, 1] = cl[1]
    return per[ids]


def _random_phrases(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        out.append(" ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 1, 2, 3]))))
    return list(dict.fromkeys(out))


@pytest.mark.parametrize("canonical", [False, True])
def test_codepoint_classes_vectorised_equal_reference(canonical):
    rng = random.Random(1)
    phrases = _random_phrases(rng, 25)
    alpha = build_char_automaton(phrases, list(range(len(phrases))), [1.0] * len(phrases),
                                 canonical=canonical).alphabet
    np.testing.assert_array_equal(alpha.codepoint_classes(), _reference_codepoint_classes(alpha))


def test_cached_tables_equal_uncached_and_lru_bounded():
    tok = tiny_tokenizer()
    V = len(tok) + 3
    clear_text_tables()
    rng = random.Random(2)
    alphas = []
    for k in range(6):
        phrases = _random_phrases(rng, 6 + k)
        alphas.append(build_char_automaton(phrases, list(range(len(phrases))), [1.0] * len(phrases)).alphabet)
    for alpha in alphas[:2]:
        slots, cpc = text_tables(tok, V, alpha)
        ref = token_slots(tok, V, alpha)
        assert set(slots) == set(ref)
        for k in ref:
            np.testing.assert_array_equal(slots[k], ref[k], err_msg=k)
        np.testing.assert_array_equal(cpc, _reference_codepoint_classes(alpha))
        again = text_tables(tok, V, alpha)
        assert again[0] is slots                       # a hit returns the cached arrays
    for alpha in alphas:
        text_tables(tok, V, alpha)
    info = cache_info()
    assert info["entries"] <= 4 and info["tokenizers"] == 1


def test_canonical_alphabet_shared_by_ascii_sets():
    a = build_char_automaton(["make a bomb", "kill"], [0, 1], [1.0, 1.0], canonical=True).alphabet
    b = build_char_automaton(["poison", "x y z!"], [0, 1], [1.0, 1.0], canonical=True).alphabet
    assert a.key == b.key
    c = build_char_automaton(["你好"], [0], [1.0], canonical=True).alphabet
    assert c.key != a.key and set(CANONICAL_CHARS) <= set(c.chars)


def _step_all(dm, ids_rows, cands):
    """Decisions along each row's history: banned bitmask, and the text check of ``cands`` at every step."""
    B = len(ids_rows)
    st = dm.initial_state(B)
    out = []
    for t in range(len(ids_rows[0])):
        ok, ent = dm.check_candidates(st, cands)
        out.append((dm.banned_bitmask(st).clone(), ok.clone(), ent.clone()))
        st = dm.advance(st, torch.tensor([r[t] for r in ids_rows]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_canonical_build_same_decisions(seed):
    """Canonical vs exact alphabet on random phrase sets (non-ASCII, confusables): equal bitmasks,
    candidate checks and entities along random and phrase-following histories."""
    tok = tiny_tokenizer()
    V = len(tok)
    rng = random.Random(seed)
    phrases = _random_phrases(rng, 12)
    exact = DeviceMatcher.build(tok, phrases, vocab_size=V, canonical_alphabet=False)
    canon = DeviceMatcher.build(tok, phrases, vocab_size=V, canonical_alphabet=True)
    assert exact.alphabet.key != canon.alphabet.key        # the test compares two different alphabets
    B, T, k = 6, 24, 12
    texts = [" ".join(rng.choice(WORDS + ["the", "a", "-", "  ", "bo", "oo", "mb"]) for _ in range(8)) for _ in range(B)]
    rows = []
    for s in texts:
        ids = tok.encode(s, add_special_tokens=False)[:T]
        rows.append(ids + [rng.randrange(V) for _ in range(T - len(ids))])
    g = torch.Generator().manual_seed(seed)
    cands = torch.randint(0, V, (B, k), generator=g)
    cands[:, 0] = torch.tensor([tok.encode(" bomb", add_special_tokens=False)[0]] * B)
    a, b = _step_all(exact, rows, cands), _step_all(canon, rows, cands)
    caught = 0
    for (ma, oa, ea), (mb, ob, eb) in zip(a, b):
        assert torch.equal(ma, mb)
        assert torch.equal(oa, ob)
        assert torch.equal(ea, eb)
        caught += int((~oa).sum())
    # histories from state_from_histories agree too
    sa = exact.state_from_histories(rows)
    sb = canon.state_from_histories(rows)
    assert torch.equal(exact.check_candidates(sa, cands)[1], canon.check_candidates(sb, cands)[1])
    assert caught > 0                                      # the check had something to decide

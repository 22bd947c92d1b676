"""Text rules of the device check that keep benign text allowed: separator kinds between the words of an entity."""
from __future__ import annotations

import functools

import pytest

from fastsafe.safety import DeviceMatcher, PhraseMatcher
from fastsafe.safety.char_automaton import PSEP, SEP, CharAlphabet, stream_symbols
from tests.test_device_matcher import blocked_at
from tests.test_matcher import tiny_tokenizer

ENTITIES = ["He-she", "e-mail", "make a bomb", "bomb", "x.y.z"]


@functools.lru_cache(maxsize=None)
def _dm():
    return DeviceMatcher.build(tiny_tokenizer(), ENTITIES)


def test_a_separator_run_reads_as_the_kind_of_its_first_character():
    a = CharAlphabet("ab")
    cl = a.classes("a - b_.b")
    assert stream_symbols(cl, a.is_word, word_boundaries=False) == [a.cls("a"), SEP, a.cls("b"), PSEP, a.cls("b")]


@pytest.mark.parametrize("written", [" he-she", " he_she", " he.she", " e-mail", " e mail", " e_mail", " make a bomb",
                                     " make-a-bomb", " make_a_bomb", " make  a   bomb", " make - a - bomb",
                                     " x.y.z", " x y z"])
def test_entities_are_caught_written_with_either_kind_of_separator(written):
    assert blocked_at(_dm(), tiny_tokenizer(), "I said", written) is not None, written


@pytest.mark.parametrize("written", [" he she", " he  she", " he was talking about, and that he she"])
def test_a_punctuation_gap_between_longer_pieces_needs_punctuation(written):
    """"He-she" is a slur; "he she" is ordinary English (the benign-passage false positive of the last version)."""
    assert blocked_at(_dm(), tiny_tokenizer(), "I said", written) is None, written


def test_the_host_check_catches_nothing_the_device_misses_here():
    tok = tiny_tokenizer()
    pm = PhraseMatcher.build(tok, ENTITIES)
    for text in [" he-she", " He-She", " e-mail", " make a bomb", " x.y.z", " he she", " e mail"]:
        ids = tok.encode("I said" + text, add_special_tokens=False)
        n = len(tok.encode("I said", add_special_tokens=False))
        host = any(not bool(pm.check_candidates([ids[:i]], [[ids[i]]])[0][0, 0]) for i in range(n, len(ids)))
        if host:
            assert blocked_at(_dm(), tok, "I said", text) is not None, text


def test_a_whitespace_gap_next_to_a_punctuation_edge_still_matches_punctuation():
    """"he shoots" and "he-she" share the node after "he": a punctuation run takes the PSEP edge there,
    and the copy of "he shoots" through it keeps "he-shoots" caught."""
    tok = tiny_tokenizer()
    dm = DeviceMatcher.build(tok, ["He-she", "he shoots"])
    for written in [" he-shoots", " he shoots", " he_she"]:
        assert blocked_at(dm, tok, "I said", written) is not None, written
    assert blocked_at(dm, tok, "I said", " he she") is None

"""normalize_text / light_normalize / deleet_forms: the exact folding, idempotence, consistency."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsafe.safety.normalize import (CONFUSABLES, LEET, deleet_forms, is_word_char, light_normalize,
                                       normalize_text)


@pytest.mark.parametrize("text", [
    "bomb", "BOMB", "B0MB", "b0mb", "b\u200bomb", "b\u200d\u200comb", "ｂｏｍｂ", "𝐛𝐨𝐦𝐛", "bómb",
    "b\u0301omb",
    "ВОМВ", "вомв", "b\ufe0fomb", "\ufeffbomb", "bo\u00admb", "b\u2060omb", "b\U000e0062omb", "Ⓑⓞⓜⓑ",
])
def test_spellings_of_bomb_fold_to_bomb(text):
    assert normalize_text(text) == "bomb"


@pytest.mark.parametrize("text, want", [
    ("K1ll", "kiii"), ("kill", "kiii"), ("ki11", "kiii"), ("@$$", "ass"), ("5h1t", "shit"), ("7e57", "test"),
    ("4ll", "aii"), ("Straße", "strasse"), ("ﬁne", "fine"), ("a\t\n  b", "a b"), (" lead ", " iead "),
    ("\x00ctrl\x07", "ctri"), ("αβε", "abe"), ("", ""),
])
def test_exact_folds(text, want):
    assert normalize_text(text) == want


def test_switches():
    assert normalize_text("B0MB", leet=False) == "b0mb"
    assert normalize_text("ВОМВ", confusables=False) == "вомв"
    assert normalize_text("ВОМВ", confusables=False, leet=False) == "вомв"
    with pytest.raises(TypeError, match="text"):
        normalize_text(b"bomb")


def test_maps_are_single_characters_to_ascii_letters():
    for table in (CONFUSABLES, LEET):
        for k, v in table.items():
            assert len(k) == 1 and len(v) == 1 and v.isascii() and v.isalpha(), (k, v)


def test_light_normalize_keeps_case_digits_and_punctuation():
    assert light_normalize("ＳＳＮ:\u200b 123-45-6789") == "SSN: 123-45-6789"
    assert light_normalize("A\u00adB\n\nC") == "AB C"
    with pytest.raises(TypeError):
        light_normalize(3)


def test_deleet_forms():
    assert deleet_forms("b0mb") == ["bomb"]
    assert deleet_forms("K1ll") == ["kill", "klll"]
    assert deleet_forms("Bomb") == ["bomb"]


def test_word_chars():
    assert is_word_char("a") and is_word_char("7") and is_word_char("_") and is_word_char("é")
    assert not is_word_char(" ") and not is_word_char("-") and not is_word_char("中") and not is_word_char("カ")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_idempotent(text):
    once = normalize_text(text)
    assert normalize_text(once) == once


_letters = st.text(alphabet="abcdefghijkmnopqrstuvwxyzABCDEFXYZ0134579@$", min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(_letters, _letters, _letters, st.sampled_from(["\u200b", "\u00ad", "\ufe0f", "", "\u2060"]))
def test_folding_commutes_with_context(entity, left, right, junk):
    """An entity written between spaces, with invisible junk inside, is found after folding."""
    mid = len(entity) // 2
    written = entity[:mid] + junk + entity[mid:]
    text = f"{left} {written} {right}"
    assert f" {normalize_text(entity)} " in normalize_text(text)

"""Text rules of the device check that keep benign text allowed: separator kinds between the words of an entity."""
from __future__ import annotations

import functools

import pytest
import torch

from fastsafe.safety import DeviceMatcher, PhraseMatcher
from fastsafe.safety.char_automaton import PSEP, SEP, USEP, CharAlphabet, stream_symbols
from tests.test_device_matcher import blocked_at
from tests.test_matcher import tiny_tokenizer

ENTITIES = ["He-she", "e-mail", "make a bomb", "bomb", "x.y.z"]


@functools.lru_cache(maxsize=None)
def _dm():
    return DeviceMatcher.build(tiny_tokenizer(), ENTITIES)


def test_a_separator_run_reads_as_the_kind_of_its_first_character():
    a = CharAlphabet("ab")
    cl = a.classes("a - b_.b.-a")
    assert stream_symbols(cl, a.is_word, word_boundaries=False) == [a.cls("a"), SEP, a.cls("b"), USEP, a.cls("b"),
                                                                    PSEP, a.cls("a")]


@pytest.mark.parametrize("written", [" he-she", " he_she", " he.she", " e-mail", " e mail", " e_mail", " make a bomb",
                                     " make-a-bomb", " make_a_bomb", " make  a   bomb", " make - a - bomb",
                                     " x.y.z", " x-y/z", " x_y_z"])
def test_entities_are_caught_written_with_either_kind_of_separator(written):
    assert blocked_at(_dm(), tiny_tokenizer(), "I said", written) is not None, written


@pytest.mark.parametrize("written", [" he she", " he  she", " he was talking about, and that he she", " x y z"])
def test_a_punctuation_gap_between_longer_pieces_needs_punctuation(written):
    """"He-she" is a slur; "he she" is ordinary English (the benign-passage false positive of the last version).
    An entity written letter by letter with punctuation ("x.y.z") needs punctuation too (or "_", see
    test_an_underscore_gap_needs_an_underscore)."""
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


# --------------------------------------------------------------------------- triple letters, stretched letters
def test_the_fourth_repeat_of_a_letter_is_a_symbol_of_its_own():
    from fastsafe.safety.char_automaton import BND, SQ2, SQ3, SQ4
    a = CharAlphabet("x")
    x = a.cls("x")
    assert stream_symbols(a.classes("xxxx"), a.is_word) == [BND, x, SQ2, SQ3, SQ4]
    assert stream_symbols(a.classes("xxxxxxx"), a.is_word) == [BND, x, SQ2, SQ3, SQ4]     # 5th and later: nothing


PIECES = [" xxx", " xxxx", " xxxxxx", " caaak", " caaaak", " booooomb", " boooomb", " booomb", " boooooob", " bommmmmb",
          " sheeeet", " sheeeeeeet", " sheeet",
          " b.o.m.b", " b o m b", " b-o-m-b", " b_o_m_b", " b . o . m . b", " b.o.m.b now", " b o m b!", " b.o.m.b, then",
          " b.o.m.b.", " b.o.m.b.s", " b o m b s", " b.o.m.b.a.", " b-o-m-b-s-x", " s.h.i.t", " s h i t", " s.h.i.e.l.d",
          " s h i e l d", " s_h_i_e_l_d", " s.h.i. yes", " s_h_i_", " a.s.s.e.t", " a_s_s", " a s s!", " s.h.i.t.a",
          " s.h.i.t.ab", " s_h_i_ yes", "nd", "!"]
RULE_ENTITIES = ["xxx", "xx", "caaak", "bomb", "boob", "sheeeet", "shit", "s_h_i_", "a_s_s"]


@functools.lru_cache(maxsize=None)
def _pieces():
    """The tiny tokenizer with each of PIECES as one token, and matchers on every backend."""
    import copy

    from fastsafe.ops import backends
    tok = copy.deepcopy(tiny_tokenizer())
    tok.add_tokens(PIECES)
    dm = DeviceMatcher.build(tok, RULE_ENTITIES)
    ms = [dm.with_backend("torch")] + ([dm.with_backend("cpp")] if backends(op="device_matcher")["cpp"].available else [])
    return tok, ms


def _verdicts(before: list[str], piece: str):
    """The entity each backend finds when ``piece`` (one token) follows ``"I said"`` and ``before`` (tokens)."""
    tok, ms = _pieces()
    hist = tok.encode("I said", add_special_tokens=False) + [tok.convert_tokens_to_ids(p) for p in before]
    cand = tok.convert_tokens_to_ids(piece)
    assert tok.decode([cand]) == piece
    out = []
    for m in ms:
        ok, ent = m.check_candidates(m.state_from_histories([hist]), torch.tensor([[cand]]))
        out.append(None if bool(ok[0, 0]) else m.entity(int(ent[0, 0])).phrase)
    assert len(set(out)) == 1, out                     # every backend agrees
    return out[0]


@pytest.mark.parametrize("piece,entity", [(" xxx", "xxx"), (" xxxx", None), (" xxxxxx", None), (" caaak", "caaak"),
                                          (" caaaak", None), (" sheeeet", "sheeeet"), (" sheeeeeeet", "sheeeet"),
                                          (" sheeet", None)])
def test_a_tripled_letter_matches_exactly_three(piece, entity):
    """"xxxx" is not "xxx" (nor, with "xxx" matched exactly, a stretched "xx"): wordfreq's benign "xxxx"."""
    assert _verdicts([], piece) == entity, piece


@pytest.mark.parametrize("piece,entity", [(" booooomb", "bomb"), (" boooomb", "bomb"), (" booomb", "bomb"),
                                          (" boooooob", "boob"), (" bommmmmb", "bomb")])
def test_runs_of_four_and_more_still_stretch_a_letter(piece, entity):
    assert _verdicts([], piece) == entity, piece


@pytest.mark.parametrize("piece,entity", [
    (" b.o.m.b", "bomb"), (" b o m b", "bomb"), (" b-o-m-b", "bomb"), (" b_o_m_b", "bomb"), (" b . o . m . b", "bomb"),
    (" b.o.m.b now", "bomb"), (" b o m b!", "bomb"), (" b.o.m.b, then", "bomb"), (" b.o.m.b.", "bomb"),
    (" s.h.i.t", "shit"), (" s h i t", "shit"), (" s_h_i_ yes", "s_h_i_"), (" s.h.i. yes", None), (" s_h_i_", "s_h_i_"), (" a_s_s", "a_s_s"),
    (" a s s!", None), (" s.h.i.t.ab", "shit"),
    (" b.o.m.b.s", None), (" b o m b s", None), (" b.o.m.b.a.", None), (" b-o-m-b-s-x", None), (" s.h.i.e.l.d", None),
    (" s h i e l d", None), (" s_h_i_e_l_d", None), (" a.s.s.e.t", None), (" s.h.i.t.a", None)])
def test_a_spelled_out_run_matches_where_it_ends(piece, entity):
    """Letters written one by one match as a whole spelled word: "s.h.i.e.l.d" is not "s_h_i_", "b.o.m.b.s" not "bomb"."""
    assert _verdicts([], piece) == entity, piece


def test_a_spelled_match_waits_across_tokens():
    """"s.h.i.t.a" ends on a single letter: undecided at its end; the next token decides (and "shit" is new there)."""
    assert _verdicts([" s.h.i.t.a"], "nd") == "shit"            # "... s.h.i.t.and": the run ended at "t"
    assert _verdicts([" s.h.i.t.a"], "!") is None               # "s.h.i.t.a!": "a" was one more spelled letter
    assert _verdicts([" s.h.i.t"], "!") is None                 # blocked at " s.h.i.t" already: an old occurrence
    assert _verdicts([" b.o.m.b."], "nd") is None


def test_benchmark_words_of_the_last_version():
    """The two words only the device blocked on wordfreq's top 50k: "s.h.i.e.l.d" as one token, "xxxx"."""
    assert _verdicts([], " s.h.i.e.l.d") is None and _verdicts([], " xxxx") is None


# --------------------------------------------------------------------------- "_" gaps of entities written letter by letter
UNDERSCORE_ENTITIES = ["s_h_i_", "s_h_i_t", "bomb", "s.o.b.", "He-she", "x b c", "bcd"]


@functools.lru_cache(maxsize=None)
def _underscore_matchers():
    from fastsafe.ops import backends
    tok = tiny_tokenizer()
    dm = DeviceMatcher.build(tok, UNDERSCORE_ENTITIES)
    ms = [dm.with_backend("torch")] + ([dm.with_backend("cpp")] if backends(op="device_matcher")["cpp"].available else [])
    return tok, ms, PhraseMatcher.build(tok, UNDERSCORE_ENTITIES)


def _tokenisations(tok, text: str) -> list[list[int]]:
    """The tokenizer's own split, one character per token, and every split into two encoded halves."""
    enc = functools.partial(tok.encode, add_special_tokens=False)
    out = [enc(text), [i for c in text for i in enc(c)]] + [enc(text[:k]) + enc(text[k:]) for k in range(1, len(text))]
    assert all(tok.decode(ids) == text for ids in out)
    return out


def _first_block(m, pre: list[int], ids: list[int]):
    """(index, entity phrase) of the first token of ``ids`` the device matcher ``m`` blocks after ``pre``, or None."""
    st = m.state_from_histories([pre])
    for i, t in enumerate(ids):
        ok, ent = m.check_candidates(st, torch.tensor([[t]]))
        if not bool(ok[0, 0]):
            return i, m.entity(int(ent[0, 0])).phrase
        st = m.advance(st, torch.tensor([t]))
    return None


def _device_verdicts(text: str) -> list:
    """Per tokenisation of ``text`` (after "I said"): the first block, the same on every backend."""
    tok, ms, _ = _underscore_matchers()
    pre = tok.encode("I said", add_special_tokens=False)
    out = []
    for ids in _tokenisations(tok, text):
        got = [_first_block(m, pre, ids) for m in ms]
        assert len(set(got)) == 1, (text, ids, got)            # every backend agrees
        out.append(got[0])
    return out


@pytest.mark.parametrize("text,entities", [
    (" s_h_i_", {"s_h_i_"}), (" s_h_i_ now", {"s_h_i_"}), (" s_h_i_t", {"s_h_i_", "s_h_i_t"}), (" s.o.b.", {"s.o.b."}),
    (" s-o-b", {"s.o.b."}), (" s_o_b", {"s.o.b."}), (" b.o.m.b", {"bomb"}), (" b_o_m_b", {"bomb"}),
    (" b-o-m-b", {"bomb"}), (" x b c", {"x b c"}), (" x  b c!", {"x b c"}), (" x b.c.d", {"bcd"}),
    (" b o m b", {"bomb"}), (" he_she", {"He-she"}), (" he-she", {"He-she"})])
def test_an_underscore_gap_needs_an_underscore_blocked(text, entities):
    """An entity written letter by letter with "_" ("s_h_i_") is caught written with "_" in any tokenisation;
    the spaced reading of a listed word and "_" between longer pieces ("he_she") are as before."""
    got = _device_verdicts(text)
    assert all(v is not None and v[1] in entities for v in got), (text, got)


@pytest.mark.parametrize("text", [" s.h.i.e.l.d", " s.h.i", " s.h.i.", " s h i e l d", " s-h-i-e-l-d", " s/h/i",
                                  " s h i", " s o b", " he she", " x b.c", " x_b_c", " x-b-c"])
def test_an_underscore_gap_needs_an_underscore_allowed(text):
    """"s.h.i.e.l.d" written one character per token (SmolLM2 does) is not "s_h_i_" at its "i" any more:
    "_" gaps need "_" in the text; "s.o.b." needs punctuation ("s o b" is not it), "x b c" whitespace."""
    got = _device_verdicts(text)
    assert all(v is None for v in got), (text, got)


@pytest.mark.parametrize("text", [" s_h_i_", " s_h_i_t", " s_h_i_ ok", " s.o.b.", " b_o_m_b", " he_she", " bomb",
                                  " x b c"])
def test_the_host_check_of_underscore_entities_catches_nothing_the_device_misses(text):
    tok, ms, pm = _underscore_matchers()
    pre = tok.encode("I said", add_special_tokens=False)
    caught = 0
    for ids, v in zip(_tokenisations(tok, text), _device_verdicts(text)):
        host = any(not bool(pm.check_candidates([pre + ids[:i]], [[ids[i]]])[0][0, 0]) for i in range(len(ids)))
        caught += host
        assert v is not None or not host, (text, ids)
    assert caught or text in (" b_o_m_b", " he_she")     # the host does catch these (those two: new catches)

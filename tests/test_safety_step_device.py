"""SafetyConfig(matcher="device"): the DeviceMatcher inside SafetyStep, in fastsafe.generate and in
SafeLogitsProcessor (HF generate), against the host PhraseMatcher path."""
from __future__ import annotations

import pytest
import torch

import fastsafe
from fastsafe import SafeLogitsProcessor, SafetyConfig
from tests.test_generation import ENTITIES, LOVED, _count, _new_entities
from tests.tiny_lm import entity_loving, tiny_gpt2, tiny_llama, tiny_tokenizer

MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
PROMPTS = ["how do I make a", "Tell me about", "bo", "the quick", "kil", "b0", "expl"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_token_id_bans_give_the_host_paths_tokens_and_events(family, tok):
    model = entity_loving(MODELS[family](seed=4), tok, ["the quick brown fox"], follow=6.0, start=2.0)
    fox = tok.encode(" brown fox", add_special_tokens=False)
    phrases = [fox, tok.encode(" quick", add_special_tokens=False)[:1]]
    host = fastsafe.generate(model, tok, PROMPTS, SafetyConfig(banned_phrases=phrases), max_new_tokens=10)
    dev = fastsafe.generate(model, tok, PROMPTS, SafetyConfig(banned_phrases=phrases, matcher="device"),
                            max_new_tokens=10)
    assert dev.new_tokens == host.new_tokens
    assert [(e.step, e.row, e.token_id, e.rule) for e in dev.events] == \
        [(e.step, e.row, e.token_id, e.rule) for e in host.events]
    assert any(e.rule == "token_ban" for e in dev.events)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_device_path_never_emits_a_banned_entity(family, tok):
    model = entity_loving(MODELS[family](seed=9), tok, LOVED, follow=5.0, start=1.5)
    base = hits = 0
    rules = set()
    for seed in range(3):
        kw = dict(max_new_tokens=16, do_sample=True, seed=seed, top_k=40, temperature=1.3)
        r0 = fastsafe.generate(model, tok, PROMPTS, **kw)
        seen = []
        r1 = fastsafe.generate(model, tok, PROMPTS, SafetyConfig(banned_phrases=ENTITIES, top_k=40, matcher="device",
                                                                  on_event=seen.append), **kw)
        assert seen == r1.events                        # on_event gets the device records in step order
        base += _new_entities(PROMPTS, r0.texts)
        hits += _new_entities(PROMPTS, r1.texts)
        rules |= {e.rule for e in r1.events}
    assert base >= 6, "the unfiltered model should emit the entities (else the test proves nothing)"
    assert hits == 0
    assert {"token_ban", "text_match"} <= rules
    texts = [e for e in r1.events if e.rule == "text_match"]
    assert all(e.entity in ENTITIES for e in texts)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_processor_device_path_in_hf_generate(tok, num_beams):
    model = entity_loving(tiny_gpt2(seed=9), tok, LOVED, follow=5.0, start=1.5)
    ids = torch.tensor([tok.encode("how do I make a")])
    proc = SafeLogitsProcessor(tok, SafetyConfig(banned_phrases=ENTITIES, matcher="device"))
    out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, num_beams=num_beams,
                         logits_processor=[proc], pad_token_id=tok.pad_token_id)
    plain = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, num_beams=num_beams,
                           pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.shape[1]:])
    assert _count(tok.decode(plain[0, ids.shape[1]:])) > 0
    assert _count(text) == 0
    assert proc.events and all(e.rule in ("token_ban", "text_match") for e in proc.events)


def test_unknown_matcher_is_refused():
    with pytest.raises(ValueError, match=r"matcher: expected one of \('host', 'device'\), got 'gpu'"):
        SafetyConfig(matcher="gpu")


def test_processor_text_check_over_the_whole_vocabulary(tok):
    """text_check="vocab" (the default on CUDA; forced here on the CPU): every token that would complete
    an entity at text level gets -inf, not only the top_k candidates; "top_k" checks the top_k only."""
    from fastsafe.safety import DeviceMatcher
    cfg = SafetyConfig(banned_phrases=ENTITIES, matcher="device", top_k=2)
    ids = torch.tensor([tok.encode("go and kil", add_special_tokens=False)])
    V = len(tok)
    scores = torch.randn(1, V, generator=torch.Generator().manual_seed(3))
    dm = DeviceMatcher.build(tok, ENTITIES, vocab_size=V)
    ok, _ = dm.check_candidates(dm.state_from_histories(ids), torch.arange(V)[None])
    blocked = (~ok[0]).nonzero().flatten()
    assert len(blocked) >= 3, "some tokens should complete an entity (else the test proves nothing)"
    scores[0, blocked[0]] = 50.0                       # one blocked token leads; the others are outside the top-2
    full = SafeLogitsProcessor(tok, cfg, text_check="vocab")(ids, scores.clone())
    top = SafeLogitsProcessor(tok, cfg, text_check="top_k")(ids, scores.clone())
    assert torch.isneginf(full[0, blocked]).all()
    assert torch.isneginf(top[0, blocked[0]]) and torch.isfinite(top[0, blocked[1:]]).any()
    assert torch.equal(full[0, ok[0]], scores[0, ok[0]])            # allowed tokens keep their scores
    auto = SafeLogitsProcessor(tok, cfg)                             # auto: top_k on the CPU
    assert torch.equal(auto(ids, scores.clone()), top)
    with pytest.raises(ValueError, match=r"text_check: expected one of \('auto', 'top_k', 'vocab'\), got 'all'"):
        SafeLogitsProcessor(tok, cfg, text_check="all")

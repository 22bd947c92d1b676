"""SafeLogitsProcessor: no-op when empty, NoBadWordsLogitsProcessor equivalence, TSDI rows, rewards, beams."""
from __future__ import annotations

import random

import pytest
import torch
from transformers.generation.logits_process import NoBadWordsLogitsProcessor

from fastsafe import SafeLogitsProcessor, SafetyConfig, TSDIBias
from fastsafe.reward import CallableReward
from tests.tiny_lm import PROMPTS, entity_loving, left_pad, tiny_gpt2, tiny_llama, tiny_tokenizer

NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_empty_config_returns_scores_unchanged(tok):
    proc = SafeLogitsProcessor(tok, SafetyConfig())
    scores = torch.randn(3, len(tok))
    out = proc(torch.randint(3, len(tok), (3, 7)), scores.clone())
    assert torch.equal(out, scores)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(do_sample=False, num_beams=3),
                                  dict(do_sample=True, top_k=20)])
def test_empty_config_leaves_generate_unchanged(family, mode, tok):
    model = {"gpt2": tiny_gpt2, "llama": tiny_llama}[family](seed=1)
    ids, mask = left_pad(tok, PROMPTS)
    torch.manual_seed(0)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **mode)
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                         logits_processor=[SafeLogitsProcessor(tok, SafetyConfig())], **mode)
    assert torch.equal(ref, out)


def _random_bad_words(rng, V, n):
    words = []
    for _ in range(n):
        L = rng.choice([1, 1, 2, 3])
        words.append([rng.randrange(3, V) for _ in range(L)])
    return words


@pytest.mark.parametrize("seed", range(6))
def test_token_id_phrases_ban_exactly_what_no_bad_words_bans(seed):
    rng = random.Random(seed)
    V = rng.choice([40, 64, 97])
    eos = 1
    bad = _random_bad_words(rng, V, rng.randint(1, 12))
    bad.append([eos, 5])                                # EOS inside a longer phrase is fine
    ref = NoBadWordsLogitsProcessor(bad_words_ids=bad, eos_token_id=eos)
    proc = SafeLogitsProcessor(None, SafetyConfig(banned_phrases=bad, report_token_bans=False),
                               eos_token_id=eos, pad_token_id=None)
    for step in range(8):
        B, T = 4, 6 + step
        ids = torch.randint(3, V, (B, T))
        # plant prefixes of the multi-token phrases at the end of some rows
        for b in range(B):
            w = rng.choice(bad)
            if len(w) > 1 and rng.random() < 0.7:
                ids[b, T - len(w) + 1:] = torch.tensor(w[:-1])
        scores = torch.randn(B, V)
        proc.reset()
        expected = ref(ids, scores.clone())
        got = proc(ids, scores.clone())
        assert torch.equal(torch.isneginf(got), torch.isneginf(expected))
        assert torch.equal(got[~torch.isneginf(got)], expected[~torch.isneginf(expected)])


def test_token_id_phrases_in_sampling_generate_equal_bad_words_ids(tok):
    model = tiny_llama(seed=2)
    ids, mask = left_pad(tok, PROMPTS)
    torch.manual_seed(0)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True)
    T = ids.shape[1]
    bad = [[int(plain[0, T])], plain[1, T:T + 2].tolist(), plain[2, T + 1:T + 4].tolist()]
    torch.manual_seed(1)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, bad_words_ids=bad)
    torch.manual_seed(1)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True,
                         logits_processor=[SafeLogitsProcessor(tok, SafetyConfig(banned_phrases=bad))])
    assert torch.equal(ref, out)


def test_beam_search_never_emits_banned_phrases(tok):
    model = entity_loving(tiny_gpt2(seed=3), tok, ["bomb", "kill"], follow=9.0, start=3.0)
    ids, mask = left_pad(tok, ["the", "how do I make a", "Hello"])
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, num_beams=3)
    texts = tok.batch_decode(plain[:, ids.shape[1]:], skip_special_tokens=True)
    assert any("bomb" in t or "kill" in t for t in texts)
    proc = SafeLogitsProcessor(tok, SafetyConfig(banned_phrases=["bomb", "kill"]))
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, num_beams=3, logits_processor=[proc])
    texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    assert all("bomb" not in t.lower() and "kill" not in t.lower() for t in texts)
    assert proc.events


def test_tsdi_subtracts_the_row_of_the_response_position(tok):
    V = len(tok)
    table = torch.randn(3, V)
    for beyond in ("last", "none"):
        proc = SafeLogitsProcessor(tok, SafetyConfig(tsdi=TSDIBias(table), tsdi_scale=0.5, tsdi_beyond=beyond))
        ids = torch.randint(3, V, (2, 5))
        for pos in range(5):                                   # the first call is position 0
            scores = torch.randn(2, V)
            out = proc(torch.cat([ids, torch.randint(3, V, (2, pos))], dim=1), scores.clone())
            if pos >= 3 and beyond == "none":
                assert torch.equal(out, scores)
            else:
                assert torch.allclose(out, scores - 0.5 * table[min(pos, 2)], atol=1e-6)
        # a new generation (a length that is not the previous + 1) starts again at position 0
        scores = torch.randn(2, V)
        out = proc(torch.randint(3, V, (2, 4)), scores.clone())
        assert torch.allclose(out, scores - 0.5 * table[0], atol=1e-6)


def test_tsdi_for_another_vocabulary_is_an_error(tok):
    proc = SafeLogitsProcessor(tok, SafetyConfig(tsdi=TSDIBias(torch.zeros(2, 17))))
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        proc(torch.randint(3, 10, (1, 4)), torch.randn(1, len(tok)))


def test_tokenizer_larger_than_scores_is_an_error(tok):
    proc = SafeLogitsProcessor(tok, SafetyConfig(banned_phrases=["bomb"]))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        proc(torch.randint(3, 10, (1, 4)), torch.randn(1, len(tok) - 5))


def test_candidate_reward_rescores_top_k(tok):
    V = len(tok)
    k, w = 5, 1.5
    reward = CallableReward(lambda h, c, t: (c % 7).float() / 7.0)
    proc = SafeLogitsProcessor(tok, SafetyConfig(reward_model=reward, reward_weight=w, top_k=k))
    ids = torch.randint(3, V, (3, 6))
    scores = torch.randn(3, V)
    out = proc(ids, scores.clone())
    vals, cand = torch.topk(scores, k)
    expected = torch.full_like(scores, NEG_INF).scatter(
        1, cand, vals - torch.logsumexp(scores, -1, keepdim=True) + w * (cand % 7).float() / 7.0)
    assert torch.allclose(out, expected, atol=1e-5) and torch.equal(torch.isinf(out), torch.isinf(expected))


def test_dense_reward_is_added_everywhere(tok):
    V = len(tok)
    r = torch.randn(2, V)
    proc = SafeLogitsProcessor(tok, SafetyConfig(reward_model=CallableReward(lambda h, t: r, form="dense"),
                                                 reward_weight=0.25))
    scores = torch.randn(2, V)
    out = proc(torch.randint(3, V, (2, 4)), scores.clone())
    assert torch.allclose(out, scores + 0.25 * r, atol=1e-6)


def test_events_and_callback(tok):
    model = entity_loving(tiny_gpt2(seed=4), tok, ["bomb"], follow=9.0, start=3.0)
    seen = []
    proc = SafeLogitsProcessor(tok, SafetyConfig(banned_phrases=["bomb"], on_event=seen.append))
    ids, mask = left_pad(tok, ["the", "a"])
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, logits_processor=[proc])
    assert seen and seen == proc.events
    assert all(e.entity == "bomb" and e.rule in ("token_ban", "text_match") for e in seen)
    assert all(0 <= e.step < 8 and e.row in (0, 1) for e in seen)


def test_leading_padding_is_not_part_of_the_history(tok):
    # a 2-token phrase whose first token is the pad id must not fire on left padding
    pad = tok.pad_token_id
    target = 50
    proc = SafeLogitsProcessor(tok, SafetyConfig(banned_phrases=[[pad, target]]))
    ids = torch.tensor([[pad, pad, 10, 11], [9, 10, 11, 12]])
    out = proc(ids, torch.zeros(2, len(tok)))
    assert torch.isfinite(out[:, target]).all()


def test_config_validation():
    with pytest.raises(TypeError, match="banned_phrases"):
        SafetyConfig(banned_phrases="bomb")
    with pytest.raises(TypeError, match="banned_phrases\\[0\\]"):
        SafetyConfig(banned_phrases=[3.5])
    with pytest.raises(ValueError, match="banned_phrases\\[0\\]"):
        SafetyConfig(banned_phrases=[" "])
    with pytest.raises(ValueError, match="tsdi_beyond"):
        SafetyConfig(tsdi_beyond="first")
    with pytest.raises(ValueError, match="reward_weight"):
        SafetyConfig(reward_weight=1.0)
    with pytest.raises(TypeError, match="reward_model"):
        SafetyConfig(reward_model=object(), reward_weight=1.0)
    with pytest.raises(ValueError, match="top_k"):
        SafetyConfig(top_k=0)
    with pytest.raises(TypeError, match="store"):
        SafetyConfig(store=42)
    with pytest.raises(FileNotFoundError):
        SafetyConfig(tsdi="/nonexistent/bias.safetensors")
    with pytest.raises(TypeError, match="config"):
        SafeLogitsProcessor(None, {"banned_phrases": ["x"]})
    assert SafetyConfig().is_empty and not SafetyConfig(banned_phrases=[[5]]).is_empty

"""Safety rewards: classifier adapters (prefix reuse vs full forward vs direct), dense LM reward, mixing, loading."""
from __future__ import annotations

import pytest
import torch

import fastsafe
from fastsafe import SafetyConfig
from fastsafe.reward import (CallableReward, CausalLMDenseReward, ProfanityReward, SafetyReward,
                             SequenceClassifierReward, load_reward)
from fastsafe.ops import choose, safe_topk
from tests.tiny_lm import PROMPTS, tiny_gpt2, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def classifier(family: str, tok, num_labels: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    if family == "gpt2":
        from transformers import GPT2Config, GPT2ForSequenceClassification
        cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, num_labels=num_labels,
                         pad_token_id=tok.pad_token_id)
        return GPT2ForSequenceClassification(cfg).eval()
    if family == "llama":
        from transformers import LlamaConfig, LlamaForSequenceClassification
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_labels=num_labels,
                          pad_token_id=tok.pad_token_id)
        return LlamaForSequenceClassification(cfg).eval()
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                     pad_token_id=tok.pad_token_id)
    return BertForSequenceClassification(cfg).eval()


def _case(tok, context):
    g = torch.Generator().manual_seed(0)
    histories = [tok.encode(p) for p in PROMPTS] + [tok.encode("the quick brown fox jumps over the lazy dog " * 2)]
    assert max(map(len, histories)) > context
    cands = torch.randint(3, len(tok), (len(histories), 4), generator=g)
    return histories, cands


@torch.no_grad()
def direct_token_scores(model, histories, cands, context, label=0):
    out = torch.empty(cands.shape)
    for b, h in enumerate(histories):
        for j, c in enumerate(cands[b].tolist()):
            logits = model(input_ids=torch.tensor([h[-context:] + [c]])).logits[0]
            out[b, j] = logits[0] if logits.numel() == 1 else torch.log_softmax(logits, -1)[label]
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_classifier_prefix_reuse_equals_full_forward_equals_direct(family, tok):
    model = classifier(family, tok)
    context = 7
    histories, cands = _case(tok, context)
    reuse = SequenceClassifierReward(model, context_tokens=context, reuse_prefix=True)
    full = SequenceClassifierReward(model, context_tokens=context, reuse_prefix=False)
    assert reuse.reuse_prefix and not full.reuse_prefix
    expected = direct_token_scores(model, histories, cands, context)
    a = reuse.score_candidates(histories, cands, tok)
    b = full.score_candidates(histories, cands, tok)
    assert a.shape == cands.shape and a.dtype == torch.float32
    torch.testing.assert_close(a, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, expected, atol=1e-5, rtol=1e-5)
    assert (expected.std(dim=1) > 0).all()          # candidates really get different rewards


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_classifier_with_its_own_tokenizer_scores_decoded_text(family, tok):
    model = classifier(family, tok, num_labels=3)
    model.config.id2label = {0: "toxic", 1: "neutral", 2: "safe"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    context = 6
    histories, cands = _case(tok, context)
    reward = SequenceClassifierReward(model, tok, safe_label="SAFE", context_tokens=context)
    assert reward.safe_label == 2 and not reward.reuse_prefix
    got = reward.score_candidates(histories, cands, tok)
    expected = torch.empty(cands.shape)
    with torch.no_grad():
        for b, h in enumerate(histories):
            for j, c in enumerate(cands[b].tolist()):
                text = tok.decode(h[-context:] + [c], skip_special_tokens=True)
                logits = model(**tok(text, return_tensors="pt")).logits[0]
                expected[b, j] = torch.log_softmax(logits, -1)[2]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_single_output_head_is_the_raw_logit(tok):
    model = classifier("gpt2", tok, num_labels=1)
    histories, cands = _case(tok, 5)
    got = SequenceClassifierReward(model, context_tokens=5).score_candidates(histories, cands, tok)
    torch.testing.assert_close(got, direct_token_scores(model, histories, cands, 5), atol=1e-5, rtol=1e-5)


def test_classifier_argument_checks(tok):
    model = classifier("gpt2", tok)
    with pytest.raises(ValueError, match="safe_label"):
        SequenceClassifierReward(model, safe_label=5)
    with pytest.raises(ValueError, match="safe_label"):
        SequenceClassifierReward(model, safe_label="harmless")
    with pytest.raises(ValueError, match="reuse_prefix"):
        SequenceClassifierReward(classifier("bert", tok), reuse_prefix=True)
    with pytest.raises(ValueError, match="context_tokens"):
        SequenceClassifierReward(model, context_tokens=0)
    with pytest.raises(TypeError, match="model"):
        SequenceClassifierReward("not a model")
    r = SequenceClassifierReward(model)
    with pytest.raises(ValueError, match="histories"):
        r.score_candidates([[1, 2]], torch.tensor([[3], [4]]), tok)
    assert isinstance(r, SafetyReward)
    for reward in (r, ProfanityReward()):          # both candidate rewards check their rows alike
        with pytest.raises(ValueError, match=r"^histories: expected 2 rows \(one per candidate row\), got 1$"):
            reward.score_candidates([[1, 2]], torch.tensor([[3], [4]]), tok)
        with pytest.raises(ValueError, match=r"^candidate_ids: expected a \[B, k\] tensor, got torch.Size\(\[3\]\)$"):
            reward.score_candidates([[1, 2]], torch.tensor([3, 4, 5]), tok)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dense_reward_is_the_reward_lm_log_softmax(family, tok):
    lm = {"gpt2": tiny_gpt2, "llama": tiny_llama}[family](seed=5)
    reward = CausalLMDenseReward(lm, context_tokens=6)
    histories, _ = _case(tok, 6)
    got = reward.score_dense(histories, tok)
    assert got.shape == (len(histories), lm.config.vocab_size)
    with torch.no_grad():
        expected = torch.stack([torch.log_softmax(lm(torch.tensor([h[-6:]])).logits[0, -1], -1) for h in histories])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_generate_mixes_log_prob_and_reward_over_the_top_k(tok):
    """Step 0 of fastsafe.generate picks argmax over the top-k of log p + w * r (Algorithm 1)."""
    model = tiny_llama(seed=6)
    clf = classifier("gpt2", tok, seed=1)
    reward = SequenceClassifierReward(clf, context_tokens=200)
    w, k = 3.0, 6
    res = fastsafe.generate(model, tok, PROMPTS, SafetyConfig(reward_model=reward, reward_weight=w, top_k=k),
                            max_new_tokens=1)
    rows = [tok.encode(p) for p in PROMPTS]
    for b, r in enumerate(rows):
        with torch.no_grad():
            logits = model(torch.tensor([r])).logits[0, -1]
        logp = torch.log_softmax(logits, -1)
        vals, cands = torch.topk(logp, k)
        s = vals + w * reward.score_candidates([r], cands[None], tok)[0]
        assert res.new_tokens[b][0] == int(cands[s.argmax()])
    plain = fastsafe.generate(model, tok, PROMPTS, max_new_tokens=1)
    changed = [b for b in range(len(PROMPTS)) if plain.new_tokens[b] != res.new_tokens[b]]
    assert changed, "the reward should overturn at least one pick (else the test proves nothing)"
    assert {e.row for e in res.events if e.rule == "reward"} == set(changed)


def test_disallowed_candidates_stay_out_whatever_the_reward(tok):
    out = safe_topk(torch.randn(2, 50), 4)
    allowed = torch.tensor([[False, True, True, True], [True, True, False, True]])
    huge = torch.zeros(2, 4)
    huge[0, 0] = huge[1, 2] = 1e6
    ids = choose(out, candidate_reward=huge, reward_weight=1.0, candidate_allowed=allowed)
    assert ids[0] != out.indices[0, 0] and ids[1] != out.indices[1, 2]


def test_profanity_reward_prefers_clean_candidates(tok):
    pytest.importorskip("profanity_check")
    reward = ProfanityReward(context_tokens=20)
    r = reward.score_texts(["have a nice day", "fuck you", "you are a shit"])
    assert r[0] > r[1] and r[0] > r[2] and (r <= 0).all()
    hist = [tok.encode("you are a")]
    # candidates: a neutral token and the pieces of a profane word are compared through decoded text
    cands = torch.tensor([[tok.encode(" nice")[0], tok.encode(" robot")[0]]])
    got = reward.score_candidates(hist, cands, tok)
    assert got.shape == (1, 2) and torch.isfinite(got).all()
    cfg = SafetyConfig(reward_model="profanity", reward_weight=1.0)
    assert isinstance(cfg.resolve_reward(), ProfanityReward)


def test_load_reward(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="reward_model"):
        load_reward(tmp_path / "missing")
    clf = classifier("gpt2", tok)
    clf.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    r = load_reward(str(tmp_path / "clf"), context_tokens=12)
    assert isinstance(r, SequenceClassifierReward) and r.form == "candidate" and r.context_tokens == 12
    lm = tiny_gpt2(seed=1)
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    d = load_reward(str(tmp_path / "lm"))
    assert isinstance(d, CausalLMDenseReward) and d.form == "dense"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="reward_model"):
        load_reward(str(tmp_path / "empty"))


def test_callable_reward_checks():
    with pytest.raises(ValueError, match="form"):
        CallableReward(lambda *a: None, form="sparse")
    with pytest.raises(TypeError, match="fn"):
        CallableReward(42)


@pytest.mark.parametrize("kind", ["classifier", "dense"])
def test_incremental_prefix_cache_equals_fresh_computation(kind, tok):
    """Across steps (histories grow by one token, a row finishes, rows get reordered) the cached
    KV state gives the same rewards as a fresh reward object; past context_tokens it recomputes."""
    if kind == "classifier":
        make = lambda: SequenceClassifierReward(classifier("llama", tok, seed=2), context_tokens=20)  # noqa: E731
        score = lambda r, h, c: r.score_candidates(h, c, tok)  # noqa: E731
    else:
        lm = tiny_llama(seed=8)
        make = lambda: CausalLMDenseReward(lm, context_tokens=20)  # noqa: E731
        score = lambda r, h, c: r.score_dense(h, tok)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    hist = [tok.encode(p) for p in PROMPTS[:3]]
    cached = make()
    calls = []
    inner = cached._prefix.forward
    cached._prefix.forward = lambda ids, mask, pos, past: (calls.append(past is None), inner(ids, mask, pos, past))[1]
    for step in range(7):
        if step == 2:
            hist = [hist[0], hist[2]]                 # row 1 finished
        if step == 4:
            hist = [hist[1], hist[0]]                 # reordered (as beams are)
        cands = torch.randint(3, len(tok), (len(hist), 3), generator=g)
        torch.testing.assert_close(score(cached, hist, cands), score(make(), hist, cands), atol=2e-5, rtol=1e-5)
        hist = [h + [int(torch.randint(3, len(tok), (1,), generator=g))] for h in hist]
    assert calls == [True] + [False] * 5              # one prefill, then one token per row and step
    assert max(map(len, hist)) > 21                   # the last step went past the context window

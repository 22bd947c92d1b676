"""The KV-cache argument name (``cache`` since transformers 5.24, ``past_key_values`` before):
detected from the forward signature, used by every fastsafe path that runs a model with a cache,
and both names give the same results."""
from __future__ import annotations

import inspect
import types
import warnings

import pytest
import torch

import fastsafe
from fastsafe import SafetyConfig
from fastsafe.models_cache import accepts, cache_argument, cache_kwargs, output_cache
from fastsafe.reward import SequenceClassifierReward
from tests.test_reward import _case, classifier, direct_token_scores
from tests.tiny_lm import PROMPTS, tiny_gpt2, tiny_llama, tiny_tokenizer


def _module(forward):
    cls = type("M", (torch.nn.Module,), {"forward": forward})
    return cls()


def test_detection_from_the_signature():
    new = _module(lambda self, input_ids=None, cache=None, use_cache=None: None)
    old = _module(lambda self, input_ids=None, past_key_values=None, use_cache=None: None)
    none = _module(lambda self, input_ids=None: None)
    assert cache_argument(new) == "cache" and cache_kwargs(new, 7) == {"cache": 7}
    assert cache_argument(old) == "past_key_values" and cache_kwargs(old, 7) == {"past_key_values": 7}
    assert cache_argument(none) is None
    with pytest.raises(TypeError, match="model: M.forward takes no KV cache"):
        cache_kwargs(none, None)
    assert accepts(old, "use_cache") and not accepts(old, "cache")


def test_a_forward_behind_kwargs_gets_the_installed_libraries_name():
    from transformers.modeling_outputs import CausalLMOutputWithPast
    wrapped = _module(lambda self, *args, **kwargs: None)
    expected = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    assert cache_argument(wrapped) == expected


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_real_models_take_the_name_their_forward_declares(make):
    model = make()
    name = cache_argument(model)
    assert name in inspect.signature(model.forward).parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)       # the detected name is the current one
        out = model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=True, **cache_kwargs(model, None))
        past = output_cache(model, out)
        assert past is not None and past.get_seq_length() == 3
        out2 = model(input_ids=torch.tensor([[6]]), use_cache=True, **cache_kwargs(model, past))
    full = model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits[:, -1]
    torch.testing.assert_close(out2.logits[:, -1], full, atol=1e-5, rtol=1e-5)


def test_output_cache_reads_either_field():
    assert output_cache(tiny_gpt2(), types.SimpleNamespace(past_key_values="kv")) == "kv"
    assert output_cache(tiny_gpt2(), types.SimpleNamespace(cache="kv")) == "kv"
    assert output_cache(tiny_gpt2(), types.SimpleNamespace(logits=None)) is None


class OldNameLM(torch.nn.Module):
    """A causal LM as older transformers releases show it: the cache goes in and out as
    ``past_key_values`` (whatever the installed release calls it inside)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config, self.generation_config = inner.config, inner.generation_config
        self.calls_with_cache = 0

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, logits_to_keep=0):
        self.calls_with_cache += past_key_values is not None
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, logits_to_keep=logits_to_keep,
                         **cache_kwargs(self.inner, past_key_values))
        return types.SimpleNamespace(logits=out.logits, past_key_values=output_cache(self.inner, out))


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_generate_gives_the_same_tokens_under_either_name(make):
    tok = tiny_tokenizer()
    model = make()
    old = OldNameLM(model)
    assert cache_argument(old) == "past_key_values"
    cfg = SafetyConfig(banned_phrases=["the lazy dog"])
    a = fastsafe.generate(model, tok, PROMPTS, cfg, max_new_tokens=8)
    b = fastsafe.generate(old, tok, PROMPTS, cfg, max_new_tokens=8)
    assert a.new_tokens == b.new_tokens
    assert old.calls_with_cache == 7                      # every step after the prefill reused the cache


class OldNameBase(torch.nn.Module):
    """A classifier's base model with the pre-5.24 names (see :class:`OldNameLM`)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, **cache_kwargs(self.inner, past_key_values))
        return types.SimpleNamespace(last_hidden_state=out.last_hidden_state,
                                     past_key_values=output_cache(self.inner, out))


class NoCacheBase(torch.nn.Module):
    """A base model fastsafe cannot pass a cache to: the classifier takes the generic path."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **ignored):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_classifier_reward_under_either_name_and_without_a_cache(family):
    tok = tiny_tokenizer()
    model = classifier(family, tok)
    context = 7
    histories, cands = _case(tok, context)
    expected = direct_token_scores(model, histories, cands, context)
    prefix = model.base_model_prefix
    inner = getattr(model, prefix)
    setattr(model, prefix, OldNameBase(inner))
    old = SequenceClassifierReward(model, context_tokens=context, reuse_prefix=True)
    torch.testing.assert_close(old.score_candidates(histories, cands, tok), expected, atol=1e-5, rtol=1e-5)
    # no cache argument at all: the model's own pooling over right-padded rows, same scores (with
    # left padding GPT-2's absolute positions shifted the short rows: the 4-of-20 drift of 5.24)
    setattr(model, prefix, NoCacheBase(inner))
    generic = SequenceClassifierReward(model, context_tokens=context)
    assert not generic.reuse_prefix
    torch.testing.assert_close(generic.score_candidates(histories, cands, tok), expected, atol=1e-5, rtol=1e-5)


def test_shared_vocabulary_bert_classifier_scores_match_direct_forwards():
    tok = tiny_tokenizer()
    model = classifier("bert", tok)
    context = 7
    histories, cands = _case(tok, context)
    reward = SequenceClassifierReward(model, context_tokens=context)
    expected = direct_token_scores(model, histories, cands, context)
    torch.testing.assert_close(reward.score_candidates(histories, cands, tok), expected, atol=1e-5, rtol=1e-5)

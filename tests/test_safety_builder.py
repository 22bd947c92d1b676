"""SafetyConfig is plain frozen settings; the builder owns the built parts and caches them by content."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from fastsafe import SafeLogitsProcessor, SafetyConfig, TSDIBias
from fastsafe.safety_builder import bias_table_on, build_matcher, resolve_reward, tokenizer_fingerprint
from tests.tiny_lm import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_the_config_is_frozen_and_keeps_no_built_state():
    opts = {"word_boundaries": False}
    cfg = SafetyConfig(banned_phrases=["bomb"], reward_model="profanity", reward_weight=1.0, matcher_options=opts)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 3
    opts["word_boundaries"] = True                      # the caller's dict is not the config's
    assert cfg.matcher_options == {"word_boundaries": False}
    pytest.importorskip("profanity_check")
    reward = cfg.resolve_reward()
    assert cfg.reward_model == "profanity"             # resolved by the builder, not written back
    assert resolve_reward(cfg) is reward               # one shared scorer per context length
    assert dataclasses.replace(cfg, top_k=3).top_k == 3


def test_matchers_are_shared_by_content_not_by_object(tok):
    a = SafetyConfig(banned_phrases=["bomb", [5, 6]])
    b = SafetyConfig(banned_phrases=["bomb", [5, 6]])
    c = SafetyConfig(banned_phrases=["knife"])
    V = len(tok)
    assert build_matcher(a, tok, vocab_size=V) is build_matcher(b, tok, vocab_size=V)
    assert build_matcher(a, copy.deepcopy(tok), vocab_size=V) is build_matcher(a, tok, vocab_size=V)
    assert build_matcher(c, tok, vocab_size=V) is not build_matcher(a, tok, vocab_size=V)
    assert build_matcher(a, tok, vocab_size=V + 32) is not build_matcher(a, tok, vocab_size=V)
    assert build_matcher(SafetyConfig(), tok) is None


def test_the_entity_digest_keys_content_once_per_config(tok, monkeypatch):
    a = SafetyConfig(banned_phrases=["bomb", [5, 6]])
    same = SafetyConfig(banned_phrases=["bomb", [5, 6]])
    assert a.entities_digest() == same.entities_digest()
    differ = [SafetyConfig(banned_phrases=["bomb", [5, 7]]), SafetyConfig(banned_phrases=["bomb"]),
              SafetyConfig(banned_phrases=["bomb", "5 6"]), SafetyConfig(banned_phrases=["bom", "b", [5, 6]]),
              SafetyConfig(banned_phrases=["bomb\u0000", [5, 6]])]
    assert len({c.entities_digest() for c in differ} | {a.entities_digest()}) == len(differ) + 1
    V = len(tok)
    first = build_matcher(a, tok, vocab_size=V)
    import json
    calls = []
    real = json.dumps
    monkeypatch.setattr(json, "dumps", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    assert build_matcher(a, tok, vocab_size=V) is first and calls == []     # memoised on the config
    assert same.entities_digest() and calls == []                           # computed above already
    assert SafetyConfig(banned_phrases=["x"]).entities_digest() and calls == [1]


def test_a_matcher_variant_is_made_once_and_keeps_the_rest(tok):
    cfg = SafetyConfig(banned_phrases=["bomb"], top_k=3, matcher_options={"word_boundaries": False})
    dev = cfg.with_matcher("device")
    assert dev.matcher == "device" and cfg.matcher == "host"
    assert dev is cfg.with_matcher("device") and dev.with_matcher("device") is dev and cfg.with_matcher("host") is cfg
    assert (dev.phrases, dev.top_k, dev.matcher_options) == (cfg.phrases, 3, {"word_boundaries": False})
    assert dev.entities_digest() == cfg.entities_digest()
    with pytest.raises(ValueError, match="matcher"):
        cfg.with_matcher("gpu")


def test_a_tokenizer_with_new_tokens_gets_a_new_fingerprint_and_matcher():
    tok = copy.deepcopy(tiny_tokenizer())
    cfg = SafetyConfig(banned_phrases=["bomb"])
    before, first = tokenizer_fingerprint(tok), build_matcher(cfg, tok)
    tok.add_tokens(["<brand-new>"])
    assert tokenizer_fingerprint(tok) != before
    assert build_matcher(cfg, tok) is not first


def test_device_copies_leave_the_users_bias_table_alone(tok):
    table = torch.randn(3, len(tok))
    tsdi = TSDIBias(table)
    on_meta = bias_table_on(tsdi, torch.device("meta"))
    assert on_meta.device.type == "meta" and tsdi.bias_table is table
    assert bias_table_on(tsdi, "meta") is on_meta                   # copied once
    table.add_(1.0)                                                   # a new version of the table
    assert bias_table_on(tsdi, "meta") is not on_meta
    assert bias_table_on(tsdi, "cpu") is table
    assert bias_table_on(None, "cpu") is None
    proc = SafeLogitsProcessor(tok, SafetyConfig(tsdi=tsdi, tsdi_scale=2.0))
    scores = torch.randn(2, len(tok))
    out = proc(torch.tensor([[5, 6], [7, 8]]), scores.clone())
    torch.testing.assert_close(out, scores - 2.0 * table[0])
    assert tsdi.bias_table is table

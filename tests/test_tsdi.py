"""TSDIBias: estimate against a direct per-prefix computation, prompt pools, files, metadata, bad input."""
from __future__ import annotations

import pytest
import torch

from fastsafe import TSDIBias
from fastsafe.tsdi import sample_sequences
from tests.tiny_lm import tiny_gpt2, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@torch.no_grad()
def direct_bias(aligned, reference, seqs, L):
    """One unpadded forward per (prompt, response prefix): the definition, no batching tricks."""
    V = aligned.config.vocab_size
    total = torch.zeros(L, V, dtype=torch.float64)
    for prompt, response in seqs:
        for i in range(1, L + 1):
            x = torch.tensor([prompt + response[:i - 1]])
            total[i - 1] += (aligned(x).logits[0, -1].double() - reference(x).logits[0, -1].double())
    return (total / len(seqs)).float()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_estimate_matches_direct_computation(family, tok):
    make = {"gpt2": tiny_gpt2, "llama": tiny_llama}[family]
    aligned, reference = make(seed=1), make(seed=2)
    L, N = 4, 6
    bias = TSDIBias.estimate(aligned, reference, tok, length=L, num_prompts=N, batch_size=4, seed=3,
                             prompt_length=(2, 9), progress=False)
    seqs = sample_sequences(tok, aligned.config.vocab_size, length=L, num_prompts=N, seed=3, prompt_length=(2, 9))
    assert len({len(p) for p, _ in seqs}) > 1, "prompts of several lengths exercise the left padding"
    expected = direct_bias(aligned, reference, seqs, L)
    assert bias.bias_table.shape == (L, aligned.config.vocab_size) and bias.bias_table.dtype == torch.float32
    torch.testing.assert_close(bias.bias_table, expected, atol=2e-5, rtol=1e-4)
    assert bias.bias_table.abs().max() > 0.01          # two different models: a real difference
    assert bias.metadata["num_prompts"] == str(N) and bias.metadata["length"] == str(L)
    assert bias.metadata["vocab_size"] == str(aligned.config.vocab_size) and bias.metadata["seed"] == "3"


def test_same_model_gives_zero_bias(tok):
    m = tiny_gpt2(seed=1)
    bias = TSDIBias.estimate(m, m, tok, length=3, num_prompts=4, batch_size=3, progress=False)
    assert bias.bias_table.abs().max() == 0


def test_prompt_pools_from_a_file(tok, tmp_path):
    f = tmp_path / "questions.txt"
    f.write_text("How do I bake bread?\n\nWhat is the capital of France?\nTell me about robots.\n")
    V = len(tok)
    lines = sample_sequences(tok, V, length=3, num_prompts=10, seed=0, prompt_pool="lines", prompt_file=f)
    texts = {tok.decode(p) for p, _ in lines}
    assert texts <= {"How do I bake bread?", "What is the capital of France?", "Tell me about robots."}
    assert all(len(r) == 2 for _, r in lines)
    toks = sample_sequences(tok, V, length=3, num_prompts=10, seed=0, prompt_pool="tokens", prompt_file=f)
    file_ids = {t for ln in f.read_text().splitlines() for t in tok.encode(ln)}
    assert all(set(p) <= file_ids and set(r) <= file_ids for p, r in toks)
    rand = sample_sequences(tok, V, length=3, num_prompts=10, seed=0)
    special = set(tok.all_special_ids)
    assert all(not (set(p) | set(r)) & special for p, r in rand)
    assert rand == sample_sequences(tok, V, length=3, num_prompts=10, seed=0)
    assert rand != sample_sequences(tok, V, length=3, num_prompts=10, seed=1)
    m = tiny_gpt2(seed=1)
    bias = TSDIBias.estimate(m, tiny_gpt2(seed=2), tok, length=2, num_prompts=3, prompt_file=f, progress=False)
    assert bias.metadata["prompt_pool"] == "lines" and bias.metadata["prompt_file"].endswith("questions.txt")


def test_save_load_roundtrip_and_metadata(tok, tmp_path):
    table = torch.randn(5, len(tok))
    bias = TSDIBias(table, {"aligned": "a", "reference": "r", "num_prompts": 7, "seed": 1})
    path = tmp_path / "bias.safetensors"
    bias.save(path)
    back = TSDIBias.load(path, vocab_size=len(tok))
    assert torch.equal(back.bias_table, table)
    assert back.metadata["aligned"] == "a" and back.metadata["num_prompts"] == "7"
    assert back.length == 5 and back.vocab_size == len(tok)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert meta["vocab_size"] == str(len(tok)) and meta["length"] == "5"


def test_load_checks(tok, tmp_path):
    path = tmp_path / "bias.safetensors"
    TSDIBias(torch.zeros(2, 50)).save(path)
    with pytest.raises(ValueError, match="vocabulary size mismatch.*V = 50.*V = 300"):
        TSDIBias.load(path, vocab_size=300)
    with pytest.raises(FileNotFoundError, match="no TSDI bias file"):
        TSDIBias.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        TSDIBias.load(bad)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"weights": torch.zeros(2, 3)}, str(other))
    with pytest.raises(ValueError, match="not a fastsafe TSDI bias file"):
        TSDIBias.load(other)


def test_constructor_and_estimate_validation(tok, tmp_path):
    with pytest.raises(TypeError, match="bias_table"):
        TSDIBias([[0.0]])
    with pytest.raises(ValueError, match="NaN"):
        TSDIBias(torch.tensor([[float("nan")]]))
    with pytest.raises(TypeError, match="floating"):
        TSDIBias(torch.zeros(2, 3, dtype=torch.long))
    m = tiny_gpt2(seed=1)
    with pytest.raises(ValueError, match="length"):
        TSDIBias.estimate(m, m, tok, length=0, num_prompts=2, progress=False)
    with pytest.raises(ValueError, match="prompt_pool"):
        TSDIBias.estimate(m, m, tok, length=2, num_prompts=2, prompt_pool="web", progress=False)
    with pytest.raises(ValueError, match="prompt_file"):
        TSDIBias.estimate(m, m, tok, length=2, num_prompts=2, prompt_pool="tokens", progress=False)
    with pytest.raises(FileNotFoundError, match="prompt_file"):
        TSDIBias.estimate(m, m, tok, length=2, num_prompts=2, prompt_file=tmp_path / "nope.txt", progress=False)
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        TSDIBias.estimate(m, tiny_gpt2(seed=1, extra_vocab=3), tok, length=2, num_prompts=2, progress=False)

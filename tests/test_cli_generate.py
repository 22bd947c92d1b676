"""``fastsafe generate`` and ``fastsafe estimate-bias`` on tiny local models (in-process CLI runs)."""
from __future__ import annotations

import json
import re

import pytest
import torch

import fastsafe
from fastsafe.cli import main
from fastsafe.tsdi import TSDIBias
from tests.tiny_lm import tiny_gpt2, tiny_tokenizer


def _saved_tiny_gpt2(tmp_path_factory, name, seed):
    d = tmp_path_factory.mktemp(name)
    tiny_gpt2(seed=seed).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _saved_tiny_gpt2(tmp_path_factory, "tiny_gpt2", 21)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    return _saved_tiny_gpt2(tmp_path_factory, "tiny_gpt2_ref", 22)


def run_json(capsys, *argv):
    rc = main(["generate", *argv, "--json", "--raw"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def test_generate_matches_the_python_api(model_dir, capsys):
    got = run_json(capsys, "--model", model_dir, "--prompt", "the quick", "--prompt", "Hello", "--max-new-tokens", "6")
    model, tok = fastsafe.models.load_model(model_dir)
    res = fastsafe.generate(model, tok, ["the quick", "Hello"], max_new_tokens=6)
    assert got["texts"] == res.texts and got["events"] == []


def test_generate_bans_and_reports(model_dir, capsys):
    plain = run_json(capsys, "--model", model_dir, "--prompt", "Hello", "--max-new-tokens", "6")["texts"][0]
    word = re.search(r"[A-Za-z]{2}", plain).group(0)
    got = run_json(capsys, "--model", model_dir, "--prompt", "Hello", "--max-new-tokens", "6",
                   "--regex", re.escape(word))
    assert word not in got["texts"][0] and got["texts"][0] != plain
    assert got["events"] and all(e["rule"] == "regex" for e in got["events"])
    rc = main(["generate", "--model", model_dir, "--prompt", "Hello", "--max-new-tokens", "6", "--raw",
               "--regex", re.escape(word)])
    out = capsys.readouterr()
    assert rc == 0 and "regex blocked" in out.err


def test_generate_with_entities_db_and_tsdi(model_dir, tmp_path, capsys):
    from fastsafe.safety.store import RiskEntityStore
    db = tmp_path / "risk.db"
    RiskEntityStore(db).add("the", category="test", severity=2)
    got = run_json(capsys, "--model", model_dir, "--prompt", "Hello", "--max-new-tokens", "4", "--entities", str(db))
    assert "the" not in got["texts"][0].split()
    model, tok = fastsafe.models.load_model(model_dir)
    bias = tmp_path / "bias.safetensors"
    table = torch.zeros(2, model.config.vocab_size)
    plain = fastsafe.generate(model, tok, ["Hello"], max_new_tokens=1).new_tokens[0][0]
    table[0, plain] = 1e3
    TSDIBias(table).save(bias)
    got = run_json(capsys, "--model", model_dir, "--prompt", "Hello", "--max-new-tokens", "1", "--tsdi", str(bias))
    assert got["texts"][0] != tok.decode([plain])


def _error(capsys, *argv) -> str:
    rc = main(list(argv))
    out = capsys.readouterr()
    assert rc == 1, out
    return out.err


def test_generate_bad_input_is_a_clear_error(model_dir, tmp_path, capsys):
    assert "no such file or directory" in _error(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert "does not exist" in _error(capsys, "generate", "--model", model_dir, "--prompt", "x",
                                      "--entities", str(tmp_path / "missing.db"))
    bias = tmp_path / "small.safetensors"
    TSDIBias(torch.zeros(1, 7)).save(bias)
    assert "vocabulary size mismatch" in _error(capsys, "generate", "--model", model_dir, "--prompt", "x",
                                                "--tsdi", str(bias), "--max-new-tokens", "1")
    assert "needs --reward-model" in _error(capsys, "generate", "--model", model_dir, "--prompt", "x",
                                            "--reward-weight", "2")
    (tmp_path / "notamodel").mkdir()
    assert "config.json" in _error(capsys, "generate", "--model", str(tmp_path / "notamodel"), "--prompt", "x")


def test_generate_with_profanity_reward(model_dir, capsys):
    pytest.importorskip("profanity_check")
    got = run_json(capsys, "--model", model_dir, "--prompt", "Hello", "--max-new-tokens", "3",
                   "--reward-model", "profanity", "--reward-weight", "2")
    assert len(got["texts"]) == 1


def test_estimate_bias_cli(model_dir, reference_dir, tmp_path, capsys):
    out = tmp_path / "bias.safetensors"
    rc = main(["estimate-bias", "--aligned", model_dir, "--reference", reference_dir, "--length", "3",
               "--prompts", "4", "--batch-size", "2", "--quiet", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "L = 3" in capsys.readouterr().out
    bias = TSDIBias.load(out, vocab_size=len(tiny_tokenizer()))
    assert bias.length == 3 and bias.metadata["aligned"] == model_dir and bias.metadata["num_prompts"] == "4"
    model, tok = fastsafe.models.load_model(model_dir)
    ref, _ = fastsafe.models.load_model(reference_dir)
    direct = TSDIBias.estimate(model, ref, tok, length=3, num_prompts=4, batch_size=2, progress=False)
    torch.testing.assert_close(bias.bias_table, direct.bias_table)


def test_estimate_bias_cli_vocab_mismatch(model_dir, tmp_path, capsys):
    other = tmp_path / "other"
    tiny_gpt2(seed=1, extra_vocab=4).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    err = _error(capsys, "estimate-bias", "--aligned", model_dir, "--reference", str(other), "--length", "2",
                 "--prompts", "2", "--quiet", "-o", str(tmp_path / "b.safetensors"))
    assert "vocabulary size mismatch" in err


def test_generate_compile_flag_reaches_the_api(model_dir, capsys, monkeypatch):
    """--compile asks fastsafe.generate for the compiled loop (the loop itself: tests/test_generation_compiled.py)."""
    seen = {}
    real = fastsafe.generate

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **{**kw, "compile": False})
    monkeypatch.setattr(fastsafe, "generate", spy)
    run_json(capsys, "--model", model_dir, "--prompt", "hello", "--max-new-tokens", "2", "--compile")
    assert seen["compile"] is True
    run_json(capsys, "--model", model_dir, "--prompt", "hello", "--max-new-tokens", "2")
    assert seen["compile"] is False

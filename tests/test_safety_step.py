"""SafetyStep: the one object both decoding paths run their per-step safety work through."""
from __future__ import annotations

import pytest
import torch

from fastsafe import SafetyConfig, TSDIBias
from fastsafe.reward import CallableReward
from fastsafe.safety_step import SafetyStep
from tests.tiny_lm import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_tsdi_rows_past_the_table(tok):
    V = len(tok)
    table = torch.randn(2, V)
    last = SafetyStep(SafetyConfig(tsdi=TSDIBias(table)), tok, vocab_size=V, device="cpu")
    none = SafetyStep(SafetyConfig(tsdi=TSDIBias(table), tsdi_beyond="none"), tok, vocab_size=V, device="cpu")
    torch.testing.assert_close(last.bias_row(5), table[1])
    assert none.bias_row(1) is not None and none.bias_row(2) is None and none.bias_table(2) is None
    with pytest.raises(ValueError, match="tsdi: vocabulary size mismatch.*the logits has V = 301"):
        SafetyStep(SafetyConfig(tsdi=TSDIBias(table)), tok, vocab_size=V + 1, device="cpu")


def test_bans_text_check_veto_fallback_and_events(tok):
    V = len(tok)
    seen = []
    zero = CallableReward(lambda h, c, t: torch.zeros(c.shape))
    cfg = SafetyConfig(banned_phrases=[[5, 6], "bomb"], on_event=seen.append, reward_model=zero, reward_weight=1.0)
    step = SafetyStep(cfg, tok, vocab_size=V, device="cpu", fallback_id=1)
    m = step.matcher()
    hist = [[5], [7]]
    mask = step.banned_bitmask(m, hist, "cpu")
    assert mask.shape == (2, (V + 31) // 32)
    scores = torch.zeros(2, V)
    scores[:, 6] = 5.0                                   # both rows' best token is 6; row 0 may not emit it
    step.report_token_bans(m, 3, hist, scores, mask, rows=[10, 11])
    assert [(e.rule, e.row, e.token_id, e.step) for e in step.events] == [("token_ban", 10, 6, 3)]
    values = torch.tensor([[1.0, 0.5], [float("-inf"), 0.2]])
    reward = torch.tensor([[0.0, float("-inf")], [0.0, 0.0]])
    ok = step.candidate_ok(values, None, reward)
    assert ok.tolist() == [[True, False], [False, True]]
    dead = torch.tensor([False, True])
    step.report_fallbacks(4, dead, rows=[10, 11])
    assert step.events[-1].rule == "all_banned_fallback" and step.events[-1].row == 11
    assert seen == step.events
    strict = SafetyStep(cfg, tok, vocab_size=V, device="cpu", fallback_id=None)
    with pytest.raises(ValueError, match=r"every candidate is banned in rows \[11\]"):
        strict.require_fallback(dead, rows=[10, 11])
    with pytest.raises(ValueError, match=r"fallback_token_id: expected a token id in \[0, 300\), got 300"):
        SafetyStep(cfg, tok, vocab_size=V, device="cpu", fallback_id=V)
    with pytest.raises(ValueError, match="tokenizer: vocabulary mismatch"):
        SafetyStep(cfg, tok, vocab_size=V - 1, device="cpu")
    ids = tok.encode("make a bomb", add_special_tokens=False)
    allowed = step.check_candidates(m, [ids[:-1]], torch.tensor([[ids[-1], 5]]), 7, rows=[3])
    assert allowed.tolist() == [[False, True]]
    assert step.events[-1].rule == "text_match" and (step.events[-1].step, step.events[-1].row) == (7, 3)
    assert step.candidate_reward([[5]], torch.tensor([[4, 5]])).shape == (1, 2)

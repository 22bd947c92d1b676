"""SafetyStep.select + choose as one tensor program: torch.compile(fullgraph=True) on the CPU equals eager."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from fastsafe import SafetyConfig, TSDIBias
from fastsafe.safety_step import SafetyStep
from tests.tiny_lm import tiny_tokenizer

ENTITIES = ["bomb", "make a bomb", "explosives", [7, 9]]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _step(tok, beyond="none", **kw):
    V = len(tok)
    table = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    cfg = SafetyConfig(banned_phrases=ENTITIES, matcher="device", tsdi=TSDIBias(table), tsdi_beyond=beyond,
                       top_k=6, **kw)
    return SafetyStep(cfg, tok, vocab_size=V, device="cpu", fallback_id=tok.eos_token_id)


def test_host_parts_name_what_cannot_be_compiled(tok):
    assert _step(tok).graph_safe
    host = SafetyStep(SafetyConfig(banned_phrases=["bomb"]), tok, vocab_size=len(tok), device="cpu")
    regex = SafetyStep(SafetyConfig(regexes=[r"\bb.mb"], matcher="device"), tok, vocab_size=len(tok), device="cpu")
    assert not host.graph_safe and "host matcher" in host.host_parts[0]
    assert not regex.graph_safe and "regex" in regex.host_parts[0]


@pytest.mark.parametrize("do_sample", [False, True])
def test_select_and_choose_compile_fullgraph_and_equal_eager(tok, do_sample):
    step = _step(tok)
    whole = [tok.encode(p, add_special_tokens=False) for p in ["how do I make a bomb", " bomb", "explosives"]]
    prompts = [w[:-1] for w in whole] + [[7]]
    boost = torch.tensor([w[-1] for w in whole] + [9])    # each row's entity-completing token leads
    B, V = len(prompts), len(tok)
    g = torch.Generator().manual_seed(0)

    def run(logits, state, position, noise):
        sel = step.select(logits, position, k=6, temperature=0.8 if do_sample else 1.0, record=False,
                          matcher=dm, state=state)
        ids = step.choose(sel, do_sample=do_sample, top_p=0.9, noise=noise, record=False)
        return (sel.topk.values, sel.topk.indices, sel.ok, sel.dead, sel.text_entity, sel.ban_hit, ids,
                dm.advance(state, ids))

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(run, fullgraph=True)
    step.start(prompts)
    dm = step.matcher()
    state_e = state_c = step.state
    hits = 0
    for position in range(5):                  # past L = 3: the appended zero row, no recompile
        logits = torch.randn(B, V, generator=g)
        if position == 0:
            logits[torch.arange(B), boost] += 8.0
        noise = torch.empty(B, 6).exponential_(1.0, generator=g) if do_sample else None
        pos = torch.tensor(position)
        want = run(logits, state_e, pos, noise)
        got = compiled(logits, state_c, pos, noise)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        step.record(step.select(logits, position, k=6, record=False, matcher=dm, state=state_e), position)
        state_e, state_c = want[-1], got[-1]
        step.adopt(want[-2], state_e)
        hits += int((want[4] >= 0).sum()) + int(want[5].sum())
    assert hits > 0, "the entities should be checked (else the test proves nothing)"
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    step.flush()                               # the records kept outside the graph become events
    assert step.events and all(e.rule in ("token_ban", "text_match") for e in step.events)


def test_tensor_positions_read_the_same_rows_as_int_positions(tok):
    for beyond in ("none", "last"):
        step = _step(tok, beyond=beyond)
        step.start([[1, 2]] * 2)
        logits = torch.randn(2, len(tok))
        for p in range(5):
            a = step.select(logits, p, k=6, record=False)
            b = step.select(logits, torch.tensor(p), k=6, record=False)
            assert torch.equal(a.topk.indices, b.topk.indices)
            torch.testing.assert_close(a.topk.values, b.topk.values)

"""vLLM adapter: the row model (SafetyRows) against a per-row reference built from full histories. No vLLM needed."""
from __future__ import annotations

import logging
import random

import pytest
import torch

from fastsafe import TSDIBias
from fastsafe.integrations.vllm import Policy, RequestArgs
from fastsafe.integrations.vllm.engine import SafetyRows
from fastsafe.integrations.vllm.interim import row_mask
from fastsafe.ops import unpack_bitmask
from fastsafe.safety import DeviceMatcher
from tests.test_matcher import tiny_tokenizer

NEG = float("-inf")
LOG = logging.getLogger("test.vllm.rows")


def make_rows(tmp_path, *, capacity=8, top_k=5):
    tok = tiny_tokenizer()
    V = len(tok)
    g = torch.Generator().manual_seed(0)
    TSDIBias(torch.randn(4, V, generator=g)).save(tmp_path / "bias.safetensors")
    policies = {
        "default": Policy("default", phrases=("make a bomb", "kill"), top_k=top_k),
        "strict": Policy("strict", phrases=("lazy dog", "bomb"), tsdi=str(tmp_path / "bias.safetensors"),
                         tsdi_scale=0.5, top_k=top_k),
        "debias": Policy("debias", tsdi=str(tmp_path / "bias.safetensors"), tsdi_scale=2.0),
    }
    # the tiny tokenizer's EOS is id 0; the fallback is given id 1 so a row that got token 0 would show
    rows = SafetyRows(policies, tok, vocab_size=V, device="cpu", capacity=capacity, eos_token_id=1,
                      logger=LOG, log_interval=1e9)
    return rows, tok, policies


def reference(rows, logits, slot_hist, row_slots):
    """Per row, from scratch: TSDI, bans and text check of states derived from the full history, EOS fallback."""
    out = logits.clone()
    V = rows.vocab_size
    for r, s in enumerate(row_slots):
        if s < 0 or rows.slot_args[s] is None or not rows.filtered(s):
            continue
        hist, n_out = slot_hist[s]
        pol = rows.slot_policy[s]
        b = rows.built.get(pol) if pol else None
        x = out[r].clone()
        if b is not None and b.table is not None:
            x -= float(rows.slot_scale[s]) * b.table[min(n_out, b.table.shape[0] - 1)]
        ms = rows.matchers_of(s)
        states = [None if m is rows.interim else m.state_from_histories([hist]) for m in ms]
        for m, st in zip(ms, states):
            if m is rows.interim:           # request phrases still building: the mask of the row's admission history
                words = torch.from_numpy(row_mask(rows.request_matchers.tries, rows._interim_rule[s],
                                                  hist[:len(hist) - n_out][-rows.window:]))
            else:
                words = m.banned_bitmask(st)[0]
            x[~unpack_bitmask(words, V)] = NEG
        if any(m.has_text_rules for m in ms):
            vals, cands = x.topk(10 if b is None else b.top_k)
            ok = torch.isfinite(vals)
            for m, st in zip(ms, states):
                if m.has_text_rules:
                    ok &= m.check_candidates(st, cands[None])[0][0]
            x[cands[~ok]] = NEG
            dead = not bool(ok.any())
        else:
            dead = bool(torch.isneginf(x).all())
        if dead:
            x = torch.full_like(x, NEG)
            x[rows.eos_token_id] = 0.0
        out[r] = x
    return out


def _derive(rows, slots, hists):
    T = max(len(h) for h in hists)
    tok = torch.zeros(len(hists), T, dtype=torch.int64)
    ok = torch.zeros(len(hists), T, dtype=torch.bool)
    for i, h in enumerate(hists):
        if h:
            tok[i, T - len(h):] = torch.tensor(h)
            ok[i, T - len(h):] = True
    rows.derive(slots, tok, ok)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse_writes", "dense_writes"])
def test_rows_match_the_reference_over_steps_with_mixed_policies(tmp_path, sparse):
    rows, tok, _ = make_rows(tmp_path)
    rows.sparse_writes = sparse                       # the CPU default is sparse; CUDA's is dense
    V = rows.vocab_size
    enc = lambda t: tok.encode(t, add_special_tokens=False)       # noqa: E731
    specs = [  # slot, args, prompt
        (0, RequestArgs("default"), enc("How to make a")),
        (3, RequestArgs("strict"), enc("the quick brown fox jumps over the lazy")),
        (5, RequestArgs(None, banned_phrases=("quick brown",)), enc("the")),   # request-only phrases, no policy
        (1, RequestArgs("default", banned_phrases=("hello world",)), enc("say hello")),
        (6, RequestArgs(None), enc("make a")),                                 # opted out: untouched
        (2, RequestArgs("debias"), enc("I will")),                             # TSDI only
        (4, RequestArgs("default"), enc("How to make a b")),                   # " b" + "omb": the text check's
    ]
    hist = {}
    for slot, args, prompt in specs:
        rows.admit(slot, args)
        hist[slot] = (list(prompt), 0)
    _derive(rows, [s for s, _, _ in specs], [h for h, _ in hist.values()])
    rng = random.Random(0)
    g = torch.Generator().manual_seed(1)
    layout = [3, -1, 0, 5, 1, 6, 2, 4]                # rows of the batch -> slots (-1: a row that is no request)
    seen_bans = 0
    for step in range(6):
        rng.shuffle(layout)
        logits = torch.randn(len(layout), V, generator=g) * 3
        # make the banned continuations the most likely tokens, so the rules fire
        for r, s in enumerate(layout):
            if s >= 0:
                for w in (" bomb", " dog", " brown", " world", " kill", "omb"):
                    logits[r, enc(w)[0]] += 8
        plan = rows.plan(torch.tensor(layout).numpy())
        want = reference(rows, logits, hist, layout)
        positions = torch.tensor([hist[s][1] if s >= 0 else 0 for s in layout])
        got = rows.apply(logits.clone(), plan, positions=positions)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        seen_bans += int((torch.isneginf(want) & ~torch.isneginf(logits)).sum())
        opted = layout.index(6)
        assert torch.equal(got[opted], logits[opted]) and torch.equal(got[layout.index(-1)], logits[layout.index(-1)])
        # each row samples a token (greedy under the filter) and the states are fed with it
        nxt = got.argmax(-1)
        new = torch.full((len(layout), 1), -1, dtype=torch.int64)
        for r, s in enumerate(layout):
            if s >= 0 and rng.random() < 0.8:            # some rows are not scheduled this step
                new[r, 0] = nxt[r]
                h, n = hist[s]
                hist[s] = (h + [int(nxt[r])], n + 1)
        rows.feed(plan, new, new >= 0)
    assert seen_bans > 0
    rows.audit.drain(wait=True)
    counts = rows.audit.counts
    assert counts["default"]["token_ban"] + counts["strict"]["token_ban"] > 0
    assert counts["default"]["text_match"] > 0
    assert rows.audit.steps == 6 and rows.audit.requests == len(specs)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse_writes", "dense_writes"])
def test_an_all_banned_row_gets_eos_and_is_counted(tmp_path, sparse):
    rows, tok, _ = make_rows(tmp_path)
    rows.sparse_writes = sparse
    V = rows.vocab_size
    rows.admit(0, RequestArgs("default"))
    rows.admit(1, RequestArgs("default"))
    _derive(rows, [0, 1], [tok.encode("make a", add_special_tokens=False)] * 2)
    bomb = tok.encode(" bomb", add_special_tokens=False)[0]
    logits = torch.full((2, V), NEG)
    logits[0, bomb] = 1.0                     # the only finite token completes "make a bomb"
    logits[1, bomb] = 1.0
    logits[1, 7] = 0.5                        # row 1 keeps another token
    got = rows.apply(logits, rows.plan(torch.tensor([0, 1]).numpy()), positions=torch.zeros(2, dtype=torch.int64))
    eos = rows.eos_token_id
    assert eos == 1 and int(got[0].argmax()) == eos and torch.isfinite(got[0]).sum() == 1
    assert int(got[1].argmax()) == 7 and torch.isneginf(got[1, bomb])
    rows.audit.drain(wait=True)
    assert rows.audit.counts["default"]["all_banned_fallback"] == 1
    assert rows.audit.counts["default"]["token_ban"] == 2


def test_request_phrase_matchers_are_shared_by_content(tmp_path, blocked_build):
    rows, _, _ = make_rows(tmp_path)
    rows.admit(0, RequestArgs(None, banned_phrases=("quick brown", "lazy dog")))
    rows.admit(1, RequestArgs("default", banned_phrases=("quick brown", "lazy dog")))
    assert rows.slot_request_matcher[0] is rows.slot_request_matcher[1]          # one interim matcher
    assert rows.request_matchers.interim_builds == 1 and not rows.slot_request_matcher[0].has_text_rules
    blocked_build.set()                       # held until both rows were admitted (else a race)
    rows.request_matchers.wait()
    slots, new = rows.poll_swaps()
    assert slots == [0, 1] and len(new) == 1 and rows.request_matchers.builds == 1
    assert rows.slot_request_matcher[0] is rows.slot_request_matcher[1] is new[0]
    assert isinstance(new[0], DeviceMatcher) and new[0].has_text_rules
    rows.admit(2, RequestArgs(None))
    assert not rows.filtered(2)


def test_tsdi_scale_per_request_and_vocab_check(tmp_path):
    rows, tok, pol = make_rows(tmp_path)
    V = rows.vocab_size
    rows.admit(0, RequestArgs("debias"))
    rows.admit(1, RequestArgs("debias", tsdi_scale=-1.0))
    _derive(rows, [0, 1], [[5], [5]])
    logits = torch.zeros(2, V)
    table = rows.built["debias"].table
    got = rows.apply(logits.clone(), rows.plan(torch.tensor([0, 1]).numpy()), positions=torch.tensor([1, 9]))
    torch.testing.assert_close(got[0], -2.0 * table[1])
    torch.testing.assert_close(got[1], 1.0 * table[3])            # past L: the last row
    with pytest.raises(ValueError, match=r"logits: expected \[num_rows, %d\]" % V):
        rows.apply(torch.zeros(2, V + 1), rows.plan(torch.tensor([0, 1]).numpy()), positions=torch.zeros(2))


def test_no_eos_is_refused(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="eos_token_id: expected a token id"):
        SafetyRows({}, tok, vocab_size=len(tok), device="cpu", capacity=2, eos_token_id=None, logger=LOG)


def test_a_cached_plan_is_rebuilt_when_its_slots_change_hands(tmp_path):
    """Plans are cached by layout (the slot of each row); a slot whose request changes keeps the layout's
    key, so admit / release must drop the cached plans (and with them the host rows / slots kept on a plan)."""
    rows, tok, _ = make_rows(tmp_path)
    V = rows.vocab_size
    bomb = tok.encode(" bomb", add_special_tokens=False)[0]
    rows.admit(0, RequestArgs("default"))            # bans " bomb" only after "make a"
    _derive(rows, [0], [[5]])
    layout = torch.tensor([0]).numpy()
    plan = rows.plan(layout)
    assert rows.plan(layout) is plan and plan.host_rows == [0] and plan.host_slots == [0]
    got = rows.apply(torch.zeros(1, V), plan, positions=torch.zeros(1, dtype=torch.int64))
    assert torch.isfinite(got[0, bomb])
    rows.release(0)
    rows.admit(0, RequestArgs("strict"))             # bans " bomb" everywhere: same slot, same layout key
    _derive(rows, [0], [[5]])
    plan = rows.plan(layout)
    got = rows.apply(torch.zeros(1, V), plan, positions=torch.zeros(1, dtype=torch.int64))
    assert torch.isneginf(got[0, bomb])
    rows.admit(1, RequestArgs("default"))
    _derive(rows, [1], [[5]])
    swapped = rows.plan(torch.tensor([1, -1, 0]).numpy())
    assert swapped.host_rows == [0, 2] and swapped.host_slots == [1, 0]
    got = rows.apply(torch.zeros(3, V), swapped, positions=torch.zeros(3, dtype=torch.int64))
    assert torch.isfinite(got[0, bomb]) and torch.isneginf(got[2, bomb]) and torch.equal(got[1], torch.zeros(V))

"""vLLM adapter: request-only phrase matchers are built off the step thread; the interim rule protects
the row meanwhile; the full matcher takes over with the row's state re-derived from its tokens.

The rows-level tests need no vLLM; the V1 test drives SafetyLogitsProcessor with vLLM's BatchUpdate
(.venv-vllm; skipped elsewhere).
"""
from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

from fastsafe.integrations.vllm import RequestArgs
from fastsafe.integrations.vllm.built import RequestMatchers
from fastsafe.integrations.vllm.interim import row_mask, start_rule
from fastsafe.ops import unpack_bitmask
from fastsafe.safety import DeviceMatcher
from fastsafe.safety.char_automaton import fold_text
from tests.test_matcher import tiny_tokenizer
from tests.test_vllm_adapter_rows import _derive, make_rows

PHRASES = ("quick brown", "lazy dog")


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _first_tokens(tok, phrases):
    from fastsafe.safety.entity_list import config_entities
    from fastsafe.safety.token_sequences import banned_sequences
    flat, lens, _ = banned_sequences(tok, config_entities(list(phrases)), len(tok), set())
    starts = (torch.tensor(lens).cumsum(0) - torch.tensor(lens)).tolist()
    return {int(flat[s]) for s in starts}, flat, lens


def _banned(words, V):
    return set((~unpack_bitmask(torch.as_tensor(words), V)).nonzero().flatten().tolist())


def test_interim_rule_bans_every_first_token_and_what_the_full_matcher_bans_at_token_level():
    tok = tiny_tokenizer()
    V = len(tok)
    tries = RequestMatchers(tok, vocab_size=V, device="cpu", eos_token_id=0).tries
    rule = start_rule(tries, PHRASES)
    full = DeviceMatcher.build(tok, list(PHRASES), vocab_size=V, eos_token_id=0)
    firsts, _, _ = _first_tokens(tok, PHRASES)
    banned0 = _banned(rule.allowed, V)
    # a canonical variant that starts with a lone space token: the phrase's text starts in the next one
    space = {t for t in firsts if not tok.decode([t]).strip()}
    assert len(firsts - space) >= 4 and firsts - space - {0} <= banned0 and 0 not in banned0
    assert rule.banned == len(banned0) and not space & banned0
    # any tokenisation's first token: the phrase spelled letter by letter, in capitals, after punctuation
    for text in ["q", "Q", "(quick", "LAZY", "l", ", lazy"]:
        holder = next(t for t in enc(tok, text) if any(c.isalpha() for c in tok.decode([t])))
        assert holder in banned0, text
    assert not {enc(tok, w)[0] for w in (" the", " fox", " over")} & banned0     # unrelated words stay allowed
    # at least as strict as the full matcher's token level on histories (prompt-started phrases too)
    for text in ["the quick", "a lazy", "quick", "the", "lazy dog and the quick", "THE QUICK", "the lazy"]:
        h = enc(tok, text)
        bi = _banned(row_mask(tries, rule, h), V)
        bf = _banned(full.banned_bitmask(full.state_from_histories([h])), V)
        assert bf - {0} <= bi, text                       # (the interim rule never bans EOS, id 0 here)
    assert enc(tok, " brown")[0] in _banned(row_mask(tries, rule, enc(tok, "the quick")), V)
    assert enc(tok, " brown")[0] not in _banned(row_mask(tries, rule, enc(tok, "the slow")), V)


def test_interim_rule_of_a_phrase_without_letters_bans_every_token_holding_its_first_byte():
    tok = tiny_tokenizer()
    V = len(tok)
    tries = RequestMatchers(tok, vocab_size=V, device="cpu", eos_token_id=0).tries
    banned = _banned(start_rule(tries, ["?!"]).allowed, V)
    holding = {t for t in range(V) if b"?" in tries.token_text[t]}
    assert holding and banned == holding


def test_admission_does_no_tokenisation_and_builds_no_matcher_on_the_step_thread(tmp_path, blocked_build,
                                                                                   monkeypatch):
    """Work counted, not timed: admitting a request with new phrases calls the tokenizer 0 times and
    constructs no DeviceMatcher on the calling thread; the interim rule is one start rule per set and
    one row mask per row."""
    import threading
    rows, tok, _ = make_rows(tmp_path)
    prompt = enc(tok, "the quick")
    calls = []
    main = threading.current_thread()
    for name in ("__call__", "encode", "tokenize", "_encode_plus", "_batch_encode_plus", "batch_decode", "decode"):
        real = getattr(type(tok), name, None)
        if real is None:
            continue

        def spy(self, *a, _real=real, _name=name, **k):
            if threading.current_thread() is main:
                calls.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(type(tok), name, spy)
    real_init = DeviceMatcher.__init__

    def init(self, *a, **k):
        if threading.current_thread() is main:
            calls.append("DeviceMatcher")
        real_init(self, *a, **k)
    monkeypatch.setattr(DeviceMatcher, "__init__", init)
    phrases = tuple(f"phrase number {i} of the request" for i in range(1000)) + PHRASES
    for slot in range(3):
        assert rows.admit(slot, RequestArgs(None, banned_phrases=phrases))
    _derive(rows, [0, 1, 2], [prompt] * 3)
    V = rows.vocab_size
    logits = torch.zeros(3, V)
    got = rows.apply(logits, rows.plan(torch.tensor([0, 1, 2]).numpy()), positions=torch.zeros(3, dtype=torch.int64))
    assert calls == []
    rm = rows.request_matchers
    assert rm.interim_builds == 1 and rows.interim_row_masks == 3 and rm.builds == 0
    assert torch.isneginf(got[:, enc(tok, " brown")[0]]).all()         # fail closed from the first step
    assert torch.isneginf(got[:, enc(tok, " lazy")[0]]).all()


def test_slow_build_never_delays_the_rows_and_the_full_matcher_takes_over(tmp_path, blocked_build):
    rows, tok, _ = make_rows(tmp_path)
    V = rows.vocab_size
    rm = rows.request_matchers
    prompt = enc(tok, "the quick")                       # a phrase already started in the prompt
    assert rows.admit(0, RequestArgs(None, banned_phrases=PHRASES))
    _derive(rows, [0], [prompt])
    im = rows.slot_request_matcher[0]
    assert not im.has_text_rules and rm.builds == 0 and len(rm._pending) == 1
    brown = enc(tok, " brown")[0]
    firsts, _, _ = _first_tokens(tok, PHRASES)
    out = []
    for step in range(6):                                # greedy: the phrase tokens are the best ones
        assert rows.poll_swaps() == ([], [])             # nothing ready: nothing waits, nothing swaps
        logits = torch.randn(1, V, generator=torch.Generator().manual_seed(step))
        logits[0, brown] += 20
        for t in firsts:
            logits[0, t] += 10
        got = rows.apply(logits, rows.plan(torch.tensor([0]).numpy()), positions=torch.zeros(1, dtype=torch.int64))
        t = int(got[0].argmax())
        assert t not in firsts and (step or t != brown)  # no phrase start; "the quick" not completed
        out.append(t)
        tk = torch.tensor([[t]])
        rows.feed(rows.plan(torch.tensor([0]).numpy()), tk, tk >= 0)
    text = fold_text(tok.decode(prompt + out))
    assert "quick brown" not in text and "lazy dog" not in text
    assert rm.builds == 0 and len(rm._pending) == 1      # the build was still blocked the whole time
    blocked_build.set()
    rm.wait()
    slots, new = rows.poll_swaps()
    full = rows.slot_request_matcher[0]
    assert slots == [0] and new == [full] and full.has_text_rules and rm.builds == 1
    _derive(rows, slots, [prompt + out])                 # what the processors do with poll_swaps' answer
    ref = full.state_from_histories([prompt + out])
    assert torch.equal(rows._state(full)[0:1, :ref.shape[1]], ref)
    assert id(im) not in rows._states                    # the interim state was dropped
    # text check in force: " brown" after "quick" in any spelling is now checked on the candidates
    ok, ent = full.check_candidates(full.state_from_histories([enc(tok, "the quick")]), torch.tensor([[brown]]))
    assert not bool(ok[0, 0]) and int(ent[0, 0]) >= 0


def test_failed_build_keeps_the_interim_rule(tmp_path, monkeypatch):
    rows, tok, _ = make_rows(tmp_path)

    def boom(self, key):
        raise RuntimeError("no memory")
    monkeypatch.setattr(RequestMatchers, "_build", boom)
    rows.admit(0, RequestArgs(None, banned_phrases=PHRASES))
    rows.request_matchers.wait()
    assert rows.poll_swaps() == ([], []) and not rows.slot_request_matcher[0].has_text_rules
    assert rows.filtered(0)


def test_step_mode_builds_at_admission(tmp_path):
    tok = tiny_tokenizer()
    rm = RequestMatchers(tok, vocab_size=len(tok), device="cpu", eos_token_id=0, background=False)
    m, final = rm.lookup(PHRASES)
    assert final and m.has_text_rules and rm.builds == 1 and rm.lookup(PHRASES) == (m, True)


def test_v1_processor_never_waits_for_a_request_build(tmp_path, monkeypatch, blocked_build):
    pytest.importorskip("vllm")
    from vllm.v1.sample.logits_processor import BatchUpdate

    from tests.test_vllm_adapter_v1 import check_step, params, write_policies
    from fastsafe.integrations.vllm import worker
    from fastsafe.integrations.vllm import SafetyLogitsProcessor
    from types import SimpleNamespace
    tok = tiny_tokenizer()
    V = len(tok)
    write_policies(tmp_path, V)
    monkeypatch.setenv("FASTSAFE_VLLM_POLICIES", str(tmp_path / "p.toml"))
    monkeypatch.setattr(worker, "load_tokenizer", lambda cfg: tok)
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=4), speculative_config=None,
                          model_config=SimpleNamespace(get_vocab_size=lambda: V))
    proc = SafetyLogitsProcessor(cfg, torch.device("cpu"), False)
    script = enc(tok, " quick brown fox the lazy dog")
    added = [(0, params(policy="none", banned_phrases=list(PHRASES)), enc(tok, "the quick"), []),
             (1, params(policy="none", banned_phrases=list(PHRASES)), enc(tok, "over the"), [])]
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=added, moved=[]))
    batch = [{"prompt": p, "out": o, "slot": int(proc._row_slot[r]), "script": script} for r, _, p, o in added]
    g = torch.Generator().manual_seed(0)
    rm = proc.rows.request_matchers

    def greedy_steps(n):
        for _ in range(n):
            logits = torch.randn(2, V, generator=g)
            for q, row in zip(batch, logits):
                row[script[len(q["out"]) % len(script)]] += 15     # the script's next token is the best one
            got = check_step(proc, logits, batch, g)                # apply() equals the per-row reference
            for r, q in enumerate(batch):
                q["out"][-1] = int(got[r].argmax())                 # greedy (check_step's draw replaced)
            proc.update_state(None)
    greedy_steps(8)
    assert rm.builds == 0 and len(rm._pending) == 1                 # every step ran while the build waited
    for q in batch:
        text = fold_text(tok.decode(q["prompt"] + q["out"]))
        assert "quick brown" not in text and "lazy dog" not in text, text
    blocked_build.set()
    rm.wait()
    proc.update_state(None)                                         # the full matcher takes over here
    full = proc.rows.slot_request_matcher[batch[0]["slot"]]
    assert full is proc.rows.slot_request_matcher[batch[1]["slot"]] and full.has_text_rules
    greedy_steps(4)                                                 # and equals the reference from full histories


def test_from_token_sequences_equals_build_of_token_id_phrases():
    import numpy as np
    from fastsafe.safety.entity_list import config_entities
    rng = np.random.default_rng(0)
    V = 50
    seqs = [rng.integers(0, V, rng.integers(1, 4)).tolist() for _ in range(30)]
    ref = DeviceMatcher.build(None, token_id_phrases=seqs, vocab_size=V)
    flat = np.asarray([t for s in seqs for t in s])
    lens = np.asarray([len(s) for s in seqs])
    dm = DeviceMatcher.from_token_sequences(config_entities([], seqs), flat, lens, np.arange(len(seqs)), vocab_size=V)
    hist = [rng.integers(0, V, 12).tolist() for _ in range(8)] + [seqs[0][:-1], seqs[1][:-1]]
    for h in [x[:j] for x in hist for j in range(len(x) + 1)]:
        a, b = ref.state_from_histories([h]), dm.state_from_histories([h])
        assert torch.equal(ref.banned_bitmask(a), dm.banned_bitmask(b)), h
    with pytest.raises(ValueError, match=r"flat: expected token ids in \[0, 50\)"):
        DeviceMatcher.from_token_sequences([], np.asarray([50]), np.asarray([1]), np.asarray([0]), vocab_size=V)


def test_worker_side_request_args_do_not_normalise_the_phrases_again(monkeypatch):
    """Work counted: the worker (step thread) trusts the admission check of each phrase."""
    from fastsafe.integrations.vllm import Policy, request_args
    from fastsafe.safety import normalize
    calls = []
    real = normalize.entity_forms
    monkeypatch.setattr(normalize, "entity_forms", lambda p: (calls.append(p), real(p))[1])
    pol = {"default": Policy("default", phrases=("make a bomb",))}
    extra = {"fastsafe": {"banned_phrases": ["lazy dog", "quick brown", "lazy dog"]}}
    assert request_args(extra, pol).banned_phrases == ("lazy dog", "quick brown") and len(calls) == 3
    calls.clear()
    assert request_args(extra, pol, checked=True).banned_phrases == ("lazy dog", "quick brown") and calls == []
    with pytest.raises(ValueError, match="banned_phrases: at most"):
        request_args({"fastsafe": {"banned_phrases": ["x"] * 10_001}}, pol, checked=True)


@pytest.mark.skipif(not hasattr(os, "setpriority") or sys.platform != "linux", reason="per-thread nice is Linux")
def test_background_build_threads_run_at_a_lower_priority():
    """A build holds the GIL for most of its time; at a lower priority the scheduler runs the step thread first."""
    from fastsafe.integrations.vllm import built
    seen = {}

    def job():
        tid = threading.get_native_id()
        seen["before"] = os.getpriority(os.PRIO_PROCESS, tid)
        built._lower_priority()
        built._lower_priority()                    # once per thread
        seen["after"] = os.getpriority(os.PRIO_PROCESS, tid)

    t = threading.Thread(target=job)
    t.start()
    t.join()
    assert seen["after"] == min(19, seen["before"] + built.BUILD_NICE)
    assert seen["after"] > seen["before"] or seen["before"] == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == seen["before"]   # the caller's thread untouched

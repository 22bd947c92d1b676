"""vLLM adapter, V1 runner interface: SafetyLogitsProcessor driven with vLLM's own BatchUpdate objects.

Runs where vLLM is installed (.venv-vllm); skipped elsewhere. The real engine is tested by H2's tests.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality  # noqa: E402

from fastsafe.integrations.vllm import worker  # noqa: E402
from tests.test_matcher import tiny_tokenizer  # noqa: E402
from tests.test_vllm_adapter_rows import reference  # noqa: E402

POLICIES = """
[policy.default]
phrases = ["make a bomb", "kill"]
top_k = 5
allow_opt_out = true

[policy.strict]
phrases = ["lazy dog", "bomb"]
top_k = 5

[policy.debias]
tsdi = "bias.safetensors"
tsdi_scale = 2.0
"""


def write_policies(folder, V):
    from fastsafe import TSDIBias
    TSDIBias(torch.randn(6, V, generator=torch.Generator().manual_seed(0))).save(folder / "bias.safetensors")
    (folder / "p.toml").write_text(POLICIES)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    write_policies(tmp_path, len(tok))
    monkeypatch.setenv("FASTSAFE_VLLM_POLICIES", str(tmp_path / "p.toml"))
    monkeypatch.setattr(worker, "load_tokenizer", lambda cfg: tok)
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=8), speculative_config=None,
                          model_config=SimpleNamespace(get_vocab_size=lambda: len(tok)))
    from fastsafe.integrations.vllm import SafetyLogitsProcessor
    return SafetyLogitsProcessor(cfg, torch.device("cpu"), False), tok, cfg


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def params(**fs):
    return SamplingParams(extra_args={"fastsafe": fs} if fs else None)


def check_step(proc, logits, row_reqs, g):
    """apply() equals the per-row reference; then every row 'samples' and vLLM appends to its output list.

    ``row_reqs[r]`` is the test's own record of the request in batch row ``r`` (its prompt, output list and
    the slot it was admitted to), kept apart from the processor's bookkeeping so a lost move shows.
    """
    rows = proc.rows
    slots = [-1 if q is None else q["slot"] for q in row_reqs]
    hist = {}
    for q in row_reqs:
        if q is not None:
            known = [t for t in q["out"] if t != -1]
            hist[q["slot"]] = (q["prompt"] + known, len(known))
    want = reference(rows, logits, hist, slots)
    got = proc.apply(logits.clone())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for r, q in enumerate(row_reqs):
        if q is not None:           # the row "samples": mostly the script (walks into the entities), else a draw
            script = q["script"]
            if torch.rand(1, generator=g).item() < 0.7:
                q["out"].append(script[(len(q["out"]) + q["slot"] * 3) % len(script)])
            else:
                q["out"].append(int(torch.multinomial(torch.softmax(got[r], -1), 1, generator=g)))
    return got


def admit(proc, added):
    """Apply an ``added`` list and return the test's records of those requests (slot taken once, at admission)."""
    proc.update_state(BatchUpdate(batch_size=max(a[0] for a in added) + 1, removed=[], added=added, moved=[]))
    script = enc(proc.rows.tokenizer, SCRIPT)
    return [{"prompt": prompt, "out": out, "slot": int(proc._row_slot[row]), "script": script}
            for row, _, prompt, out in added]


#: What the rows "generate": text that keeps walking into the policies' entities.
SCRIPT = " make a bomb and kill the process the lazy dog bomb the quick brown fox hello world"


def boosted(tok, B, V, g):
    """Random logits where the tokens that complete entities are the likely ones (so the rules fire)."""
    logits = torch.randn(B, V, generator=g) * 2
    for w in (" bomb", " dog", " kill", "omb", " brown", " world"):
        logits[:, enc(tok, w)] += 6
    return logits


def test_processor_is_a_vllm_v1_logits_processor_loaded_by_fqcn(setup):
    from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns
    proc, _, _ = setup
    (cls,) = _load_logitsprocs_by_fqcns(["fastsafe.integrations.vllm:SafetyLogitsProcessor"])
    assert issubclass(cls, LogitsProcessor) and isinstance(proc, cls) and proc.is_argmax_invariant() is False


def test_rows_added_moved_swapped_removed_readded(setup):
    proc, tok, _ = setup
    V = len(tok)
    g = torch.Generator().manual_seed(0)
    added = [(0, params(), enc(tok, "How to make a"), []), (1, params(policy="strict"), enc(tok, "over the lazy"), []),
             (2, params(policy="none"), enc(tok, "make a"), []),
             (3, params(banned_phrases=["quick brown"]), enc(tok, "the quick"), []),
             (4, params(policy="strict"), enc(tok, "the lazy"), [])]
    batch = admit(proc, added)
    for _ in range(3):
        check_step(proc, boosted(tok, 5, V, g), batch, g)
        proc.update_state(None)
    # swap 0 <-> 3
    proc.update_state(BatchUpdate(batch_size=5, removed=[], added=[], moved=[(0, 3, MoveDirectionality.SWAP)]))
    batch[0], batch[3] = batch[3], batch[0]
    check_step(proc, boosted(tok, 5, V, g), batch, g)
    # remove row 1 and condense 4 -> 1 (vLLM's order: removed, added, moved)
    preempted = batch[1]
    proc.update_state(BatchUpdate(batch_size=4, removed=[1], added=[],
                                  moved=[(4, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    batch = [batch[0], batch[4], batch[2], batch[3]]
    for _ in range(2):
        check_step(proc, boosted(tok, 4, V, g), batch, g)
        proc.update_state(None)
    # the preempted request comes back (recompute): vLLM re-adds it with its prompt and output so far
    (again,) = admit(proc, [(4, params(policy="strict"), preempted["prompt"], preempted["out"])])
    batch.append(again)
    for _ in range(3):
        check_step(proc, boosted(tok, 5, V, g), batch, g)
        proc.update_state(None)
    proc.rows.audit.drain(wait=True)
    c = proc.rows.audit.counts
    assert c["default"]["token_ban"] + c["strict"]["token_ban"] > 0


def test_async_placeholders_and_discarded_tokens(setup):
    proc, tok, _ = setup
    V = len(tok)
    g = torch.Generator().manual_seed(3)
    out_a, out_b, out_c = [], enc(tok, " the"), []     # b was preempted with one output token already
    batch = admit(proc, [(0, params(), enc(tok, "How to make"), out_a),
                         (1, params(policy="strict"), enc(tok, "the lazy"), out_b),
                         (2, params(policy="debias"), enc(tok, "I will"), out_c)])     # TSDI: positions count
    outs = (out_a, out_b, out_c)
    check_step(proc, boosted(tok, 3, V, g), batch, g)
    for _ in range(4):
        # async scheduling: the runner appends a -1 placeholder at update_state time ...
        real = [o[-1] for o in outs]
        for o in outs:
            o[-1] = -1
        proc.update_state(None)
        # ... and writes the sampled ids in right before the logits processors run
        for o, t in zip(outs, real):
            o[-1] = t
        check_step(proc, boosted(tok, 3, V, g), batch, g)
    # a placeholder still unresolved at apply: not fed (nor counted as a position), fed once resolved
    real = [o[-1] for o in outs]
    for o in outs:
        o[-1] = -1
    check_step(proc, boosted(tok, 3, V, g), batch, g)
    for o, t in zip(outs, real):
        o.pop()                                     # check_step sampled after the placeholder: drop that,
        o[-1] = t                                   # and resolve the placeholder
    check_step(proc, boosted(tok, 3, V, g), batch, g)
    # a KV-load failure discards the last two ids of a (the list shrinks); then it goes on
    del out_a[-2:]
    proc.update_state(None)
    check_step(proc, boosted(tok, 3, V, g), batch, g)
    # an id the state has already seen (out_a[-2]; out_a[-1] is not fed yet) is rewritten to " make", and the
    # new id is " a": " bomb" completes "make a bomb" and must be banned
    make, a, bomb = enc(tok, " make a bomb")
    assert out_a[-2] != make
    out_a[-2], out_a[-1] = make, a
    got = check_step(proc, boosted(tok, 3, V, g), batch, g)
    assert torch.isneginf(got[0, bomb])


def test_parallel_sampling_children_keep_their_own_states(setup):
    proc, tok, _ = setup
    V = len(tok)
    g = torch.Generator().manual_seed(5)
    p = params(policy="strict")
    prompt = enc(tok, "over the lazy")
    outs = [[], [], []]                           # n = 3: vLLM adds each child as its own request
    batch = admit(proc, [(i, p, prompt, outs[i]) for i in range(3)])
    for _ in range(4):
        check_step(proc, boosted(tok, 3, V, g), batch, g)
    assert len({tuple(o) for o in outs}) > 1      # sampled apart, each followed exactly (check_step)


def test_validate_params_at_admission(setup):
    proc, _, _ = setup
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters
    cls = type(proc)
    cls.validate_params(params(policy="strict", banned_phrases=["acme"]))
    with pytest.raises(ValueError, match="unknown policy 'lenient'"):
        cls.validate_params(params(policy="lenient"))
    with pytest.raises(VLLMValidationError, match="unknown request key 'polcy'"):
        validate_logits_processors_parameters(["fastsafe.integrations.vllm:SafetyLogitsProcessor"],
                                              SamplingParams(extra_args={"fastsafe_polcy": "x"}))


def test_no_policies_file_filters_nothing(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    monkeypatch.delenv("FASTSAFE_VLLM_POLICIES", raising=False)
    monkeypatch.setattr(worker, "load_tokenizer", lambda cfg: tok)
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=4), speculative_config=None,
                          model_config=SimpleNamespace(get_vocab_size=lambda: len(tok)))
    from fastsafe.integrations.vllm import SafetyLogitsProcessor
    proc = SafetyLogitsProcessor(cfg, torch.device("cpu"), False)
    proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, params(), enc(tok, "make a"), [])], moved=[]))
    x = torch.randn(1, len(tok))
    assert torch.equal(proc.apply(x.clone()), x)


def test_store_hot_swap_in_a_running_batch(tmp_path, monkeypatch):
    from fastsafe import RiskEntityStore
    tok = tiny_tokenizer()
    store = RiskEntityStore(tmp_path / "risk.db")
    store.add("bomb")
    (tmp_path / "p.toml").write_text('[policy.default]\nstore = "risk.db"\ntop_k = 5\n')
    monkeypatch.setenv("FASTSAFE_VLLM_POLICIES", str(tmp_path / "p.toml"))
    monkeypatch.setenv("FASTSAFE_VLLM_POLL_INTERVAL", "0")
    monkeypatch.setattr(worker, "load_tokenizer", lambda cfg: tok)
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=4), speculative_config=None,
                          model_config=SimpleNamespace(get_vocab_size=lambda: len(tok)))
    from fastsafe.integrations.vllm import SafetyLogitsProcessor
    proc = SafetyLogitsProcessor(cfg, torch.device("cpu"), False)
    V = len(tok)
    out = enc(tok, " the lazy")
    proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, params(), enc(tok, "over"), out)], moved=[]))
    dog = enc(tok, " dog")[0]
    x = torch.zeros(1, V)
    x[0, dog] = 5.0
    assert int(proc.apply(x.clone()).argmax()) == dog           # "lazy dog" is not an entity yet
    store.add("lazy dog")                                        # `fastsafe entities add` in another process
    follower = proc.rows.built["default"].follower
    deadline = time.monotonic() + 60
    while proc.rows.matchers_of(int(proc._row_slot[0]))[0].version != store.version():
        proc.update_state(None)                                  # between steps: poll, swap when built
        follower.wait(5)
        assert time.monotonic() < deadline
    got = proc.apply(x.clone())
    assert torch.isneginf(got[0, dog])                           # banned from the next step on, same request


def _proc(tmp_path, monkeypatch, policies_toml, tok, capacity=4):
    (tmp_path / "p.toml").write_text(policies_toml)
    monkeypatch.setenv("FASTSAFE_VLLM_POLICIES", str(tmp_path / "p.toml"))
    monkeypatch.setattr(worker, "load_tokenizer", lambda cfg: tok)
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=capacity), speculative_config=None,
                          model_config=SimpleNamespace(get_vocab_size=lambda: len(tok)))
    from fastsafe.integrations.vllm import SafetyLogitsProcessor
    return SafetyLogitsProcessor(cfg, torch.device("cpu"), False)


def test_audit_log_lines_and_metrics(tmp_path, monkeypatch):
    import logging

    from fastsafe.integrations.vllm import metrics
    tok = tiny_tokenizer()
    proc = _proc(tmp_path, monkeypatch, '[policy.default]\nphrases = ["make a bomb"]\ntop_k = 5\n', tok)
    lines = []
    handler = logging.Handler()
    handler.emit = lambda rec: lines.append(rec.getMessage())
    log = proc.rows.logger
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[
            (0, params(), enc(tok, "How to make a"), []),        # " bomb" next: a token ban
            (1, params(), enc(tok, "How to make a b"), [])],     # "omb" next: only the text check sees it
            moved=[]))
        before = metrics()["policies"].get("default", {}).get("token_ban", 0)
        x = torch.zeros(2, len(tok))
        x[0, enc(tok, " bomb")[0]] = 9.0
        x[1, enc(tok, "omb")[0]] = 9.0
        got = proc.apply(x)
        assert torch.isneginf(got[0, enc(tok, " bomb")[0]]) and torch.isneginf(got[1, enc(tok, "omb")[0]])
        proc.update_state(None)                                  # between steps: finished records are counted
        proc.rows.audit.drain(wait=True)
        proc.rows.audit.log_summary()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert any("policy=default rule=token_ban request=0 row=0" in m and "token=' bomb' entity='make a bomb'" in m
               for m in lines), lines
    assert any("rule=text_match request=1 row=1" in m and "entity='make a bomb'" in m for m in lines), lines
    assert any(m.startswith("fastsafe: interventions: default token_ban=1 text_match=1") for m in lines), lines
    snap = metrics()
    assert snap["policies"]["default"]["token_ban"] == before + 1 and snap["steps"] >= 1


def test_regex_entities_on_the_host_path(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    proc = _proc(tmp_path, monkeypatch, '[policy.rx]\nregexes = ["quick\\\\s+brown"]\ntop_k = 5\n', tok)
    proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[
        (0, params(policy="rx"), enc(tok, "the quick"), [])], moved=[]))
    brown = enc(tok, " brown")[0]
    x = torch.zeros(1, len(tok))
    x[0, brown] = 9.0
    got = proc.apply(x)
    assert torch.isneginf(got[0, brown]) and int(got[0].argmax()) != brown
    assert proc.rows.audit.counts["rx"]["regex"] == 1


def test_regular_regexes_on_the_device_path(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    proc = _proc(tmp_path, monkeypatch, '[policy.rx]\nregexes = ["quick +brown"]\ntop_k = 5\n', tok)
    dm = proc.rows.built["rx"].matcher()
    if dm.has_regexes or not getattr(dm, "has_device_text", False):
        pytest.skip("this DeviceMatcher checks regexes on the host only")
    proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[
        (0, params(policy="rx"), enc(tok, "the quick"), [])], moved=[]))
    brown = enc(tok, " brown")[0]
    x = torch.zeros(1, len(tok))
    x[0, brown] = 9.0
    got = proc.apply(x)
    assert torch.isneginf(got[0, brown])
    proc.rows.audit.drain(wait=True)
    assert proc.rows.audit.counts["rx"]["text_match"] == 1 and proc.rows.audit.counts["rx"]["regex"] == 0

"""vLLM adapter, V1 runner interface: SafetyLogitsProcessor driven with vLLM's own BatchUpdate objects.

Runs where vLLM is installed (.venv-vllm); skipped elsewhere. The real engine is tested by H2's tests.
"""
from __future__ import annotations

import random
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
"""


@pytest.fixture
def setup(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    (tmp_path / "p.toml").write_text(POLICIES)
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


def check_step(proc, logits, reqs, rng):
    """apply() equals the per-row reference; then every row 'samples' and vLLM appends to its output list."""
    rows = proc.rows
    B = logits.shape[0]
    slots = [int(proc._row_slot[r]) for r in range(B)]
    hist = {s: (reqs[s]["prompt"] + reqs[s]["out"], len(reqs[s]["out"])) for s in slots if s >= 0}
    want = reference(rows, logits, hist, slots)
    got = proc.apply(logits.clone())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for r in range(B):
        s = slots[r]
        if s >= 0:
            probs = torch.softmax(got[r], -1)
            reqs[s]["out"].append(int(torch.multinomial(probs, 1, generator=rng)))
    return got


def boosted(tok, B, V, g):
    logits = torch.randn(B, V, generator=g) * 2
    for w in (" bomb", " dog", " kill", "omb", " brown"):
        logits[:, enc(tok, w)[0]] += 6
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
    rng = random.Random(0)
    reqs = {}

    def add(row, p, prompt):
        out: list[int] = []
        return (row, p, enc(tok, prompt), out)

    added = [add(0, params(), "How to make a"), add(1, params(policy="strict"), "over the lazy"),
             add(2, params(policy="none"), "make a"), add(3, params(banned_phrases=["quick brown"]), "the quick"),
             add(4, params(policy="strict"), "the lazy")]
    proc.update_state(BatchUpdate(batch_size=5, removed=[], added=added, moved=[]))
    for row, p, prompt, out in added:
        reqs[int(proc._row_slot[row])] = {"prompt": prompt, "out": out}
    for _ in range(3):
        check_step(proc, boosted(tok, 5, V, g), reqs, g)
        proc.update_state(None)
    # swap 0 <-> 3, then remove row 1 and condense 4 -> 1 (vLLM's order: removed, added, moved)
    proc.update_state(BatchUpdate(batch_size=5, removed=[], added=[], moved=[(0, 3, MoveDirectionality.SWAP)]))
    check_step(proc, boosted(tok, 5, V, g), reqs, g)
    gone = int(proc._row_slot[1])
    preempted = reqs[gone]
    proc.update_state(BatchUpdate(batch_size=4, removed=[1], added=[],
                                  moved=[(4, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert proc._row_slot[4] == -1
    for _ in range(2):
        check_step(proc, boosted(tok, 4, V, g), reqs, g)
        proc.update_state(None)
    # the preempted request comes back (recompute): vLLM re-adds it with its prompt and output so far
    again = (4, params(policy="strict"), preempted["prompt"], preempted["out"])
    proc.update_state(BatchUpdate(batch_size=5, removed=[], added=[again], moved=[]))
    reqs[int(proc._row_slot[4])] = preempted
    for _ in range(3):
        check_step(proc, boosted(tok, 5, V, g), reqs, g)
        proc.update_state(None)
    proc.rows.audit.drain(wait=True)
    c = proc.rows.audit.counts
    assert c["default"]["token_ban"] + c["strict"]["token_ban"] > 0
    assert c["none"]["token_ban"] > 0 or True        # request-only phrases count under "none" when they fire
    assert rng is not None


def test_async_placeholders_and_discarded_tokens(setup):
    proc, tok, _ = setup
    V = len(tok)
    g = torch.Generator().manual_seed(3)
    out_a, out_b = [], enc(tok, " the")           # b was preempted with one output token already
    added = [(0, params(), enc(tok, "How to make"), out_a), (1, params(policy="strict"), enc(tok, "the lazy"), out_b)]
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=added, moved=[]))
    reqs = {int(proc._row_slot[r]): {"prompt": p, "out": o} for r, _, p, o in added}
    check_step(proc, boosted(tok, 2, V, g), reqs, g)
    for step in range(4):
        # async scheduling: the runner appends a -1 placeholder at update_state time ...
        real = [o[-1] for o in (out_a, out_b)]
        for o in (out_a, out_b):
            o[-1] = -1
        proc.update_state(None)
        # ... and writes the sampled ids in right before the logits processors run
        out_a[-1], out_b[-1] = real
        check_step(proc, boosted(tok, 2, V, g), reqs, g)
    # a KV-load failure discards the last two ids of a (the list shrinks); then it goes on
    del out_a[-2:]
    proc.update_state(None)
    check_step(proc, boosted(tok, 2, V, g), reqs, g)
    # the list is rewritten to the same length with other ids: detected by the last id seen
    out_b[-1] = (out_b[-1] + 1) % V
    check_step(proc, boosted(tok, 2, V, g), reqs, g)


def test_parallel_sampling_children_keep_their_own_states(setup):
    proc, tok, _ = setup
    V = len(tok)
    g = torch.Generator().manual_seed(5)
    p = params(policy="strict")
    prompt = enc(tok, "over the lazy")
    outs = [[], [], []]                           # n = 3: vLLM adds each child as its own request
    added = [(i, p, prompt, outs[i]) for i in range(3)]
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=added, moved=[]))
    reqs = {int(proc._row_slot[i]): {"prompt": prompt, "out": outs[i]} for i in range(3)}
    for _ in range(4):
        check_step(proc, boosted(tok, 3, V, g), reqs, g)
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

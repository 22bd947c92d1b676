"""vLLM adapter, Model Runner V2 interface: SafetyLogitsProcessorV2 driven with vLLM's own RequestState,
LogitsProcRequestState and LogitsContext.

Model Runner V2 needs Triton on the device, so on a CPU the staged writes that its Triton kernel applies
are applied here in plain torch (``_flush``), and pinned UVA buffers fall back to plain tensors; what
the processor reads (``all_token_ids``, ``prompt_len``, ``prefill_len``, ``total_len``) is vLLM's.
Skipped where vLLM is not installed.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402

from fastsafe.integrations.vllm import worker  # noqa: E402
from tests.test_matcher import tiny_tokenizer  # noqa: E402
from tests.test_vllm_adapter_rows import reference  # noqa: E402
from tests.test_vllm_adapter_v1 import boosted, enc, params, write_policies  # noqa: E402


def _flush(t) -> None:
    """StagedWriteTensor.apply_write without its Triton kernel."""
    start = 0
    for idx, st, end in zip(t._staged_write_indices, t._staged_write_starts, t._staged_write_cu_lens):
        vals = t._staged_write_contents[start:end]
        if t.gpu.dim() == 2:
            t.gpu[idx, st:st + len(vals)] = torch.tensor(vals, dtype=t.gpu.dtype)
        else:
            t.gpu[idx] = vals[0]
        start = end
    t.clear_staged_writes()


class Runner:
    """The parts of Model Runner V2 a custom logits processor sees, on the CPU."""

    def __init__(self, monkeypatch, tok, max_reqs=6, max_len=64):
        import vllm.v1.worker.gpu.buffer_utils as bu
        monkeypatch.setattr(bu, "is_uva_available", lambda: False)
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcRequestState
        from vllm.v1.worker.gpu.states import RequestState
        self.tok = tok
        self.rs = RequestState(max_num_reqs=max_reqs, max_model_len=max_len, max_num_batched_tokens=256,
                               num_speculative_steps=0, vocab_size=len(tok), device=torch.device("cpu"))
        self.lp_state = LogitsProcRequestState.from_request_state(self.rs)
        self.cfg = SimpleNamespace(speculative_config=None, model_config=SimpleNamespace(get_vocab_size=lambda: len(tok)))

    def add(self, proc, req_id, prompt, output=(), p=None):
        ids = list(prompt) + list(output)
        self.rs.add_request(req_id, len(prompt), ids, 0, 32)
        slot = self.rs.req_id_to_index[req_id]
        used = proc.add_request(slot, p or params())
        return slot, used

    def staged(self, proc):
        rs = self.rs
        rs.prompt_len.copy_to_uva()
        rs.prefill_len.copy_to_uva()
        for t in (rs.total_len, rs.all_token_ids, rs.num_computed_tokens):
            _flush(t)
        proc.apply_staged_writes()

    def ctx(self, slots):
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext
        idx = torch.tensor(slots, dtype=torch.int32)
        pos = self.rs.total_len.gpu[idx.long()] - 1
        return LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=np.asarray(slots, np.int32),
                             expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32),
                             input_ids=self.rs.all_token_ids.gpu[idx.long(), pos.long()], pos=pos,
                             seq_lens_upper_bound_np=(pos + 1).numpy())

    def history(self, slot):
        n, p = int(self.rs.total_len.gpu[slot]), int(self.rs.prompt_len.np[slot])
        return self.rs.all_token_ids.gpu[slot, :n].tolist(), n - p

    def commit(self, slot, token):
        """post_update: the sampled id is written on the device and total_len grows."""
        n = int(self.rs.total_len.gpu[slot])
        self.rs.all_token_ids.gpu[slot, n] = token
        self.rs.total_len.gpu[slot] = n + 1


@pytest.fixture
def setup(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    write_policies(tmp_path, len(tok))
    monkeypatch.setenv("FASTSAFE_VLLM_POLICIES", str(tmp_path / "p.toml"))
    monkeypatch.setattr(worker, "load_tokenizer", lambda cfg: tok)
    run = Runner(monkeypatch, tok)
    from fastsafe.integrations.vllm import SafetyLogitsProcessorV2
    return SafetyLogitsProcessorV2(run.cfg, run.lp_state), run, tok


def step(proc, run, slots, g):
    rows = proc.rows
    V = run.rs.vocab_size
    logits = boosted(run.tok, len(slots), V, g)
    hist = {s: run.history(s) for s in slots}
    want = reference(rows, logits, hist, list(slots))
    got = proc.apply(logits.clone(), run.ctx(slots))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for r, s in enumerate(slots):
        run.commit(s, int(torch.multinomial(torch.softmax(got[r], -1), 1, generator=g)))
    return got, logits


def test_v2_processor_subclasses_vllm_and_loads_by_fqcn(setup):
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns
    proc, _, _ = setup
    (cls,) = _load_v2_logitsprocs_by_fqcns(["fastsafe.integrations.vllm:SafetyLogitsProcessorV2"])
    assert issubclass(cls, LogitsProcessor) and isinstance(proc, cls)


def test_v2_slots_reordered_rows_declined_requests_and_refill(setup):
    proc, run, tok = setup
    g = torch.Generator().manual_seed(0)
    a, ua = run.add(proc, "a", enc(tok, "How to make a"))
    b, ub = run.add(proc, "b", enc(tok, "over the lazy"), p=params(policy="strict"))
    c, uc = run.add(proc, "c", enc(tok, "make a"), p=params(policy="none"))
    d, ud = run.add(proc, "d", enc(tok, "the quick"), p=params(policy="none", banned_phrases=["quick brown"]))
    t, ut = run.add(proc, "t", enc(tok, "I will"), p=params(policy="debias", tsdi_scale=-0.5))   # TSDI by position
    assert (ua, ub, uc, ud, ut) == (True, True, False, True, True)    # declined: its rows are left alone
    run.staged(proc)
    layouts = [[a, b, c, d, t], [d, t, c, a, b], [b, a], [c, t, d, b, a]]   # reordered every step; some not scheduled
    for slots in layouts:
        got, logits = step(proc, run, slots, g)
        if c in slots:
            assert torch.equal(got[slots.index(c)], logits[slots.index(c)])
        run.staged(proc)
    # request b finishes; a new request reuses its slot (add_request must reset everything of the occupant)
    run.rs.remove_request("b")
    e, _ = run.add(proc, "e", enc(tok, "I will"), p=params())
    assert e == b
    # request a is preempted and comes back: V2 refills the slot with prompt + output so far
    hist_a, n_out = run.history(a)
    run.rs.remove_request("a")
    a2, _ = run.add(proc, "a2", hist_a[:len(hist_a) - n_out], hist_a[len(hist_a) - n_out:])
    run.staged(proc)
    for slots in ([a2, e, d], [e, a2, c, d]):
        step(proc, run, slots, g)
        run.staged(proc)
    proc.rows.audit.drain(wait=True)
    assert sum(r["token_ban"] for r in proc.rows.audit.counts.values()) > 0


def test_v2_refuses_speculative_decoding(setup):
    _, run, _ = setup
    from fastsafe.integrations.vllm import SafetyLogitsProcessorV2
    cfg = SimpleNamespace(speculative_config=object(), model_config=run.cfg.model_config)
    with pytest.raises(ValueError, match="does not support speculative decoding"):
        SafetyLogitsProcessorV2(cfg, run.lp_state)


def test_v2_validate_params(setup):
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors_params_validator
    validate = build_custom_logits_processors_params_validator(["fastsafe.integrations.vllm:SafetyLogitsProcessorV2"])
    validate(params(policy="strict"))
    with pytest.raises(VLLMValidationError, match="unknown policy"):
        validate(SamplingParams(extra_args={"fastsafe_policy": "lenient"}))


def test_v2_store_hot_swap(tmp_path, monkeypatch):
    from fastsafe import RiskEntityStore
    tok = tiny_tokenizer()
    store = RiskEntityStore(tmp_path / "risk.db")
    store.add("bomb")
    (tmp_path / "p.toml").write_text('[policy.default]\nstore = "risk.db"\ntop_k = 5\n')
    monkeypatch.setenv("FASTSAFE_VLLM_POLICIES", str(tmp_path / "p.toml"))
    monkeypatch.setenv("FASTSAFE_VLLM_POLL_INTERVAL", "0")
    monkeypatch.setattr(worker, "load_tokenizer", lambda cfg: tok)
    run = Runner(monkeypatch, tok)
    from fastsafe.integrations.vllm import SafetyLogitsProcessorV2
    proc = SafetyLogitsProcessorV2(run.cfg, run.lp_state)
    a, _ = run.add(proc, "a", enc(tok, "over the"), enc(tok, " lazy"))
    run.staged(proc)
    dog = enc(tok, " dog")[0]
    x = torch.zeros(1, len(tok))
    x[0, dog] = 5.0
    assert int(proc.apply(x.clone(), run.ctx([a])).argmax()) == dog
    store.add("lazy dog")
    follower = proc.rows.built["default"].follower
    import time
    deadline = time.monotonic() + 60
    while proc.rows.matchers_of(a)[0].version != store.version():
        run.staged(proc)                       # between steps: poll, swap when built, re-derive on the device
        follower.wait(5)
        assert time.monotonic() < deadline
    assert torch.isneginf(proc.apply(x.clone(), run.ctx([a]))[0, dog])


def test_v2_request_only_matcher_built_in_the_background(setup, monkeypatch):
    """A blocked background build: steps run under the interim rule (no phrase start, equal to the
    per-row reference), then apply_staged_writes puts the full matcher in force (state re-derived)."""
    import threading

    from fastsafe.integrations.vllm.built import RequestMatchers
    from fastsafe.ops import unpack_bitmask
    release = threading.Event()
    real = RequestMatchers._build
    monkeypatch.setattr(RequestMatchers, "_build", lambda self, key: (release.wait(30), real(self, key))[1])
    proc, run, tok = setup
    g = torch.Generator().manual_seed(1)
    rm = proc.rows.request_matchers
    d, ud = run.add(proc, "d", enc(tok, "the quick"), p=params(policy="none", banned_phrases=["quick brown", "lazy"]))
    assert ud
    run.staged(proc)
    interim = proc.rows.slot_request_matcher[d]
    assert interim is proc.rows.interim
    firsts = set((~unpack_bitmask(proc.rows._interim_words[d], run.rs.vocab_size)).nonzero()[:, 0].tolist())
    assert enc(tok, " brown")[0] in firsts and enc(tok, " lazy")[0] in firsts    # the prompt's "quick" continued
    for _ in range(4):
        got, _ = step(proc, run, [d], g)
        assert torch.isneginf(got[0, sorted(firsts)]).all()
        run.staged(proc)
    assert rm.builds == 0 and not interim.has_text_rules           # never waited for the blocked build
    release.set()
    rm.wait()
    run.staged(proc)
    full = proc.rows.slot_request_matcher[d]
    assert full is not interim and full.has_text_rules
    for _ in range(2):
        step(proc, run, [d], g)
        run.staged(proc)

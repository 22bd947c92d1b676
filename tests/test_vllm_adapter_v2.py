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

    def __init__(self, monkeypatch, tok, max_reqs=6, max_len=64, num_spec=0):
        import vllm.v1.worker.gpu.buffer_utils as bu
        monkeypatch.setattr(bu, "is_uva_available", lambda: False)
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcRequestState
        from vllm.v1.worker.gpu.states import RequestState
        self.tok = tok
        self.rs = RequestState(max_num_reqs=max_reqs, max_model_len=max_len, max_num_batched_tokens=256,
                               num_speculative_steps=num_spec, vocab_size=len(tok), device=torch.device("cpu"))
        self.lp_state = LogitsProcRequestState.from_request_state(self.rs)
        spec = None if num_spec == 0 else SimpleNamespace(num_speculative_tokens=num_spec,
                                                          rejection_sample_method="standard")
        self.cfg = SimpleNamespace(speculative_config=spec,
                                   model_config=SimpleNamespace(get_vocab_size=lambda: len(tok)))

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

    def spec_ctx(self, slots, drafts):
        """The context of a step with drafts: request ``slots[b]`` owns ``1 + len(drafts[b])`` rows; row 0
        is fed its last committed id, row ``j`` its ``j``-th draft (as vLLM's input_ids / positions)."""
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext
        exp, local, ids, pos = [], [], [], []
        for s, d in zip(slots, drafts):
            n = int(self.rs.total_len.gpu[s])
            for j, t in enumerate([int(self.rs.all_token_ids.gpu[s, n - 1])] + list(d)):
                exp.append(s)
                local.append(j)
                ids.append(t)
                pos.append(n - 1 + j)
        idx = torch.tensor(slots, dtype=torch.int32)
        return LogitsContext(expanded_idx_mapping=torch.tensor(exp, dtype=torch.int32), idx_mapping=idx,
                             idx_mapping_np=np.asarray(slots, np.int32),
                             expanded_local_pos=torch.tensor(local, dtype=torch.int32),
                             input_ids=torch.tensor(ids, dtype=torch.int32), pos=torch.tensor(pos, dtype=torch.int32),
                             seq_lens_upper_bound_np=np.asarray([int(self.rs.total_len.gpu[s]) + len(d)
                                                                 for s, d in zip(slots, drafts)], np.int32))

    def history(self, slot):
        n, p = int(self.rs.total_len.gpu[slot]), int(self.rs.prompt_len.np[slot])
        return self.rs.all_token_ids.gpu[slot, :n].tolist(), n - p

    def commit(self, slot, token):
        """post_update: the sampled id is written on the device and total_len grows."""
        n = int(self.rs.total_len.gpu[slot])
        self.rs.all_token_ids.gpu[slot, n] = token
        self.rs.total_len.gpu[slot] = n + 1

    def commit_many(self, slot, tokens):
        """post_update under speculative decoding: the accepted drafts and the bonus id in one step."""
        for t in tokens:
            self.commit(slot, t)


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


def test_v2_speculative_config_refusals(setup):
    _, run, _ = setup
    from fastsafe.integrations.vllm import SafetyLogitsProcessorV2
    for spec, msg in ((SimpleNamespace(num_speculative_tokens=2, rejection_sample_method="synthetic"), "synthetic"),
                      (SimpleNamespace(num_speculative_tokens=None), "num_speculative_tokens")):
        cfg = SimpleNamespace(speculative_config=spec, model_config=run.cfg.model_config)
        with pytest.raises(ValueError, match=msg):
            SafetyLogitsProcessorV2(cfg, run.lp_state)


def test_v1_runner_refuses_custom_processors_under_speculative_decoding():
    """vLLM's V1 runner itself refuses any custom logits processor with speculative decoding (README)."""
    from vllm.v1.sample.logits_processor import STR_SPEC_DEC_REJECTS_LOGITSPROCS, build_logitsprocs
    assert STR_SPEC_DEC_REJECTS_LOGITSPROCS == ("Custom logits processors are not supported when speculative "
                                                "decoding is enabled.")
    cfg = SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=2))
    with pytest.raises(ValueError, match="not supported when speculative decoding"):
        build_logitsprocs(cfg, torch.device("cpu"), False, False,
                          ["fastsafe.integrations.vllm:SafetyLogitsProcessor"])


def test_v2_validate_params(setup):
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors_params_validator
    validate = build_custom_logits_processors_params_validator(["fastsafe.integrations.vllm:SafetyLogitsProcessorV2"])
    validate(params(policy="strict"))
    with pytest.raises(VLLMValidationError, match="unknown policy"):
        validate(SamplingParams(extra_args={"fastsafe_policy": "lenient"}))


@pytest.mark.parametrize("num_spec", [0, 2])
def test_v2_store_hot_swap(tmp_path, monkeypatch, num_spec):
    from fastsafe import RiskEntityStore
    tok = tiny_tokenizer()
    store = RiskEntityStore(tmp_path / "risk.db")
    store.add("bomb")
    (tmp_path / "p.toml").write_text('[policy.default]\nstore = "risk.db"\ntop_k = 5\n')
    monkeypatch.setenv("FASTSAFE_VLLM_POLICIES", str(tmp_path / "p.toml"))
    monkeypatch.setenv("FASTSAFE_VLLM_POLL_INTERVAL", "0")
    monkeypatch.setattr(worker, "load_tokenizer", lambda cfg: tok)
    run = Runner(monkeypatch, tok, num_spec=num_spec)
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
    if num_spec:                                   # draft rows: from the new matcher's state of the slot
        y = torch.zeros(3, len(tok))
        y[:, dog] = 5.0
        got = proc.apply(y, run.spec_ctx([a], [enc(tok, " the lazy")]))
        assert torch.isneginf(got[0, dog]) and torch.isfinite(got[1, dog]) and torch.isneginf(got[2, dog])


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


# ---------------------------------------------------------------------------- speculative decoding
NUM_SPEC = 3


@pytest.fixture
def spec_pair(tmp_path, monkeypatch):
    """A processor under speculative decoding (3 drafts) and one without, each on its own vLLM RequestState."""
    tok = tiny_tokenizer()
    write_policies(tmp_path, len(tok))
    monkeypatch.setenv("FASTSAFE_VLLM_POLICIES", str(tmp_path / "p.toml"))
    monkeypatch.setenv("FASTSAFE_VLLM_REQUEST_BUILD", "step")   # both processors: the full request-only matcher
    monkeypatch.setattr(worker, "load_tokenizer", lambda cfg: tok)
    from fastsafe.integrations.vllm import SafetyLogitsProcessorV2
    rs, rr = Runner(monkeypatch, tok, num_spec=NUM_SPEC), Runner(monkeypatch, tok)
    return SafetyLogitsProcessorV2(rs.cfg, rs.lp_state), rs, SafetyLogitsProcessorV2(rr.cfg, rr.lp_state), rr, tok


def spec_step(proc, run, slots, drafts, logits):
    """apply() on a step with drafts; every row equals the per-row reference of (committed ids + the drafts
    before it). Returns the filtered logits and each request's first row."""
    got = proc.apply(logits.clone(), run.spec_ctx(slots, drafts))
    first, r = [], 0
    for s, d in zip(slots, drafts):
        first.append(r)
        hist, n_out = run.history(s)
        for j in range(len(d) + 1):
            want = reference(proc.rows, logits[r:r + 1], {s: (hist + list(d[:j]), n_out + j)}, [s])
            torch.testing.assert_close(got[r], want[0], rtol=0, atol=1e-6)
            r += 1
    assert r == logits.shape[0]
    return got, first


def committed_states_match(proc, run, slots):
    """The request slots' automaton states are those of their committed ids (never of rejected drafts)."""
    for s in slots:
        hist, _ = run.history(s)
        for m in proc.rows.matchers_of(s):
            torch.testing.assert_close(proc.rows.state(m)[s], m.state_from_histories([hist])[0], rtol=0, atol=0)


SPEC_REQS = [("a", "How to", {}), ("b", "over the", {"policy": "strict"}), ("c", "How to", {"policy": "none"}),
             ("d", "I saw the", {"policy": "none", "banned_phrases": ["quick brown"]}),
             ("t", "I will", {"policy": "debias", "tsdi_scale": -0.5}), ("e", "over the", {"policy": "strict"})]


def test_v2_draft_rows_follow_the_drafts_before_them(spec_pair):
    """Mixed rows per request; each draft row gets the bans of the state after the drafts before it, equal to
    the non-speculative processor's rows when those drafts are committed one step at a time."""
    ps, rs, pr, rr, tok = spec_pair
    V = rs.rs.vocab_size
    slot = {}
    for name, prompt, p in SPEC_REQS:
        s, used = rs.add(ps, name, enc(tok, prompt), p=params(**p))
        s2, used2 = rr.add(pr, name, enc(tok, prompt), p=params(**p))
        assert s == s2 and used == used2 == (name != "c")
        slot[name] = s
    rs.staged(ps)
    rr.staged(pr)
    text = {"a": " make a bomb", "b": "", "c": " make a", "d": " quick brown", "t": " the lazy", "e": " lazy dog"}
    order = ["d", "a", "b", "t", "c", "e"]
    slots = [slot[n] for n in order]
    drafts = [enc(tok, text[n]) for n in order]
    logits = boosted(tok, sum(len(d) + 1 for d in drafts), V, torch.Generator().manual_seed(3))
    got, first = spec_step(ps, rs, slots, drafts, logits)
    assert ps.layout_reads == 1
    row = {n: first[i] for i, n in enumerate(order)}
    bomb, dog, brown = enc(tok, " bomb")[0], enc(tok, " dog")[0], enc(tok, " brown")[0]
    assert torch.isfinite(got[row["a"], bomb]) and torch.isfinite(got[row["a"] + 1, bomb])
    assert torch.isneginf(got[row["a"] + 2, bomb])            # " make", " a" drafted: " bomb" banned on the next row
    assert torch.isfinite(got[row["e"], dog]) and torch.isneginf(got[row["e"] + 1, dog])
    assert torch.isfinite(got[row["d"], brown]) and torch.isneginf(got[row["d"] + 1, brown])   # request-only phrase
    assert torch.equal(got[row["c"]:row["c"] + 3], logits[row["c"]:row["c"] + 3])              # declined: left alone
    # the same rows from the processor without drafts, the drafts committed one step at a time
    for j in range(max(len(d) for d in drafts) + 1):
        layout = [i for i, d in enumerate(drafts) if len(d) >= j]
        out = pr.apply(logits[[first[i] + j for i in layout]].clone(), rr.ctx([slots[i] for i in layout]))
        torch.testing.assert_close(out, got[[first[i] + j for i in layout]], rtol=0, atol=0)
        for i in layout:
            if len(drafts[i]) > j:
                rr.commit(slots[i], drafts[i][j])
        rr.staged(pr)


def test_v2_committed_state_follows_only_accepted_tokens(spec_pair):
    """Steps with drafts; vLLM commits the accepted drafts and the bonus id (up to num_spec + 1 ids a step):
    the request slots' states follow exactly those, the next step's rows are filtered from them."""
    ps, rs, _, _, tok = spec_pair
    V = rs.rs.vocab_size
    g = torch.Generator().manual_seed(5)
    slot = {name: rs.add(ps, name, enc(tok, prompt), p=params(**p))[0] for name, prompt, p in SPEC_REQS}
    rs.staged(ps)
    a, b = slot["a"], slot["b"]
    # one step by hand: a's draft " make" is accepted, " the" rejected, the bonus of row 1 is " a";
    # b's draft " lazy" is rejected, its row 0 gives " quick"
    got, first = spec_step(ps, rs, [a, b], [enc(tok, " make the"), enc(tok, " lazy")], boosted(tok, 5, V, g))
    rs.commit_many(a, enc(tok, " make a"))
    rs.commit_many(b, enc(tok, " quick"))
    rs.staged(ps)
    got, first = spec_step(ps, rs, [b, a], [[], enc(tok, " bomb")], boosted(tok, 3, V, g))
    committed_states_match(ps, rs, [a, b])
    assert torch.isneginf(got[first[1], enc(tok, " bomb")[0]])        # both ids of a's last step fed
    assert torch.isfinite(got[first[0], enc(tok, " dog")[0]])         # b never saw its rejected " lazy"
    rs.commit_many(a, enc(tok, " the"))
    rs.commit_many(b, enc(tok, " fox"))
    rs.staged(ps)
    # random steps: drafts cut from phrases, accepted while the target row allows them (coin flip)
    pieces = [enc(tok, t) for t in (" make a bomb", " lazy dog", " the quick brown", " kill", " over the lazy")]
    rng = np.random.default_rng(0)
    names = list(slot)
    for _ in range(6):
        batch = list(rng.permutation(names)[:rng.integers(2, len(names) + 1)])
        slots = [slot[n] for n in batch]
        drafts = []
        for _n in batch:
            p = pieces[rng.integers(len(pieces))]
            k = int(rng.integers(0, NUM_SPEC + 1))
            st = int(rng.integers(0, len(p)))
            drafts.append((p[st:] + p)[:k])
        logits = boosted(tok, sum(len(d) + 1 for d in drafts), V, g)
        got, first = spec_step(ps, rs, slots, drafts, logits)
        committed_states_match(ps, rs, slots)
        for s, d, f in zip(slots, drafts, first):
            out = []
            for j in range(len(d) + 1):
                if j < len(d) and torch.isfinite(got[f + j, d[j]]) and rng.random() < 0.7:
                    out.append(d[j])                                  # accepted draft
                    continue
                out.append(int(torch.multinomial(torch.softmax(got[f + j], -1), 1, generator=g)))
                break                                                 # recovered / bonus id; the rest rejected
            rs.commit_many(s, out)
        rs.staged(ps)
    ps.rows.audit.drain(wait=True)
    assert sum(r["token_ban"] for r in ps.rows.audit.counts.values()) > 0


def test_v2_spec_steps_without_drafts_read_nothing_back(spec_pair):
    ps, rs, _, _, tok = spec_pair
    slot = {name: rs.add(ps, name, enc(tok, prompt), p=params(**p))[0] for name, prompt, p in SPEC_REQS}
    rs.staged(ps)
    g = torch.Generator().manual_seed(2)
    for order in (["a", "b", "t"], ["e", "a"]):
        slots = [slot[n] for n in order]
        step(ps, rs, slots, g)
        rs.staged(ps)
    assert ps.layout_reads == 0


def test_v2_all_banned_draft_row_gets_eos(spec_pair):
    ps, rs, _, _, tok = spec_pair
    a, _ = rs.add(ps, "a", enc(tok, "How to"))
    rs.staged(ps)
    bomb, eos = enc(tok, " bomb")[0], ps.rows.eos_token_id
    x = torch.full((3, rs.rs.vocab_size), float("-inf"))
    x[:, bomb] = 1.0                                                  # the only finite token
    got, _ = spec_step(ps, rs, [a], [enc(tok, " make a")], x)
    assert torch.equal(got[:2], x[:2])                                # rows 0-1: " bomb" still allowed
    assert torch.isfinite(got[2]).nonzero().flatten().tolist() == [eos] and float(got[2, eos]) == 0.0
    ps.rows.audit.drain(wait=True)
    assert ps.rows.audit.counts["default"]["all_banned_fallback"] == 1


def test_v2_draft_rows_under_the_interim_rule(setup, monkeypatch):
    """Request-only phrases still building: every row of the request gets its admission mask (start bans:
    no draft can begin a phrase and be accepted), as the non-speculative path keeps it step after step."""
    import threading

    from fastsafe.integrations.vllm import SafetyLogitsProcessorV2
    from fastsafe.integrations.vllm.built import RequestMatchers
    release = threading.Event()
    real = RequestMatchers._build
    monkeypatch.setattr(RequestMatchers, "_build", lambda self, key: (release.wait(30), real(self, key))[1])
    _, _, tok = setup
    run = Runner(monkeypatch, tok, num_spec=2)
    proc = SafetyLogitsProcessorV2(run.cfg, run.lp_state)
    d, _ = run.add(proc, "d", enc(tok, "I saw the quick"), p=params(policy="none", banned_phrases=["quick brown"]))
    run.staged(proc)
    assert proc.rows.slot_request_matcher[d] is proc.rows.interim
    logits = boosted(tok, 3, run.rs.vocab_size, torch.Generator().manual_seed(4))
    got, _ = spec_step(proc, run, [d], [enc(tok, " fox jumps")], logits)
    brown = enc(tok, " brown")[0]
    assert torch.isneginf(got[:, brown]).all()                        # the prompt's "quick" continued: every row
    release.set()
    proc.rows.request_matchers.wait()
    run.staged(proc)                                                  # the full matcher in force, mirrored
    assert proc.rows.slot_request_matcher[proc.draft_slot(d, 1)] is proc.rows.slot_request_matcher[d]
    spec_step(proc, run, [d], [enc(tok, " fox jumps")], logits)


def test_v2_draft_rows_of_a_declined_request_in_a_reused_slot(spec_pair):
    """A filtered request's slot reused by a request with no policy: its draft rows are left alone too."""
    ps, rs, _, _, tok = spec_pair
    a, _ = rs.add(ps, "a", enc(tok, "How to"), p=params(policy="strict"))
    rs.staged(ps)
    V = rs.rs.vocab_size
    g = torch.Generator().manual_seed(6)
    spec_step(ps, rs, [a], [enc(tok, " the lazy")], boosted(tok, 3, V, g))
    rs.rs.remove_request("a")
    c, used = rs.add(ps, "c", enc(tok, "over the"), p=params(policy="none"))
    b, _ = rs.add(ps, "b", enc(tok, "over the"), p=params(policy="strict"))
    assert c == a and not used
    rs.staged(ps)
    x = boosted(tok, 5, V, g)
    got, first = spec_step(ps, rs, [c, b], [enc(tok, " lazy dog"), enc(tok, " lazy")], x)
    assert torch.equal(got[:3], x[:3]) and torch.isneginf(got[4, enc(tok, " dog")[0]])


def test_v2_host_regex_sees_the_drafts_before_the_row(tmp_path, monkeypatch):
    """A regex the device DFA cannot take (``\\b``) is checked on the host over the committed ids plus the
    row's drafts: equal to the non-speculative processor with the drafts committed one step at a time."""
    tok = tiny_tokenizer()
    (tmp_path / "p.toml").write_text('[policy.default]\nregexes = ["\\\\bquick fox"]\ntop_k = 5\n')
    monkeypatch.setenv("FASTSAFE_VLLM_POLICIES", str(tmp_path / "p.toml"))
    monkeypatch.setattr(worker, "load_tokenizer", lambda cfg: tok)
    from fastsafe.integrations.vllm import SafetyLogitsProcessorV2
    rs, rr = Runner(monkeypatch, tok, num_spec=2), Runner(monkeypatch, tok)
    ps, pr = SafetyLogitsProcessorV2(rs.cfg, rs.lp_state), SafetyLogitsProcessorV2(rr.cfg, rr.lp_state)
    assert ps.rows.built["default"].matcher().has_regexes
    for run, proc in ((rs, ps), (rr, pr)):
        a, _ = run.add(proc, "a", enc(tok, "over the"))
        run.staged(proc)
    fox = enc(tok, " fox")[0]
    x = boosted(tok, 3, rs.rs.vocab_size, torch.Generator().manual_seed(7))
    x[:, fox] += 20.0                                                  # the top candidate of every row
    drafts = enc(tok, " quick fox")
    got = ps.apply(x.clone(), rs.spec_ctx([a], [drafts]))
    assert torch.isfinite(got[0, fox]) and torch.isneginf(got[1, fox])     # after the draft " quick"
    for j in range(3):
        torch.testing.assert_close(pr.apply(x[j:j + 1].clone(), rr.ctx([a])), got[j:j + 1], rtol=0, atol=0)
        if j < 2:
            rr.commit(a, drafts[j])
        rr.staged(pr)

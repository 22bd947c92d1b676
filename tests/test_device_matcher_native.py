"""The native DeviceMatcher kernels (C++ CPU) against the matcher's tensor program (the reference).

Random histories and candidates over token-id rules (several vocab sizes and entity counts) and
text rules (separators, stretched letters, look-alikes, partial UTF-8 characters across tokens);
the fullgraph compile with the native ops; the op schemas (opcheck); bad input.
"""
from __future__ import annotations

import functools
import random

import pytest
import torch

from fastsafe.ops import backends, unpack_bitmask
from fastsafe.safety import DeviceMatcher
from fastsafe.safety.device_matcher import STATE_WIDTH
from fastsafe.safety.device_matcher_ops import NATIVE_META, NATIVE_TABLES
from tests.test_device_matcher import ENTITIES, SPELLINGS, _random_split_ids, micro_tokenizer
from tests.test_matcher import CORPUS, tiny_tokenizer

pytestmark = pytest.mark.skipif(not backends(op="device_matcher")["cpp"].available,
                                reason="fastsafe._C built without the device matcher kernels")

TEXT_ENTITIES = ENTITIES + ["b\u00f6se", "\u0431\u043e\u043c\u0431\u0430", "\u4e2d\u6587", "zz##z", "ass", "tit", "xxx", "xx",
                             "caaak", "s_h_i_", "shit", "s_h_i_t", "s.o.b.", "he-she", "x b c", "bcd"]
WRITTEN = SPELLINGS + [" b.o.m.b", " b o m b", " b-o-m-b", " b_o_m_b", " booomb", " bommmbbb", " k.1.l.l", " kkkill",
                       " \u0432\u043e\u043c\u0432", " b\u0585mb", " \U0001d41b\U0001d428\U0001d426\U0001d41b", " B\u00d6SE",
                       " bo\u0308se", " \u0431\u043e\u043c\u0431\u0430", "\u4e2d\u6587", " zz####z", " asss", " tiiit",
                       " e mail", " nerve   agent", " \u00e9\u00e8\u00ea", " \U0001f4a3 bomb", " xxxx", " xxx", " caaaak",
                       " booooomb", " s.h.i.e.l.d", " s.h.i.t", " s h i t now", " b.o.m.b.s", " b o m b!", " s_h_i_ x",
                       " s.h.i.t.a", " s_h_i_", " s_h_i_t", " s_o_b", " s.o.b.", " s.h.i", " s__h_.i", " s_o b",
                       " he_she", " he-_she", " he_-she", " x b c", " x b.c.d", " x b.c"]
# states with a spelled-out match pending, a tripled letter, a run of four
PENDING = ["the b.o.m.b", "the b.o.m.b.", "a s.h.i.t.a", "a s h i", "x xxx", "a boooo", "a caaa", "a s_h_i",
           "a s_h_i_", "a s.o.b"]


@functools.lru_cache(maxsize=None)
def text_matchers(which: str, word_boundaries: bool = True):
    tok = tiny_tokenizer() if which == "tiny" else micro_tokenizer()
    dm = DeviceMatcher.build(tok, TEXT_ENTITIES, word_boundaries=word_boundaries)
    return tok, dm, dm.with_backend("torch")


def assert_same_step(native, ref, state, token_ids, cand_ids):
    assert native.backend == "cpp" and ref.backend == "torch"
    s_n, s_r = native.advance(state, token_ids), ref.advance(state, token_ids)
    assert s_n.dtype == torch.int64 and torch.equal(s_n, s_r)
    w_n, w_r = native.banned_bitmask(s_n), ref.banned_bitmask(s_r)
    assert w_n.dtype == torch.int32 and torch.equal(w_n, w_r)
    (ok_n, e_n), (ok_r, e_r) = native.check_candidates(s_n, cand_ids), ref.check_candidates(s_r, cand_ids)
    assert ok_n.dtype == torch.bool and e_n.dtype == torch.int32
    assert torch.equal(ok_n, ok_r) and torch.equal(e_n, e_r)
    return ok_n


@pytest.mark.parametrize("seed", range(4))
def test_token_rules_equal_the_reference(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    V = [7, 33, 100, 1000][seed]
    n = [1, 5, 40, 400][seed]
    bad = [[rng.randrange(V) for _ in range(rng.choice([1, 2, 2, 3, 4, 6]))] for _ in range(n)]
    # a node with many bans (a "heavy" row) and a long failure chain
    bad += [[1, t] for t in range(0, V, 2)] + [[2] * d for d in range(2, 6)]
    dm = DeviceMatcher.build(None, token_id_phrases=bad, vocab_size=V)
    ref = dm.with_backend("torch")
    for B in (1, 3, 70):
        T = rng.randint(1, 9)
        hist = torch.randint(0, V, (B, T), generator=g)
        for b in range(B // 2):
            p = rng.choice(bad)[:-1][-T:]
            if p:
                hist[b, T - len(p):] = torch.tensor(p)
        st = dm.state_from_histories(hist)
        assert torch.equal(st, ref.state_from_histories(hist))
        toks = torch.randint(-2, V + 2, (B,), generator=g)
        cands = torch.randint(-1, V + 1, (B, rng.choice([1, 10])), generator=g)
        assert_same_step(dm, ref, st, toks, cands)


@pytest.mark.parametrize("which,word_boundaries", [("tiny", True), ("tiny", False), ("micro", True)])
def test_text_rules_equal_the_reference(which, word_boundaries):
    """Separators, stretched letters, look-alikes, CJK; 'micro' splits most characters into byte tokens."""
    tok, dm, ref = text_matchers(which, word_boundaries)
    rng = random.Random(f"{which}{word_boundaries}")
    V = len(tok)
    hists, cands = [], []
    for _ in range(80):
        text = rng.choice(["I will", "the quick", "a", "Now", ""]) + rng.choice(WRITTEN) + rng.choice(["", " x", "b"])
        ids = _random_split_ids(tok, text, rng)
        cut = rng.randint(0, len(ids) - 1)
        hists.append(ids[:cut])
        cands.append([ids[cut]] + [rng.randrange(V) for _ in range(8)] + [rng.choice([-1, V, V + 7])])
    st = dm.state_from_histories(hists)
    assert torch.equal(st, ref.state_from_histories(hists))
    assert (st[:, 4] > 0).any() or which == "tiny"              # some rows wait for the rest of a character
    toks = torch.tensor([c[0] for c in cands])
    ok = assert_same_step(dm, ref, st, toks, torch.tensor(cands))
    ok0, _ = dm.check_candidates(st, torch.tensor(cands))
    assert (~ok0[:, 0]).sum() >= 5                               # the rules do fire on these rows


def test_every_token_from_partial_states_equals_the_reference():
    """Each of a few states (mid-character, after a stretched letter, after a separator) x every token id."""
    tok, dm, ref = text_matchers("micro")
    texts = ["I will b", "a bo", "x b\u00f6", "a boo", "the b.o.", "\u4e2d", "a \u0432\u043e"] + PENDING
    hists = []
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False)
        hists += [ids, ids[:-1]]
    st = dm.state_from_histories(hists)
    pend = st[:, 6]
    assert ((pend >= 0) & (pend % 2 == 0)).any() and ((pend >= 0) & (pend % 2 == 1)).any()   # both levels pending
    V = len(tok)
    cand = torch.arange(-1, V + 1).repeat(len(hists), 1)
    assert_same_step(dm, ref, st, cand[:, 5], cand)


def test_no_text_rules_and_extra_state_columns():
    dm = DeviceMatcher.build(None, token_id_phrases=[[3], [1, 2]], vocab_size=40)
    ref = dm.with_backend("torch")
    st = dm.state_from_histories([[1], [0, 1], [5]])
    assert_same_step(dm, ref, st, torch.tensor([2, 1, 39]), torch.tensor([[0, 3, 39], [-1, 40, 2], [1, 1, 1]]))
    # columns past the matcher's own are copied through by the native advance
    from fastsafe.safety.device_matcher_ops import advance_op
    wide = torch.cat([st, torch.tensor([[7], [8], [9]])], dim=1).contiguous()
    out = advance_op(wide, torch.tensor([2, 1, 3]), dm._native_tables, dm._native_meta)
    assert out[:, -1].tolist() == [7, 8, 9] and torch.equal(out[:, :STATE_WIDTH], dm.advance(st, torch.tensor([2, 1, 3])))


def test_fullgraph_compile_calls_the_native_ops():
    tok, dm, ref = text_matchers("micro")

    def step(m, state, token_ids, cand_ids):
        s = m.advance(state, token_ids)
        ok, ent = m.check_candidates(s, cand_ids)
        return s, m.banned_bitmask(s), ok, ent

    st = dm.state_from_histories([tok.encode("I will build a", add_special_tokens=False), [5, 6], []])
    t = torch.tensor(tok.encode(" b", add_special_tokens=False)[-1:] * 3)
    cand = torch.randint(0, len(tok), (3, 4), generator=torch.Generator().manual_seed(0))
    cand[:, 0] = tok.encode("omb", add_special_tokens=False)[0]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: step(dm, *a), fullgraph=True, backend=backend)
    for a, b in zip(compiled(st, t, cand), step(ref, st, t, cand)):
        assert torch.equal(a, b)
    code = graphs[0].code
    assert "device_matcher_advance" in code and "device_matcher_check_candidates" in code
    assert "device_matcher_banned_bitmask" in code


def test_opcheck_of_the_native_ops():
    tok, dm, _ = text_matchers("micro")
    st = dm.state_from_histories([tok.encode("a bo", add_special_tokens=False), [1]])
    tabs, meta = dm._native_tables, dm._native_meta
    assert len(tabs) == len(NATIVE_TABLES) and len(meta) == len(NATIVE_META)
    ops = torch.ops.fastsafe
    for op, args in [(ops.device_matcher_advance.default, (st, torch.tensor([3, 4]), tabs, meta)),
                     (ops.device_matcher_banned_bitmask.default, (st, tabs, meta)),
                     (ops.device_matcher_check_candidates.default, (st, torch.tensor([[3, 4], [5, -1]]), tabs, meta))]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_bad_input_is_refused_before_the_kernel():
    tok, dm, _ = text_matchers("tiny")
    st = dm.initial_state(2)
    with pytest.raises(ValueError, match="token_ids: expected an int64"):
        dm.advance(st, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="cand_ids: expected 2 rows"):
        dm.check_candidates(st, torch.tensor([[1]]))
    with pytest.raises(ValueError, match=r"state: expected an int64 tensor \[B, 7\]"):
        dm.banned_bitmask(st.int())
    bad = st.clone()
    bad[1, 0] = dm.num_token_states            # not a state of this matcher
    with pytest.raises(ValueError, match=r"state: row 1 column 0 \(token state\)"):
        dm.advance(bad, torch.tensor([1, 2]))
    bad = st.clone()
    bad[0, 4] = 9
    with pytest.raises(ValueError, match=r"state: row 0 column 4 \(missing bytes\)"):
        dm.check_candidates(bad, torch.tensor([[1], [2]]))
    # ids outside [0, V) are input the kernels handle: no text, candidate not allowed, token state reset
    V = dm.vocab_size
    ok, ent = dm.check_candidates(st, torch.tensor([[-1, V, 2 ** 40], [1, 2, 3]]))
    assert ok[0].tolist() == [False, False, False] and ent[0].tolist() == [-1, -1, -1]
    assert dm.advance(st, torch.tensor([-5, V]))[:, 0].tolist() == [0, 0]
    # the kernels check their tables when called directly
    from fastsafe.safety.device_matcher_ops import banned_bitmask_op
    with pytest.raises(ValueError, match="tables: expected 29 tensors"):
        banned_bitmask_op(st, dm._native_tables[:-1], dm._native_meta)
    tabs = list(dm._native_tables)
    tabs[2] = tabs[2].long()
    with pytest.raises(TypeError, match="tables: chain_next expected dtype Int"):
        banned_bitmask_op(st, tabs, dm._native_meta)
    with pytest.raises(ValueError, match="device_matcher has no .triton. backend"):
        dm.with_backend("triton")


def test_backend_override_and_fallback(monkeypatch):
    monkeypatch.setenv("FASTSAFE_BACKEND", "device_matcher:torch")
    dm = DeviceMatcher.build(None, token_id_phrases=[[1, 2]], vocab_size=8)
    assert dm.backend == "torch"
    assert dm.with_backend("cpp").backend == "cpp"
    monkeypatch.delenv("FASTSAFE_BACKEND")
    assert DeviceMatcher.build(None, token_id_phrases=[[1, 2]], vocab_size=8).backend == "cpp"
    # without the extension the tensor program runs (same results)
    import fastsafe.ops.dispatch as dispatch

    def missing():
        raise ImportError("fastsafe._C: not built")
    monkeypatch.setattr(dispatch, "native_module", missing)
    backends(refresh=True)
    try:
        dm = DeviceMatcher.build(None, token_id_phrases=[[1, 2]], vocab_size=8)
        assert dm.backend == "torch"
        st = dm.advance(dm.initial_state(1), torch.tensor([1]))
        assert (~unpack_bitmask(dm.banned_bitmask(st), 8)).nonzero()[:, 1].tolist() == [2]
    finally:
        monkeypatch.undo()
        backends(refresh=True)


# --------------------------------------------------------------------------- CUDA kernels under the CPU emulation
@pytest.fixture(scope="module")
def emulated_cuda_step(tmp_path_factory):
    """Builds csrc/emulation/run_device_matcher.cpp; returns run(dm, state, tokens, cands) -> (state, words, ok, ent)."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    import numpy as np
    root = Path(__file__).resolve().parents[1]
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    work = tmp_path_factory.mktemp("matcher_emulation")
    exe = work / "run_device_matcher"
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-DFASTSAFE_CUDA_EMULATION", f"-I{root / 'csrc' / 'emulation' / 'include'}",
           f"-I{root / 'csrc'}", str(root / "csrc" / "emulation" / "run_device_matcher.cpp"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, "building the CUDA emulation failed:\n" + res.stderr[-4000:]

    def run(dm, state, tokens, cands):
        B, width = state.shape
        k = cands.shape[1]
        case, out = work / "case", work / "out"
        with open(case, "wb") as f:
            f.write(np.array([B, width, k, *dm._native_meta], np.int64).tobytes())
            for x in dm._native_tables:
                f.write(np.array([x.numel(), x.shape[1] if x.dim() == 2 else 0], np.int64).tobytes())
                f.write(x.contiguous().numpy().tobytes())
            for x in (state, tokens, cands):
                f.write(x.to(torch.int64).contiguous().numpy().tobytes())
        res = subprocess.run([str(exe), str(case), str(out)], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        data = out.read_bytes()
        W = (dm.vocab_size + 31) // 32
        o = 0
        s = np.frombuffer(data, np.int64, B * width, o)
        o += 8 * B * width
        w = np.frombuffer(data, np.int32, B * W, o)
        o += 4 * B * W
        ok = np.frombuffer(data, np.uint8, B * k, o)
        o += B * k
        ent = np.frombuffer(data, np.int32, B * k, o)
        return (torch.from_numpy(s.copy()).reshape(B, width), torch.from_numpy(w.copy()).reshape(B, W),
                torch.from_numpy(ok.copy()).reshape(B, k).bool(), torch.from_numpy(ent.copy()).reshape(B, k))

    return run


def _native_step(dm, state, tokens, cands):
    s = dm.advance(state, tokens)
    ok, ent = dm.check_candidates(s, cands)
    return s, dm.banned_bitmask(s), ok, ent


def test_emulated_cuda_kernels_equal_the_cpu_kernels(emulated_cuda_step):
    tok, dm, _ = text_matchers("micro")
    rng = random.Random(7)
    hists = [_random_split_ids(tok, rng.choice(["a", "I will"]) + rng.choice(WRITTEN), rng) for _ in range(5)]
    hists = [h[:rng.randint(0, len(h) - 1)] for h in hists] + [[]]
    hists += [tok.encode(t, add_special_tokens=False) for t in PENDING]
    st = dm.state_from_histories(hists)
    assert (st[:, 6] >= 0).any()                                  # some rows have a spelled match pending
    V = len(tok)
    toks = torch.tensor([rng.randrange(-1, V + 1) for _ in hists])
    cands = torch.tensor([[rng.randrange(-1, V + 1) for _ in range(6)] for _ in hists])
    for a, b in zip(emulated_cuda_step(dm, st, toks, cands), _native_step(dm, st, toks, cands)):
        assert torch.equal(a, b)
    # token rules with a heavy row (more than 32 ban words at one node) and a long ban chain
    V = 5000
    bad = [[1, t] for t in range(0, V, 3)] + [[2] * d for d in range(2, 7)] + [[9, 8, t] for t in range(40)]
    dm = DeviceMatcher.build(None, token_id_phrases=bad, vocab_size=V)
    st = dm.state_from_histories([[1], [2, 2, 2, 2], [9, 8], [9], [], [2]])
    toks = torch.tensor([1, 2, 8, 9, 4999, 5000])
    cands = torch.tensor([[0, 3]] * 6)
    for a, b in zip(emulated_cuda_step(dm, st, toks, cands), _native_step(dm, st, toks, cands)):
        assert torch.equal(a, b)
    # states that are not the matcher's are clamped there (the CPU kernels refuse them)
    wild = st.clone()
    wild[:, 0] = torch.tensor([-5, 10 ** 9, 0, 1, 2, 3])
    wild[:, 4] = 77
    s, w, ok, ent = emulated_cuda_step(dm, wild, toks, cands)
    assert s.shape == st.shape and (s[:, 0] >= 0).all() and (s[:, 0] < dm.num_token_states).all()


def test_with_device_regexes_equals_the_reference():
    """Regular regexes add state columns run by a tensor program next to the native ops: same results."""
    tok = tiny_tokenizer()
    dm = DeviceMatcher.build(tok, ["bomb", "nerve agent"], regexes=[r"\d{3}-\d{4}", r"(?i)kill\s+it"])
    ref = dm.with_backend("torch")
    assert dm.state_width > STATE_WIDTH and dm.backend == "cpp"
    rng = random.Random(11)
    texts = ["Call 555-123", "call me at 555-1234 now", "I will kill  it", "a bomb", "the nerve agent", "x 12-34"]
    hists, cands = [], []
    for _ in range(40):
        ids = _random_split_ids(tok, rng.choice(texts), rng)
        cut = rng.randint(0, len(ids) - 1)
        hists.append(ids[:cut])
        cands.append([ids[cut]] + [rng.randrange(len(tok)) for _ in range(4)])
    for text in ["call me at 555-1234", "I will kill it", "a bomb", "the nerve agent"]:   # the last token completes
        ids = tok.encode(text, add_special_tokens=False)
        hists.append(ids[:-1])
        cands.append([ids[-1]] + [rng.randrange(len(tok)) for _ in range(4)])
    st = dm.state_from_histories(hists)
    assert torch.equal(st, ref.state_from_histories(hists))
    toks = torch.tensor([c[0] for c in cands])
    s_n, s_r = dm.advance(st, toks), ref.advance(st, toks)
    assert torch.equal(s_n, s_r) and torch.equal(dm.banned_bitmask(s_n), ref.banned_bitmask(s_r))
    (ok_n, e_n), (ok_r, e_r) = dm.check_candidates(st, torch.tensor(cands)), ref.check_candidates(st, torch.tensor(cands))
    assert torch.equal(ok_n, ok_r) and torch.equal(e_n, e_r)
    assert (~ok_n[-4:, 0]).sum() >= 3 and not ok_n[-4, 0]      # the number regex, bomb, nerve agent

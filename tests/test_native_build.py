"""The native extension fastsafe._C: build layout, native-only properties, edge shapes.

The shared backend grid lives in test_safe_topk_backends.py; here: bitwise agreement with the
torch reference on the CPU (scores are computed in the same float32 order), independence from
the thread count, large k, vocabulary sizes around the kernel's block length, the binding's own
argument checks, and the fallback when the extension is missing. The CUDA kernels run on a GPU
when there is one, and always under a CPU emulation of the few CUDA features they use
(csrc/emulation/), which checks their indexing, synchronisation and selection logic.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastsafe.ops import SafeTopK, pack_bitmask, safe_topk
from fastsafe.ops.validate import validate_safe_topk
from tests.conftest import require_backend
from tests.topk_cases import DTYPES, OPTIONS, make_inputs
from tests.topk_checks import assert_matches_reference

ROOT = Path(__file__).resolve().parents[1]


def _native():
    require_backend("cpp")
    import fastsafe._C as C
    return C


def _assert_bitwise_reference(out, logits, k, **kw):
    """Values and ids equal the reference exactly; logsumexp within the shared tolerance."""
    ref = safe_topk(logits, k, backend="torch", **kw)
    assert torch.equal(out.indices, ref.indices), f"ids differ:\n{out.indices}\nvs\n{ref.indices}"
    same = (out.values == ref.values) | (torch.isnan(out.values) & torch.isnan(ref.values))
    assert same.all(), f"values differ:\n{out.values}\nvs\n{ref.values}"
    assert_matches_reference(out, logits, k, exact_ids=True, **kw)


def test_extension_layout():
    """fastsafe._C exports the CPU op; the Triton kernels map to the top-level kernels/ folder."""
    C = _native()
    assert callable(C.safe_topk_cpu)
    assert C.cpu_block % 32 == 0
    assert hasattr(C, "safe_topk_cuda") == bool(C.with_cuda)
    import fastsafe.kernels
    assert Path(fastsafe.kernels.__file__).resolve().parent == ROOT / "kernels"


def test_cuda_sources_need_no_torch_headers():
    """Design rule: .cu files take raw pointers so plain nvcc can compile-check them."""
    sources = sorted((ROOT / "csrc").glob("*.cu")) + sorted((ROOT / "csrc").glob("*_cuda.h"))
    assert sources, "no CUDA sources found in csrc/"
    for path in sources:
        text = path.read_text()
        for banned in ("<torch/", "<ATen/", "<c10/", "<pybind11/"):
            assert banned not in text, f"{path.name} includes {banned}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.7])
def test_bitwise_equal_to_reference(dtype, temperature):
    _native()
    logits, kw = make_inputs(3, 9001, dtype, OPTIONS, seed=3)
    kw["temperature"] = temperature
    out = safe_topk(logits, 20, backend="cpp", **kw)
    _assert_bitwise_reference(out, logits, 20, **kw)


@pytest.mark.parametrize("B", [1, 5])
def test_thread_count_does_not_change_results(B):
    _native()
    logits, kw = make_inputs(B, 50257, torch.float32, OPTIONS, seed=1)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(safe_topk(logits, 40, backend="cpp", **kw))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        assert torch.equal(outs[0].values, other.values)
        assert torch.equal(outs[0].indices, other.indices)
        assert torch.equal(outs[0].logsumexp, other.logsumexp)  # bitwise: fixed blocks, fixed merge order
    assert_matches_reference(outs[0], logits, 40, **kw)


def test_instruction_sets_agree(monkeypatch):
    """The AVX-512, AVX2 and baseline vector loops give bitwise identical results."""
    C = _native()
    logits, kw = make_inputs(3, 10007, torch.float16, OPTIONS, seed=6)
    outs = {}
    for isa in ("baseline", "avx2", "avx512f"):
        monkeypatch.setenv("FASTSAFE_CPU_ISA", isa)
        outs[C.cpu_isa()] = safe_topk(logits, 33, backend="cpp", **kw)
    assert "baseline" in outs
    ref = outs.pop("baseline")
    for other in outs.values():
        assert torch.equal(ref.values, other.values) and torch.equal(ref.indices, other.indices)
        assert torch.equal(ref.logsumexp, other.logsumexp)
    assert_matches_reference(ref, logits, 33, **kw)


@pytest.mark.parametrize("k", [1000, 4096, 151936])
def test_large_k(k):
    _native()
    logits, kw = make_inputs(2, 151936, torch.bfloat16, ("mask", "bias"), seed=2, ban_fraction=0.3)
    out = safe_topk(logits, k, backend="cpp", **kw)
    _assert_bitwise_reference(out, logits, k, **kw)


@pytest.mark.parametrize("offset", [-33, -1, 1, 31, 33])
def test_vocab_around_block_length(offset):
    C = _native()
    V = 2 * C.cpu_block + offset
    logits, kw = make_inputs(3, V, torch.float16, ("mask", "reward"), seed=4, ban_fraction=0.2)
    logits[0, V - 1] = 50.0                   # the winner sits in the last (partial) block
    logits[1, C.cpu_block] = 50.0             # first token of the second block
    logits[2, C.cpu_block - 1] = 50.0         # last token of the first block
    kw["banned_bitmask"] = pack_bitmask(torch.ones(3, V, dtype=torch.bool))
    out = safe_topk(logits, 7, backend="cpp", **kw)
    assert out.indices[:, 0].tolist() == [V - 1, C.cpu_block, C.cpu_block - 1]
    _assert_bitwise_reference(out, logits, 7, **kw)


def test_ties_across_blocks_and_sparse_allowed():
    """Equal scores in many blocks: lowest ids win; allowed tokens only in the last block."""
    C = _native()
    V = 5 * C.cpu_block + 17
    logits = torch.zeros(2, V)
    logits[0, ::997] = 1.0                    # ties spread over every block
    allowed = torch.zeros(2, V, dtype=torch.bool)
    allowed[0] = True
    allowed[1, V - 3:] = True                 # 3 allowed tokens, all in the last block
    mask = pack_bitmask(allowed)
    out = safe_topk(logits, 6, banned_bitmask=mask, backend="cpp")
    assert out.indices[0].tolist() == [0, 997, 2 * 997, 3 * 997, 4 * 997, 5 * 997]
    assert out.indices[1].tolist() == [V - 3, V - 2, V - 1, 0, 1, 2]
    assert torch.isneginf(out.values[1, 3:]).all()
    _assert_bitwise_reference(out, logits, 6, banned_bitmask=mask)


def test_infinities_and_expanded_rows():
    _native()
    V = 3000
    logits = torch.randn(4, V)
    logits[0, 10] = float("inf")
    logits[1, 20] = float("-inf")
    logits[2, 5] = float("inf")
    logits[2, 6] = float("nan")
    out = safe_topk(logits, 5, backend="cpp")
    _assert_bitwise_reference(out, logits, 5)
    assert out.logsumexp[0].item() == float("inf") and torch.isnan(out.logsumexp[2])
    row = torch.randn(1, V).expand(3, V)      # row stride 0
    out = safe_topk(row, 5, backend="cpp")
    _assert_bitwise_reference(out, row, 5)


def test_binding_checks_its_arguments():
    """Called directly (bypassing fastsafe.ops), the binding still refuses what would read out of bounds."""
    C = _native()
    x = torch.randn(2, 40)
    args = dict(bias_table=None, positions=None, bias_scale=1.0, banned_bitmask=None, dense_reward=None,
                reward_weight=0.0, temperature=1.0)
    with pytest.raises(ValueError, match="k: expected 1 <= k <= V = 40, got 41"):
        C.safe_topk_cpu(x, 41, **args)
    with pytest.raises(ValueError, match="banned_bitmask: expected shape"):
        C.safe_topk_cpu(x, 3, **{**args, "banned_bitmask": torch.zeros(2, 1, dtype=torch.int32)})
    with pytest.raises(TypeError, match="banned_bitmask: expected dtype int32"):
        C.safe_topk_cpu(x, 3, **{**args, "banned_bitmask": torch.zeros(2, 2, dtype=torch.int64)})
    with pytest.raises(ValueError, match="bias_table: expected shape"):
        C.safe_topk_cpu(x, 3, **{**args, "bias_table": torch.zeros(1, 39)})
    with pytest.raises(ValueError, match="positions: required"):
        C.safe_topk_cpu(x, 3, **{**args, "bias_table": torch.zeros(2, 40)})
    with pytest.raises(TypeError, match="dense_reward: expected logits' dtype"):
        C.safe_topk_cpu(x, 3, **{**args, "dense_reward": torch.zeros(2, 40, dtype=torch.float16)})
    with pytest.raises(ValueError, match="logits: expected unit stride"):
        C.safe_topk_cpu(torch.randn(2, 80)[:, ::2], 3, **args)
    with pytest.raises(ValueError, match="temperature"):
        C.safe_topk_cpu(x, 3, **{**args, "temperature": 0.0})
    with pytest.raises(TypeError, match="logits: expected dtype"):
        C.safe_topk_cpu(x.double(), 3, **args)
    # out-of-range positions are clamped by the kernel, as the Python layer does
    table = torch.randn(3, 40)
    got = C.safe_topk_cpu(x, 3, **{**args, "bias_table": table, "positions": torch.tensor([-5, 9])})
    want = C.safe_topk_cpu(x, 3, **{**args, "bias_table": table, "positions": torch.tensor([0, 2])})
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_missing_extension_is_reported_and_torch_takes_over():
    """Without fastsafe._C the package imports, backends() says why, and CPU calls use torch."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'fastsafe._C':\n"
        "            raise ImportError('simulated: extension not built')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, fastsafe.ops as ops\n"
        "info = ops.backends()['cpp']\n"
        "assert not info.available and 'simulated: extension not built' in info.reason, info\n"
        "assert ops.backend_for(torch.zeros(1, 4)) == 'torch'\n"
        "out = ops.safe_topk(torch.tensor([[1.0, 3.0, 2.0]]), 2)\n"
        "assert out.indices.tolist() == [[1, 2]]\n"
        "print('fallback ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FASTSAFE_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "fallback ok" in res.stdout, res.stdout + res.stderr


# ---- CUDA (only with a GPU and a CUDA build) ------------------------------------------------

def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    require_backend("cuda")
    import fastsafe._C as C
    return C


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,V,k", [(1, 1, 1), (3, 33, 5), (2, 50257, 50), (8, 151936, 1024), (64, 32000, 7)])
def test_cuda_matches_reference(dtype, B, V, k):
    _cuda()
    for opts in ((), OPTIONS):
        logits, kw = make_inputs(B, V, dtype, opts, device="cuda")
        out = safe_topk(logits, k, backend="cuda", **kw)
        assert_matches_reference(out, logits, k, **kw)


@pytest.mark.gpu
def test_cuda_ties_nan_and_banned_rows():
    _cuda()
    V = 20000
    logits = torch.zeros(3, V, device="cuda")
    logits[0, ::3001] = 1.0
    logits[1, 7] = float("nan")
    allowed = torch.ones(3, V, dtype=torch.bool, device="cuda")
    allowed[2] = False
    allowed[2, V - 2] = True
    mask = pack_bitmask(allowed)
    out = safe_topk(logits, 9, banned_bitmask=mask, backend="cuda")
    assert_matches_reference(out, logits, 9, exact_ids=True, banned_bitmask=mask)
    assert torch.isnan(out.logsumexp[1]).item()


@pytest.mark.gpu
def test_cuda_rejects_k_above_limit():
    C = _cuda()
    with pytest.raises(ValueError, match="k: the cuda backend supports"):
        safe_topk(torch.randn(1, 5000, device="cuda"), C.cuda_max_k + 1, backend="cuda")


# ---- CUDA kernels under the CPU emulation (no GPU needed) ------------------------------------

_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def emulated_cuda(tmp_path_factory):
    """Builds csrc/emulation/run_safe_topk.cpp; returns run(logits, k, num_sms, **kw) -> SafeTopK."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the CUDA emulation")
    work = tmp_path_factory.mktemp("cuda_emulation")
    exe = work / "run_safe_topk"
    cmd = [cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-pthread", "-DFASTSAFE_CUDA_EMULATION",
           f"-I{ROOT / 'csrc' / 'emulation' / 'include'}", f"-I{ROOT / 'csrc'}",
           str(ROOT / "csrc" / "emulation" / "run_safe_topk.cpp"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, "building the CUDA emulation failed:\n" + res.stderr[-4000:]
    counter = iter(range(10**6))

    def raw(t: torch.Tensor) -> bytes:
        return t.contiguous().view(torch.uint8).numpy().tobytes()

    def run(logits, k, num_sms=8, **kw):
        inp = validate_safe_topk(logits, k, **kw)
        x, mask = inp.logits, inp.banned_bitmask
        B, V = x.shape
        stride = x.stride(0) if B > 1 else V
        n = (B - 1) * stride + V
        header = [B, V, inp.k, _KIND[x.dtype], inp.bias_table is not None,
                  0 if inp.bias_table is None else inp.bias_table.shape[0], inp.positions is not None,
                  mask is not None, 0 if mask is None else (1 if mask.dim() == 1 else B),
                  inp.dense_reward is not None, num_sms, stride]
        case, out = work / f"case{next(counter)}", work / "out"
        with open(case, "wb") as f:
            f.write(np.array(header, dtype=np.int64).tobytes())
            f.write(np.array([inp.bias_scale, inp.reward_weight, inp.temperature, 0.0], dtype=np.float32).tobytes())
            f.write(raw(torch.as_strided(x, (n,), (1,), x.storage_offset())))
            for t in (inp.bias_table, inp.positions, mask, inp.dense_reward):
                if t is not None:
                    f.write(raw(t))
        res = subprocess.run([str(exe), str(case), str(out)], capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        data = out.read_bytes()
        kk = inp.k
        vals = torch.from_numpy(np.frombuffer(data, np.float32, B * kk).copy()).reshape(B, kk)
        idx = torch.from_numpy(np.frombuffer(data, np.int64, B * kk, offset=4 * B * kk).copy()).reshape(B, kk)
        lse = torch.from_numpy(np.frombuffer(data, np.float32, B, offset=12 * B * kk).copy())
        return SafeTopK(vals, idx, lse, torch.isneginf(lse))

    return run


@pytest.mark.parametrize("B,V,k,dtype,opts,num_sms", [
    (1, 1, 1, torch.float32, (), 8),
    (3, 33, 5, torch.float16, OPTIONS, 8),
    (2, 5000, 1000, torch.bfloat16, OPTIONS, 8),      # k > slice: padded candidates, 1024-wide sort
    (1, 20000, 7, torch.float32, OPTIONS, 8),         # 16 splits of one row
    (2, 20000, 50, torch.float16, ("mask",), 1),      # few SMs: maximal 8192-token slices
], ids=["V1", "V33-f16", "k1000-bf16", "splits16", "slice8192"])
def test_emulated_cuda_matches_reference(emulated_cuda, B, V, k, dtype, opts, num_sms):
    logits, kw = make_inputs(B, V, dtype, opts, seed=5)
    out = emulated_cuda(logits, k, num_sms, **kw)
    assert_matches_reference(out, logits, k, **kw)


def test_emulated_cuda_edge_rows(emulated_cuda):
    V = 3000
    logits = torch.zeros(3, V)
    logits[0, ::301] = 1.0                                  # ties across splits
    logits[1, 7] = float("nan")
    logits[1, 8] = float("inf")
    allowed = torch.ones(3, V, dtype=torch.bool)
    allowed[2] = False
    allowed[2, V - 2] = True                                # one allowed token, k larger
    mask = pack_bitmask(allowed)
    out = emulated_cuda(logits, 12, banned_bitmask=mask)
    assert_matches_reference(out, logits, 12, exact_ids=True, banned_bitmask=mask)
    assert out.indices[0].tolist()[:11] == [0, 301, 602, 903, 1204, 1505, 1806, 2107, 2408, 2709, 1]
    assert out.indices[2].tolist()[:3] == [V - 2, 0, 1]
    ties = torch.randint(0, 3, (2, 2600), generator=torch.Generator().manual_seed(0)).float()
    assert_matches_reference(emulated_cuda(ties, 40), ties, 40, exact_ids=True)
    wide = torch.randn(2, 3001).half()[:, :2999]            # odd row stride: unaligned 16-byte loads
    assert_matches_reference(emulated_cuda(wide, 9), wide, 9)
    none = pack_bitmask(torch.zeros(2999, dtype=torch.bool))
    out = emulated_cuda(wide, 9, banned_bitmask=none)
    assert_matches_reference(out, wide, 9, exact_ids=True, banned_bitmask=none)
    signed_zero = torch.zeros(1, 64)
    signed_zero[0, ::2] = -0.0
    assert_matches_reference(emulated_cuda(signed_zero, 5), signed_zero, 5, exact_ids=True)


def test_logsumexp_accuracy_against_float64():
    """The vector exp (table + polynomial) and the block sums stay near float32 rounding of the
    exact logsumexp, much tighter than the shared 1e-5 tolerance, over narrow and wide spreads
    (terms down to far below e^-87 of the max) and a large offset."""
    _native()
    g = torch.Generator().manual_seed(3)
    for V in (20011, 151936):
        logits = torch.randn(6, V, generator=g) * torch.tensor([0.01, 0.3, 1.0, 4.0, 12.0, 40.0])[:, None]
        logits[1] += 1000.0
        out = safe_topk(logits, 10, backend="cpp")
        exact = torch.logsumexp(logits.double(), dim=1)
        err = (out.logsumexp.double() - exact).abs()
        bound = 1e-6 + 2.5e-7 * exact.abs()
        assert (err <= bound).all(), f"V={V}: logsumexp errors {err.tolist()} over {bound.tolist()}"


def test_nan_in_later_partial_and_otherwise_banned_blocks(monkeypatch):
    """A NaN makes its row's logsumexp NaN wherever it sits: a later block with finite scores,
    the partial last block, a block where every other token is banned (max -inf), next to a
    +inf; on every instruction set, bitwise the same."""
    C = _native()
    blk = C.cpu_block
    V = 3 * blk + 5
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(8))
    logits[0, blk + 7] = float("nan")
    logits[1, 2 * blk + 1] = float("nan")
    logits[2, V - 1] = float("nan")
    logits[3, 2 * blk + 3] = float("inf")
    logits[3, 5] = float("nan")
    allowed = torch.ones(5, V, dtype=torch.bool)
    allowed[1, 2 * blk:3 * blk] = False
    allowed[1, 2 * blk + 1] = True
    kw = {"banned_bitmask": pack_bitmask(allowed)}
    outs = []
    for isa in ("baseline", "avx2", "avx512f"):
        monkeypatch.setenv("FASTSAFE_CPU_ISA", isa)
        out = safe_topk(logits, 7, backend="cpp", **kw)
        _assert_bitwise_reference(out, logits, 7, **kw)
        assert torch.isnan(out.logsumexp[:4]).all() and torch.isfinite(out.logsumexp[4])
        outs.append(out)
    for other in outs[1:]:
        assert torch.equal(outs[0].indices, other.indices) and torch.equal(outs[0].values, other.values)
        assert torch.equal(outs[0].logsumexp[4], other.logsumexp[4])

"""pytest-benchmark suite of the decode step on small CPU shapes: one benchmark per (implementation, shape).

Not part of the test run (``pytest tests``); run it explicitly, overriding the project's
``--benchmark-disable``::

    pytest benchmarks/test_bench_decode.py --benchmark-enable
    pytest benchmarks/test_bench_decode.py --benchmark-enable --benchmark-json=bench.json

Implementations: the Hugging Face chain, plain torch ops, and ``fastsafe.ops.safe_topk`` with each
available CPU backend (Triton is left out on the CPU: there it runs in the interpreter). The full
grid with ratios, the 99%-banned case and GPU bandwidth numbers is ``python -m benchmarks.decode``.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.decode import HF, TORCH_OPS, Case, check_outputs, fastsafe_call, fastsafe_impl, hf_chain, \
    make_inputs, torch_ops

SHAPES = [(1, 32000), (8, 32000), (8, 151936)]
K = 50
BANNED = 1000
FASTSAFE_BACKENDS = ("torch", "cpp")
IMPLS = [HF, TORCH_OPS] + [fastsafe_impl(b) for b in FASTSAFE_BACKENDS]

_INPUTS: dict = {}


def _inputs(batch: int, vocab: int):
    key = (batch, vocab)
    if key not in _INPUTS:
        _INPUTS[key] = make_inputs(Case(batch, vocab, K, BANNED), torch.float32, torch.device("cpu"))
    return _INPUTS[key]


def _callable(impl: str, inp):
    if impl == HF:
        return hf_chain(inp, K)
    if impl == TORCH_OPS:
        return torch_ops(inp, K)
    backend = impl[len("fastsafe["):-1]
    from fastsafe.ops import backends
    info = backends()[backend]
    if not info.available:
        pytest.skip(f"backend {backend!r} unavailable: {info.reason}")
    return fastsafe_call(inp, K, backend)


@pytest.mark.parametrize("batch,vocab", SHAPES, ids=[f"B{b}-V{v}" for b, v in SHAPES])
@pytest.mark.parametrize("impl", IMPLS)
def test_decode_step(benchmark, impl, batch, vocab):
    inp = _inputs(batch, vocab)
    fn = _callable(impl, inp)
    benchmark.group = f"decode B={batch} V={vocab} k={K} banned={BANNED}"
    benchmark.extra_info.update({"batch": batch, "vocab": vocab, "k": K, "banned": BANNED,
                                 "threads": torch.get_num_threads()})
    result = benchmark(fn)
    assert check_outputs(inp, K, {impl: result})[impl] == "ok"

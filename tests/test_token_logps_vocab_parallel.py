"""token_logps(..., process_group=pg) over a vocabulary-parallel lm_head: 2 gloo ranks on the CPU.

Each rank holds a contiguous, uneven block of the lm_head's rows. Values and gradients must equal
the unsharded op in one process: float64 to 1e-10 (torch backend); the Triton backend (under
TRITON_INTERPRET=1 on a CPU) in float32 to 2e-5 abs (values) / 1e-4 relative (gradients).
One launch (two processes, a few seconds) runs every case and the bad inputs.
"""
import pytest
import torch

from fastsafe.ops import backends
from fastsafe.training import token_logps

from .distributed_launch import launch
from .vocab_parallel_worker import CASES, make_case, run_op

TORCH_CASES = [n for n, c in CASES.items() if c[6] == "torch"]


def _cases():
    triton_ok = backends(op="token_logps")["triton"].available
    return TORCH_CASES + ([n for n, c in CASES.items() if c[6] == "triton"] if triton_ok else [])


@pytest.fixture(scope="module")
def ranks():
    return launch("tests.vocab_parallel_worker:vocab_parallel", world_size=2, timeout=180, cases=_cases())


def _check(name, ranks):
    case, opts, sizes, backend, chunk = make_case(name)
    w = case["weight"].clone().requires_grad_()
    b = None if case["bias"] is None else case["bias"].clone().requires_grad_()
    full = run_op(case, opts, w, b, case["ref_weight"], backend, chunk)
    fp64 = case["hidden"].dtype == torch.float64
    atol = 1e-10 if fp64 else 2e-5

    def close(x, y, what, rel=False):
        scale = max(y.abs().max().item(), 1e-6) if rel else 1.0
        err = (x.double() - y.double()).abs().max().item() / scale
        assert err <= (1e-10 if fp64 else (1e-4 if rel else atol)), (name, what, err)

    for r, res in enumerate(ranks):
        got = res[name]
        assert len(got["out"]) == len(full["out"])
        for i, (o, ref) in enumerate(zip(got["out"], full["out"])):
            assert o.dtype == ref.dtype and o.shape == ref.shape
            close(o, ref, f"rank {r} output {i}")
        close(got["grad_hidden"], full["grad_hidden"], f"rank {r} grad_hidden", rel=True)
    grad_w = torch.cat([res[name]["grad_weight"] for res in ranks])
    close(grad_w, full["grad_weight"], "grad_weight", rel=True)
    if b is not None:
        close(torch.cat([res[name]["grad_bias"] for res in ranks]), full["grad_bias"], "grad_bias", rel=True)


@pytest.mark.parametrize("name", TORCH_CASES)
def test_vocab_parallel_equals_unsharded_float64(name, ranks):
    _check(name, ranks)


def test_vocab_parallel_triton_equals_unsharded(ranks):
    if "fp32_triton_kl_entropy" not in ranks[0]:
        pytest.skip("triton backend unavailable for token_logps")
    _check("fp32_triton_kl_entropy", ranks)


@pytest.mark.parametrize("key, pattern", [
    ("vocab_size", r"process_group: the lm_head shards hold \[20, 17\] rows on ranks 0..1, 37 in all, "
                   r"expected vocab_size = 40"),
    ("H", r"weight: expected the same H \(the lm_head shards' second dim\) on every rank.*got \[8, 7\]"),
    ("tokens", r"targets: expected the same number of tokens.*got \[10, 8\]"),
    ("bias_on_one_rank", r"bias: expected the same presence of a bias on every rank.*got \[0, 1\]"),
    ("targets_out_of_vocab", r"targets: expected ids in \[0, V\) = \[0, 37\)"),
    ("not_a_group", r"TypeError: process_group: expected a torch.distributed.ProcessGroup"),
])
def test_bad_layouts_fail_on_every_rank(key, pattern, ranks):
    import re
    for r, res in enumerate(ranks):
        msg = res["errors"][key]
        assert msg is not None and re.search(pattern, msg), (r, key, msg)
    assert all(res["errors"]["group_alive"] == 2 for res in ranks)


def test_process_group_needs_an_initialised_group():
    h, w, t = torch.randn(2, 3, 4), torch.randn(10, 4), torch.randint(0, 10, (2, 3))
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="process_group: torch.distributed is not initialized"):
            token_logps(h, w, t, process_group=object())
    with pytest.raises(ValueError, match=r"vocab_size: expected weight's rows V = 10"):
        token_logps(h, w, t, vocab_size=12)
    with pytest.raises(ValueError, match="vocab_size: expected an int >= 1"):
        token_logps(h, w, t, vocab_size=0)
    assert torch.equal(token_logps(h, w, t, vocab_size=10), token_logps(h, w, t))

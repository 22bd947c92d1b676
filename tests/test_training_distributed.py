"""token_logps, masked DPO and masked GRPO under DDP and FSDP2 (fully_shard), 2 gloo ranks on the CPU.

One launch of two processes (tests.distributed_launch, 127.0.0.1 only, bounded time) runs every
engine and every loss of tests.distributed_training_worker.LOSSES through
fastsafe.training.run_in_forward, each rank on half of a fixed global batch. The all-reduced loss
and every parameter's full gradient must equal one process on the global batch (float64 model;
tolerance 1e-10 relative: the sums are only reordered). To cover another loss, add it to LOSSES
in the worker. DeepSpeed ZeRO-3 runs where deepspeed is installed (it is not a test
dependency): a second launch, float32, 1e-5.
"""
import pytest
import torch

from .distributed_launch import launch
from .distributed_training_worker import LOSSES, single_process

ENGINES = {"ddp": tuple(LOSSES), "fsdp2": tuple(LOSSES), "fsdp2_head": ("token_logps",)}


@pytest.fixture(scope="module")
def reference():
    return {loss: single_process(loss) for loss in LOSSES}


@pytest.fixture(scope="module")
def engines():
    (rank0, rank1) = launch("tests.distributed_training_worker:all_engines", world_size=2, timeout=240,
                            plan=ENGINES)
    return rank0, rank1


def _compare(engine, loss, got, ref_loss, ref_grads, r, rel):
    torch.testing.assert_close(got["loss"], ref_loss, rtol=rel, atol=rel * 1e-2,
                               msg=lambda m: f"{engine} {loss} rank {r} loss: {m}")
    assert set(got["grads"]) == set(ref_grads)
    for name, g in got["grads"].items():
        ref = ref_grads[name]
        assert g.shape == ref.shape, (engine, loss, name)
        assert ref.abs().max() > 0, (loss, name)     # every parameter gets a gradient
        err = (g - ref).abs().max().item() / ref.abs().max().item()
        assert err < rel, (engine, loss, r, name, err)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_ranks_equal_one_process_on_the_global_batch(engine, engines, reference):
    for loss in ENGINES[engine]:
        for r, res in enumerate(engines):
            _compare(engine, loss, res[engine][loss], *reference[loss], r, rel=1e-10)


def test_sharded_weight_outside_the_forward_is_refused(engines):
    for res in engines:
        msg = res["fsdp2"]["outside_forward"]
        assert msg is not None and msg.startswith("weight: got a DTensor") and "run_in_forward" in msg, msg


def test_zero3_placeholder_weight_is_refused():
    from fastsafe.training import token_logps
    w = torch.nn.Parameter(torch.empty(0))
    w.ds_status, w.ds_shape = "NOT_AVAILABLE", (10, 4)
    with pytest.raises(TypeError, match=r"weight: got a DeepSpeed ZeRO-3 partitioned parameter.*\[10, 4\]"):
        token_logps(torch.randn(2, 4), w, torch.zeros(2, dtype=torch.long))


def test_zero3_lm_head_forward_equals_one_process(reference):
    """DeepSpeed ZeRO-3 (CPU accelerator, gloo): the loss inside the lm_head module's forward.
    float32 model against the float64 one-process reference: 1e-5 relative."""
    pytest.importorskip("deepspeed")
    ranks = launch("tests.distributed_training_worker:zero3_step", world_size=2, timeout=240)
    for r, res in enumerate(ranks):
        _compare("zero3", "token_logps", res["lm_head"], *reference["token_logps"], r, rel=1e-5)


def test_run_in_forward_restores_forward_and_runs_hooks():
    from torch import nn

    from fastsafe.training import run_in_forward
    lin = nn.Linear(3, 4)
    seen = []
    lin.register_forward_pre_hook(lambda m, a: seen.append("pre"))
    lin.register_forward_hook(lambda m, a, out: seen.append("post"))
    out = run_in_forward(lin, lambda x: (seen.append("fn"), x * 2)[1], torch.ones(2))
    assert torch.equal(out, torch.full((2,), 2.0)) and seen == ["pre", "fn", "post"]
    assert "forward" not in lin.__dict__ and lin(torch.ones(1, 3)).shape == (1, 4)
    with pytest.raises(ZeroDivisionError):
        run_in_forward(lin, lambda: 1 / 0)
    assert "forward" not in lin.__dict__
    with pytest.raises(TypeError, match="module: expected a torch.nn.Module"):
        run_in_forward(lambda: 0, print)
    with pytest.raises(TypeError, match="fn: expected a callable"):
        run_in_forward(lin, 3)

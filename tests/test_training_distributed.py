"""token_logps and the masked DPO loss under DDP and FSDP2 (fully_shard), 2 gloo ranks on the CPU.

Each engine runs in one launch of two processes (tests.distributed_launch, 127.0.0.1 only, bounded
time) that computes every loss of tests.distributed_training_worker.LOSSES through
fastsafe.training.run_in_forward, each rank on half of a fixed global batch. The all-reduced loss
and every parameter's full gradient must equal one process on the global batch (float64 model;
tolerance 1e-10 relative: the sums are only reordered). To cover another loss (masked GRPO),
add it to LOSSES in the worker.
"""
import pytest
import torch

from .distributed_launch import launch
from .distributed_training_worker import LOSSES, single_process

ENGINES = {"ddp": tuple(LOSSES), "fsdp2": tuple(LOSSES), "fsdp2_head": ("token_logps",)}


@pytest.fixture(scope="module")
def reference():
    return {loss: single_process(loss) for loss in LOSSES}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_ranks_equal_one_process_on_the_global_batch(engine, reference):
    ranks = launch("tests.distributed_training_worker:train_step", world_size=2, timeout=180,
                   engine=engine, losses=ENGINES[engine])
    for loss in ENGINES[engine]:
        ref_loss, ref_grads = reference[loss]
        for r, res in enumerate(ranks):
            got = res[loss]
            torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"{engine} {loss} rank {r} loss: {m}")
            assert set(got["grads"]) == set(ref_grads)
            for name, g in got["grads"].items():
                ref = ref_grads[name]
                assert g.shape == ref.shape, (engine, loss, name)
                err = (g - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
                assert err < 1e-10, (engine, loss, r, name, err)
                assert ref.abs().max() > 0, (loss, name)     # every parameter gets a gradient


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

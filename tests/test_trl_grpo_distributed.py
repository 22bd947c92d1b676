"""MaskedGRPOTrainer under DDP and FSDP2 (2 gloo ranks on the CPU) equals one process.

One launch of two processes (tests.distributed_launch) runs tests.distributed_trl_worker: each
rank builds the trainer on the same tiny float64 Llama, takes half of a fixed global batch and
runs ``trainer.compute_loss`` + backward on the model as DDP (accelerate's ``prepare_model``,
``find_unused_parameters=True`` as transformers sets it without gradient checkpointing) or FSDP2
(``fully_shard`` per decoder layer and on the root) returned it. The loss averaged over ranks and
every parameter's full gradient must equal the trainer's on the global batch in one process
(float64; 1e-10 relative: only the order of the sums changes). Both fail if the fused head reads
the lm_head weight outside the wrapped forward (DDP: the weight's gradient arrives after DDP marked
it unused; FSDP2: the weight is a DTensor shard there).
"""
import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from tests.distributed_launch import launch  # noqa: E402
from tests.distributed_trl_worker import LOSS_TYPES, single_process  # noqa: E402
from tests.tiny_lm import tiny_llama, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`[a-z_]*gradient_checkpointing[a-z_]*` is deprecated:FutureWarning")
ENGINES = ("ddp", "fsdp2")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_dist")
    tiny_llama(seed=0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def ranks(model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("grpo_dist_out"))
    return launch("tests.distributed_trl_worker:run", world_size=2, timeout=240, model_dir=model_dir, out_dir=out,
                  engines=ENGINES, loss_types=LOSS_TYPES)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("grpo_ref_out"))
    return {loss_type: single_process(model_dir, out, loss_type) for loss_type in LOSS_TYPES}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("engine", ENGINES)
def test_trainer_loss_and_grads_on_two_ranks_equal_one_process(engine, loss_type, ranks, reference):
    ref = reference[loss_type]
    assert abs(ref["loss"].item()) > 1e-3
    for r, res in enumerate(ranks):
        got = res[(engine, loss_type)]
        assert got["num_processes"] == 2
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"{engine} {loss_type} rank {r} loss: {m}")
        assert set(got["grads"]) == set(ref["grads"])
        for name, g in got["grads"].items():
            want = ref["grads"][name]
            assert want.abs().max() > 0, name          # every parameter gets a gradient, lm_head included
            err = (g - want).abs().max().item() / want.abs().max().item()
            assert err < 1e-10, (engine, loss_type, r, name, err)

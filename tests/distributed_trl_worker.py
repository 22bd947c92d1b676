"""Rank side of tests/test_trl_grpo_distributed.py: MaskedGRPOTrainer's loss under DDP and FSDP2.

Each rank builds a ``MaskedGRPOTrainer`` on the same tiny float64 Llama (loaded from ``model_dir``),
takes its rows ``rank::world_size`` of a fixed global batch of generated-looking completions
(:func:`global_inputs`: left-padded prompts, right-padded completions, signed token masks,
advantages, off-policy old log-probs, reference log-probs, TRL's ``num_items_in_batch``) and runs
one ``trainer.compute_loss`` + backward on the model as the engine returned it:

- ``ddp``: ``trainer.accelerator.prepare_model`` (DistributedDataParallel with transformers'
  default ``find_unused_parameters=True``, which raises when a parameter gets its gradient
  outside the forward's output graph);
- ``fsdp2``: ``fully_shard`` on every decoder layer and on the root (lm_head and embeddings in
  the root's group), so the lm_head weight is a DTensor shard outside the root's forward.

:func:`run` returns, per engine and loss type, the loss averaged over ranks and the full gradient of
every parameter; :func:`single_process` is the same on the global batch in one process.
"""
from __future__ import annotations

import copy
import os

import torch

N, P, C = 8, 4, 5            # global completions, prompt length, completion length
LOSS_TYPES = ("grpo", "dapo")  # per-sequence means over equal halves; dapo over the global token count


def seq_reward(completions, **kw):
    return [0.0 for _ in completions]


def make_trainer(model_dir: str, out_dir: str, loss_type: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig

    from fastsafe.integrations.trl import MaskedGRPOTrainer
    from tests.tiny_lm import tiny_tokenizer
    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=4, num_generations=2, max_completion_length=C,
                      max_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True,
                      seed=1, gradient_checkpointing=False, loss_type=loss_type, beta=0.04, epsilon_high=0.28)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    trainer = MaskedGRPOTrainer(model=model, reward_funcs=[seq_reward], args=args,
                                train_dataset=Dataset.from_dict({"prompt": ["a", "b", "c", "d"]}),
                                processing_class=copy.deepcopy(tiny_tokenizer()),
                                token_reward_fn=lambda completion_ids, **kw: [[0.0] * len(i) for i in completion_ids])
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def global_inputs(trainer):
    """The global batch, the same on every rank (fixed generator; old log-probs from the model)."""
    g = torch.Generator().manual_seed(3)
    V = trainer.model.config.vocab_size
    prompt_ids = torch.randint(3, V, (N, P), generator=g)
    prompt_mask = torch.ones(N, P, dtype=torch.long)
    prompt_mask[::3, :2] = 0                       # left padding
    prompt_ids[prompt_mask == 0] = 0
    completion_ids = torch.randint(3, V, (N, C), generator=g)
    lengths = torch.randint(2, C + 1, (N,), generator=g)
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()   # right padding after EOS
    completion_ids[completion_mask == 0] = 0
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), C)
    noise = lambda: 0.3 * torch.randn(N, C, generator=g, dtype=torch.float64)  # noqa: E731
    token_mask = torch.randint(-1, 2, (N, C), generator=g).double() * completion_mask
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, advantages=torch.randn(N, generator=g, dtype=torch.float64),
                token_mask=token_mask, old_per_token_logps=(logps + noise()) * completion_mask,
                ref_per_token_logps=(logps + noise()) * completion_mask,
                num_items_in_batch=completion_mask.sum().double())


def part(inputs, rank, world_size):
    return {k: (v if v.dim() == 0 else v[rank::world_size]) for k, v in inputs.items()}


def wrap(trainer, engine: str):
    if engine == "ddp":
        return trainer.accelerator.prepare_model(trainer.model)
    if engine == "fsdp2":
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in trainer.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(trainer.model, mesh=mesh)
        return trainer.model
    raise ValueError(f"engine: expected 'ddp' or 'fsdp2', got {engine!r}")


def _grads(model):
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def single_process(model_dir: str, out_dir: str, loss_type: str):
    """Loss and gradients of the trainer on the global batch in this (one) process."""
    trainer = make_trainer(model_dir, out_dir, loss_type)
    loss = trainer.compute_loss(trainer.model, global_inputs(trainer))
    loss.backward()
    return dict(loss=loss.detach(), grads=_grads(trainer.model))


def run(rank, world_size, model_dir: str, out_dir: str, engines=("ddp", "fsdp2"), loss_types=LOSS_TYPES):
    import torch.distributed as dist
    results = {}
    for engine in engines:
        for loss_type in loss_types:
            trainer = make_trainer(model_dir, out_dir, loss_type)
            inputs = part(global_inputs(trainer), rank, world_size)
            wrapped = wrap(trainer, engine)
            loss = trainer.compute_loss(wrapped, inputs)
            trainer.accelerator.backward(loss)
            total = loss.detach().clone()
            dist.all_reduce(total)
            results[(engine, loss_type)] = dict(loss=total / world_size, grads=_grads(trainer.model),
                                                num_processes=trainer.accelerator.num_processes)
    return results

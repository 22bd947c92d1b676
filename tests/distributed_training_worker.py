"""Rank side of tests/test_training_distributed.py (run by tests.distributed_launch).

A tiny causal LM (embedding, one MLP block, an untied ``lm_head``) is trained for one step's
gradient under DDP or FSDP2 (``fully_shard``) with gloo; each rank takes its half of a fixed
global batch. Every loss is computed through ``fastsafe.training.run_in_forward`` on the wrapped
module, from hidden states and ``model.lm_head.weight`` (never the logits).

LOSSES maps a name to ``loss(wrapped, model, batch, world_size) -> 0-d tensor`` over one rank's
part of the batch (``wrapped`` is what the engine returned, ``model`` the TinyLM inside it), scaled so that the engine's gradient *average* over ranks equals the gradient of the
loss on the global batch in one process (token sums are divided by the global token count, so
uneven token counts per rank do not change the normaliser; pair means are over equal halves).
Masked GRPO is there in two normalisations (grpo, dapo with the global ``num_items``). To add a
loss: write such a function, add it to LOSSES (and to ``make_batch``'s fields if it needs new
ones); the test picks it up.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fastsafe.training import FusedLinearMaskedDPOLoss, FusedLinearMaskedGRPOLoss, run_in_forward, token_logps

V, H, T = 48, 12, 7
GLOBAL_SEQS = 8           # token_logps: 8 sequences; masked DPO: 4 pairs (8 rows)


class TinyLM(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(V, H)
        self.block = nn.Sequential(nn.Linear(H, 2 * H), nn.Tanh(), nn.Linear(2 * H, H))
        self.lm_head = nn.Linear(H, V, bias=False)

    def hidden(self, ids):
        x = self.embed(ids)
        return x + self.block(x)

    def forward(self, ids):   # the logits path; the fused losses never call it
        return self.lm_head(self.hidden(ids))


def make_batch(seed: int = 1):
    """The global batch (the same on every rank); rank r takes rows r::world_size via ``part``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (GLOBAL_SEQS, T + 1), generator=g)
    weights = torch.randint(-1, 2, (GLOBAL_SEQS, T), generator=g).double()   # signed token masks
    weights[torch.rand(GLOBAL_SEQS, T, generator=g) < 0.2] = 0
    ref_logps = -torch.rand(GLOBAL_SEQS, T, generator=g, dtype=torch.float64) * 4
    advantages = torch.randn(GLOBAL_SEQS, generator=g, dtype=torch.float64)
    targets = ids[:, 1:].clone()
    targets[weights == 0] = -100
    return dict(ids=ids[:, :-1], targets=targets, weights=weights, ref_logps=ref_logps, advantages=advantages,
                num_tokens=int((weights != 0).sum()))


def part(batch, rank, world_size):
    """Rank ``rank``'s rows. DPO batches are [chosen; rejected]: each rank takes whole pairs."""
    n = GLOBAL_SEQS // 2
    pairs = torch.arange(n)[rank::world_size]
    rows = torch.cat([pairs, pairs + n])
    out = {k: (v[rows] if torch.is_tensor(v) else v) for k, v in batch.items()}
    return out


def loss_token_logps(wrapped, model, batch, world_size):
    def fn(ids, targets, weights):
        lp = token_logps(model.hidden(ids), model.lm_head.weight, targets, active=weights)
        return (lp * weights).sum() * (world_size / batch["num_tokens"])
    return run_in_forward(wrapped, fn, batch["ids"], batch["targets"], batch["weights"])


def loss_masked_dpo(wrapped, model, batch, world_size):
    loss_fn = FusedLinearMaskedDPOLoss(beta=0.5)

    def fn(ids, targets, weights, ref_logps):
        loss, _ = loss_fn(model.hidden(ids), model.lm_head.weight, targets, weights, ref_logps=ref_logps)
        return loss
    return run_in_forward(wrapped, fn, batch["ids"], batch["targets"], batch["weights"], batch["ref_logps"])


def loss_masked_grpo(wrapped, model, batch, world_size, loss_type="grpo"):
    """Masked GRPO (signed token mask), on-policy, with a KL term to fixed reference log-probs.
    ``grpo``: per-sequence means (equal sequences per rank); ``dapo``: the token sum over the
    global completion-token count (``num_items``), scaled by the world size like the token sums."""
    loss_fn = FusedLinearMaskedGRPOLoss(loss_type=loss_type, beta=0.04)

    def fn(ids, targets, weights, advantages, ref_logps):
        kw = dict(num_items=batch["num_tokens"]) if loss_type == "dapo" else {}
        loss, _ = loss_fn(model.hidden(ids), model.lm_head.weight, targets, advantages, weights,
                          ref_logps=ref_logps, **kw)
        return loss * (world_size if loss_type == "dapo" else 1)
    return run_in_forward(wrapped, fn, batch["ids"], batch["targets"], batch["weights"], batch["advantages"],
                          batch["ref_logps"])


def loss_masked_grpo_dapo(wrapped, model, batch, world_size):
    return loss_masked_grpo(wrapped, model, batch, world_size, loss_type="dapo")


LOSSES = {"token_logps": loss_token_logps, "masked_dpo": loss_masked_dpo, "masked_grpo": loss_masked_grpo,
          "masked_grpo_dapo": loss_masked_grpo_dapo}


def single_process(loss: str):
    """Loss and gradients on the global batch in one process (world_size 1): the reference."""
    model = TinyLM().double()
    value = LOSSES[loss](model, model, make_batch(), 1)
    value.backward()
    return value.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def wrap(model, engine: str):
    if engine == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        fully_shard(model.block, mesh=mesh)
        fully_shard(model, mesh=mesh)     # embed and lm_head in the root's group
        return model
    if engine == "fsdp2_head":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        fully_shard(model.lm_head, mesh=mesh)   # lm_head sharded on its own: redirect its forward
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(engine)


def loss_lm_head_only(wrapped, model, batch, world_size):
    """The loss run inside the separately sharded lm_head's forward (fsdp2_head)."""
    def fn(hidden, targets, weights):
        lp = token_logps(hidden, model.lm_head.weight, targets, active=weights)
        return (lp * weights).sum() * (world_size / batch["num_tokens"])

    def outer(ids, targets, weights):
        return run_in_forward(model.lm_head, fn, model.hidden(ids), targets, weights)
    return run_in_forward(wrapped, outer, batch["ids"], batch["targets"], batch["weights"])


def train_step(rank, world_size, engine: str, losses):
    """For each loss: this rank's loss (all-reduced mean) and the full gradient of every parameter."""
    results = {}
    for loss in losses:
        if engine == "fsdp2_head" and loss != "token_logps":
            raise ValueError(f"fsdp2_head runs the token_logps loss only, got {loss!r}")
        inner = TinyLM().double()
        wrapped = wrap(inner, engine)
        batch = part(make_batch(), rank, world_size)
        fn = loss_lm_head_only if engine == "fsdp2_head" else LOSSES[loss]
        value = fn(wrapped, inner, batch, world_size)
        value.backward()
        total = value.detach().clone()
        dist.all_reduce(total)
        grads = {}
        for n, p in inner.named_parameters():
            g = p.grad
            grads[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
        results[loss] = dict(loss=total / world_size, grads=grads)
    if engine == "fsdp2":
        # Outside the forward the lm_head weight is this rank's shard (a DTensor): refused, clearly.
        try:
            token_logps(torch.randn(3, H, dtype=torch.float64), inner.lm_head.weight, torch.zeros(3, dtype=torch.long))
            results["outside_forward"] = None
        except TypeError as exc:
            results["outside_forward"] = str(exc)
    return results


def zero3_step(rank, world_size, dtype: str = "float32", modes=("lm_head",)):
    """ZeRO-3 (DeepSpeed, CPU accelerator, gloo): the token_logps loss run inside the lm_head's
    forward (mode ``lm_head``); the full gradient of every parameter from safe_get_full_grad.
    Other modes, to show what goes wrong without it: ``root`` (the loss inside the root's forward
    only) and ``gathered`` (``GatheredParameters`` around the loss inside the root's forward);
    their result is the error text, if any."""
    import deepspeed
    import deepspeed.ops
    from deepspeed.utils import safe_get_full_grad
    # DeepSpeed's CPU backend would JIT-compile its shared-memory all-reduce (minutes); gloo's will do.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    dt = getattr(torch, dtype)
    results = {}
    for mode in modes:
        model = TinyLM().to(dt)
        config = {"train_micro_batch_size_per_gpu": GLOBAL_SEQS // world_size, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "optimizer": {"type": "SGD", "params": {"lr": 0.0}}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10 ** 9}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        batch = part(make_batch(), rank, world_size)
        batch = {k: (v.to(dt) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
        try:
            if mode == "lm_head":
                value = loss_lm_head_only(engine, engine.module, batch, world_size)
            else:
                inner = engine.module

                def fn(ids, targets, weights):
                    hidden = inner.hidden(ids)
                    if mode == "gathered":
                        with deepspeed.zero.GatheredParameters([inner.lm_head.weight]):
                            lp = token_logps(hidden, inner.lm_head.weight, targets, active=weights)
                    else:
                        lp = token_logps(hidden, inner.lm_head.weight, targets, active=weights)
                    return (lp * weights).sum() * (world_size / batch["num_tokens"])
                value = run_in_forward(engine, fn, batch["ids"], batch["targets"], batch["weights"])
            engine.backward(value)
            total = value.detach().clone().double()
            dist.all_reduce(total)
            grads = {n: safe_get_full_grad(p).detach().clone().double() for n, p in engine.module.named_parameters()}
            results[mode] = dict(loss=total / world_size, grads=grads)
        except Exception as exc:  # noqa: BLE001 - the failure is the result of the other modes
            results[mode] = f"{type(exc).__name__}: {exc}"
            if mode == "lm_head":
                raise
    return results


def all_engines(rank, world_size, plan):
    """``train_step`` for each ``engine: losses`` of ``plan`` in one process group (one launch)."""
    return {engine: train_step(rank, world_size, engine, losses) for engine, losses in plan.items()}

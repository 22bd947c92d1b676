"""Checks and layout of a vocabulary-parallel lm_head for ``token_logps(..., process_group=pg)``.

Each rank of the group holds a contiguous ``[V_r, H]`` block of the lm_head's rows (rank 0 the
first rows, then rank 1, ...; the blocks may be of different sizes), as in Megatron's or
torchtitan's column-parallel output layer. One all-gather of a few integers per call tells every
rank the shard sizes (hence its first row and the global vocabulary size) and lets every rank
check that the others called with matching shapes, before any collective of the op itself runs
(a mismatch there would hang or corrupt the result instead of failing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["VocabShard", "vocab_shard"]


@dataclass(frozen=True)
class VocabShard:
    """This rank's place in a vocabulary-parallel lm_head."""

    rank: int
    world_size: int
    offset: int            # the global row of this rank's first lm_head row
    rows: int              # this rank's rows V_r
    vocab_size: int        # the sum of V_r over the group
    sizes: tuple           # V_r per rank, in rank order


_FIELDS = ("weight rows (V_r)", "H (the lm_head shards' second dim)", "H (hidden's last dim)",
           "number of tokens (targets.numel())", "presence of a bias", "presence of ref_hidden",
           "presence of ref_weight", "presence of ref_bias", "return_kl", "return_entropy", "dtype")
_NAMES = ("weight", "weight", "hidden", "targets", "bias", "ref_hidden", "ref_weight", "ref_bias",
          "return_kl", "return_entropy", "hidden")
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _check_group(process_group):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group: torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first), got a process group argument")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup (e.g. dist.group.WORLD or "
                        f"dist.new_group(...)), got {type(process_group).__name__}")
    return dist


def vocab_shard(process_group, weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor,
                bias=None, ref_hidden=None, ref_weight=None, ref_bias=None, return_kl: bool = False,
                return_entropy: bool = False, vocab_size: Optional[int] = None) -> VocabShard:
    """All-gather the shard sizes and call shapes of every rank once, check them, return the layout.

    Called before any other check that compares ``weight`` with ``hidden``, so a bad shard fails
    on every rank alike. Raises ValueError (on every rank, with the same message) when the shards
    have different ``H``, the ranks pass different numbers of tokens or different optional inputs,
    a shard is empty, or the shards do not add up to ``vocab_size``. Hidden states, targets and
    masks must be the same on every rank (replicated); only their shapes are compared here.

    Example (on every rank of ``pg``):
        >>> shard = vocab_shard(pg, w_shard, hidden, targets)
        >>> shard.offset, shard.vocab_size        # e.g. (0, 50257) on rank 0 of two
    """
    dist = _check_group(process_group)
    rank = dist.get_rank(process_group)
    world = dist.get_world_size(process_group)
    mine = [weight.shape[0], weight.shape[-1], hidden.shape[-1], targets.numel(), bias is not None,
            ref_hidden is not None, ref_weight is not None, ref_bias is not None, bool(return_kl),
            bool(return_entropy), _DTYPE_CODES.get(hidden.dtype, -1)]
    # NCCL needs a tensor on the rank's GPU; gloo a CPU tensor.
    backend = dist.get_backend(process_group)
    dev = hidden.device if (backend != "gloo" and hidden.device.type != "cpu") else torch.device("cpu")
    local = torch.tensor(mine, dtype=torch.int64, device=dev)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=process_group)
    table = torch.stack(gathered).cpu().tolist()
    sizes = tuple(row[0] for row in table)
    for j in range(1, len(_FIELDS)):
        col = [row[j] for row in table]
        if len(set(col)) > 1:
            hint = (" (every rank holds the same hidden states and targets; only the lm_head rows are split)"
                    if j in (2, 3) else "")
            raise ValueError(f"{_NAMES[j]}: expected the same {_FIELDS[j]} on every rank of process_group{hint}, "
                             f"got {col} on ranks 0..{world - 1}")
    if min(sizes) < 1:
        raise ValueError(f"weight: expected every rank's lm_head shard to hold >= 1 row, got rows {list(sizes)} "
                         f"on ranks 0..{world - 1}")
    total = sum(sizes)
    if vocab_size is not None and total != vocab_size:
        raise ValueError(f"process_group: the lm_head shards hold {list(sizes)} rows on ranks 0..{world - 1}, "
                         f"{total} in all, expected vocab_size = {vocab_size} (contiguous shards in rank order)")
    return VocabShard(rank, world, sum(sizes[:rank]), sizes[rank], total, sizes)

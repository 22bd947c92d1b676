"""Merge of per-slice partials of :func:`fastsafe.training.token_logps` into its outputs.

Both backends of ``token_logps`` reduce each slice of the vocabulary (a Triton split, the torch
path's whole local vocabulary, or one rank's ``lm_head`` shard under vocab parallelism) to a few
floats per token:

======  ==================================================  =========================
name    value over the slice's columns ``v``                 needed for
======  ==================================================  =========================
``m``   ``max_v z``                                          always
``s``   ``sum_v exp(z - m)``                                 always
``t``   ``z[target]`` if the target is in the slice, else 0  always
``ez``  ``sum_v exp(z - m) * z``                             entropy
``rm``  ``max_v zr`` (reference logits)                      KL
``rs``  ``sum_v exp(zr - rm)``                               KL
``rd``  ``sum_v exp(zr - rm) * (zr - z)``                    KL
======  ==================================================  =========================

:func:`merge_partials` merges the slices of one process and, given a process group, the ranks
(one all-reduce of the maxima, one of the rescaled sums), then forms
``lse = m + log s``, ``log p(target) = t - lse``, ``entropy = lse - ez / s`` and
``KL(ref || pi) = rd / rs - (rm + log rs) + lse``.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["merge_partials", "reduce_hidden_grad"]


def merge_partials(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, ez: Optional[torch.Tensor] = None,
                   rm: Optional[torch.Tensor] = None, rs: Optional[torch.Tensor] = None,
                   rd: Optional[torch.Tensor] = None, *, group=None):
    """``[M, S]`` partials of ``S`` vocabulary slices -> ``(logp, kl, entropy, lse, ref_lse, mean_z)``.

    Args:
        m, s, t: ``[M, S]`` float partials (see the module doc); one dtype for all.
        ez: ``[M, S]`` for the entropy, or None.
        rm, rs, rd: ``[M, S]`` each for the KL, or None.
        group: a ``torch.distributed`` process group whose ranks hold the other slices of the
            vocabulary (every rank passes the same ``M`` and the same optional partials), or None.

    Returns:
        Six ``[M]`` tensors of ``m``'s dtype; ``kl`` and ``ref_lse`` are empty without ``rm``,
        ``entropy`` and ``mean_z`` without ``ez``. ``mean_z = E_p[z]`` and the two logsumexps
        are what the backward needs.

    Example:
        >>> z = torch.randn(4, 10)
        >>> m = z.max(1, keepdim=True).values
        >>> lp, *_ = merge_partials(m, (z - m).exp().sum(1, keepdim=True), z[:, :1])
        >>> torch.allclose(lp, z.log_softmax(1)[:, 0])
        True
    """
    has_ref = rm is not None
    want_ent = ez is not None
    empty = m.new_empty(0)
    gm = m.amax(dim=1)
    rgm = rm.amax(dim=1) if has_ref else None
    if group is not None:
        import torch.distributed as dist
        maxes = torch.stack([gm, rgm]) if has_ref else gm[None]
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
        gm = maxes[0]
        rgm = maxes[1] if has_ref else None
    scale = torch.exp(m - gm[:, None])
    sums = [(s * scale).sum(1), t.sum(1)]
    if want_ent:
        sums.append((ez * scale).sum(1))
    if has_ref:
        r_scale = torch.exp(rm - rgm[:, None])
        sums += [(rs * r_scale).sum(1), (rd * r_scale).sum(1)]
    sums = torch.stack(sums)
    if group is not None:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    s_tot, t_tot = sums[0], sums[1]
    lse = gm + torch.log(s_tot)
    lp = t_tot - lse
    if want_ent:
        mean_z = sums[2] / s_tot
        ent = lse - mean_z
    else:
        mean_z = ent = empty
    if has_ref:
        rs_tot, rd_tot = sums[-2], sums[-1]
        ref_lse = rgm + torch.log(rs_tot)
        kl = rd_tot / rs_tot - ref_lse + lse
    else:
        ref_lse = kl = empty
    return lp, kl, ent, lse, ref_lse, mean_z


def reduce_hidden_grad(grad_hidden: Optional[torch.Tensor], group) -> None:
    """Sum the hidden-state gradient over the vocabulary shards in place (a column-parallel
    ``lm_head``: every rank's hidden states feed every shard). A no-op without a group or gradient."""
    if grad_hidden is not None and group is not None:
        import torch.distributed as dist
        dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=group)

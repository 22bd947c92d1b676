"""Plain-PyTorch references (the specification) for the fused training primitives.

These materialise the full ``[M, V]`` logits and let autograd do the backward. They are what the
fused paths are tested against, and what the benchmarks call "unfused".
"""
from __future__ import annotations

import torch

from ._checks import acc_dtype


def token_logps_reference(hidden, weight, targets, bias=None, ignore_index=-100, temperature=1.0, *,
                          active=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                          return_kl=False, return_entropy=False):
    """Full-logits reference of :func:`fastsafe.training.token_logps` (same arguments, same outputs).

    The logits are computed in the input dtype (``hidden @ weight.T``), upcast to float32 (float64
    for float64 inputs), divided by ``temperature`` and log-softmaxed. Outputs are 0 at
    ``ignore_index`` and inactive positions. The reference side (``ref_*``) gets no gradient.

    Example:
        >>> lp = token_logps_reference(torch.randn(2, 5, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 5)))
    """
    H = hidden.shape[-1]
    acc = acc_dtype(hidden)
    flat_t = targets.reshape(-1)
    valid = flat_t != ignore_index
    if active is not None:
        valid = valid & (active.reshape(-1) != 0)
    logits = hidden.reshape(-1, H) @ weight.t()
    if bias is not None:
        logits = logits + bias
    z = logits.to(acc) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    safe_t = torch.where(valid, flat_t, torch.zeros_like(flat_t)).long()
    lp = logp_all.gather(1, safe_t[:, None]).squeeze(1)
    zero = torch.zeros((), dtype=acc, device=hidden.device)
    outs = [torch.where(valid, lp, zero).view(targets.shape)]
    if return_kl:
        if ref_weight is None:
            ref_weight, ref_bias = weight, bias
        with torch.no_grad():
            zr = ref_hidden.reshape(-1, H) @ ref_weight.t()
            if ref_bias is not None:
                zr = zr + ref_bias
            ref_logp_all = torch.log_softmax(zr.to(acc) / temperature, dim=-1)
        kl = (ref_logp_all.exp() * (ref_logp_all - logp_all)).sum(-1)
        outs.append(torch.where(valid, kl, zero).view(targets.shape))
    if return_entropy:
        ent = -(logp_all.exp() * logp_all).sum(-1)
        outs.append(torch.where(valid, ent, zero).view(targets.shape))
    return outs[0] if len(outs) == 1 else tuple(outs)

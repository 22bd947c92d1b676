"""``nn.Module`` losses that take hidden states and the lm_head weight (the logits are never built)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ._checks import as_weights, check_float, check_logps, check_real, check_same_device, check_tensor
from .losses_dpo import masked_dpo_loss
from .losses_ppo import GRPO_LOSS_TYPES, KL_ESTIMATORS, masked_grpo_loss, masked_ppo_loss
from .token_logps import TOKEN_LOGPS_BACKENDS, token_logps

__all__ = ["FusedLinearMaskedDPOLoss", "FusedLinearMaskedPPOLoss", "FusedLinearMaskedGRPOLoss"]


def _check_common(ignore_index, temperature, chunk_size, backend):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    check_real("temperature", temperature, positive=True)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected an int >= 1 or None, got {chunk_size!r}")
    if backend is not None and backend not in TOKEN_LOGPS_BACKENDS:
        raise ValueError(f"backend: expected one of {TOKEN_LOGPS_BACKENDS} or None, got {backend!r}")


class _FusedBase(nn.Module):
    def __init__(self, ignore_index, temperature, chunk_size, backend):
        super().__init__()
        _check_common(ignore_index, temperature, chunk_size, backend)
        self.ignore_index = ignore_index
        self.temperature = float(temperature)
        self.chunk_size = chunk_size
        self.backend = backend

    def _logps(self, hidden, weight, targets, bias, active, **kw):
        return token_logps(hidden, weight, targets, bias, self.ignore_index, self.temperature, active=active,
                           chunk_size=self.chunk_size, backend=self.backend, **kw)

    def _reference(self, targets, active, weight, ref_logps, ref_hidden, ref_weight, ref_bias, need):
        if ref_logps is not None:
            if ref_hidden is not None:
                raise ValueError("ref_logps: pass either ref_logps or ref_hidden, not both")
            check_logps("ref_logps", ref_logps, targets, "targets")
            return ref_logps
        if ref_hidden is None:
            if need:
                raise ValueError("ref_hidden: required (or ref_logps), got None")
            return None
        with torch.no_grad():
            return self._logps(ref_hidden, weight if ref_weight is None else ref_weight, targets,
                               ref_bias, active)


class FusedLinearMaskedDPOLoss(_FusedBase):
    """Masked DPO from hidden states: ``token_logps`` (fused, active tokens only) + :func:`masked_dpo_loss`.

    The batch is ``[chosen; rejected]`` along dim 0 (TRL's convention): rows ``0..N-1`` are the
    chosen responses, rows ``N..2N-1`` the rejected ones of the same pairs.

    Args (constructor):
        beta, label_smoothing: as in :func:`masked_dpo_loss`.
        ignore_index, temperature, chunk_size, backend: as in :func:`token_logps`.

    ``forward(hidden [2N, T, H], weight [V, H], targets [2N, T], token_weights [2N, T], bias=None,
    *, ref_hidden=None, ref_weight=None, ref_bias=None, ref_logps=None) -> (loss, metrics)``.
    Tokens with weight 0 or target ``ignore_index`` are packed out before the matmul. The reference
    comes from precomputed per-token ``ref_logps [2N, T]`` or from the reference model's
    ``ref_hidden`` and lm_head (``ref_weight=None`` reuses ``weight``), computed without gradient.

    Example:
        >>> loss_fn = FusedLinearMaskedDPOLoss(beta=0.1)
        >>> loss, metrics = loss_fn(h, model.lm_head.weight, labels, weights, ref_hidden=ref_h,
        ...                         ref_weight=ref_model.lm_head.weight)
        >>> loss.backward()
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, ignore_index: int = -100,
                 temperature: float = 1.0, chunk_size: Optional[int] = None, backend: Optional[str] = None):
        super().__init__(ignore_index, temperature, chunk_size, backend)
        self.beta = check_real("beta", beta, positive=True)
        self.label_smoothing = check_real("label_smoothing", label_smoothing)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                token_weights: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                ref_hidden: Optional[torch.Tensor] = None, ref_weight: Optional[torch.Tensor] = None,
                ref_bias: Optional[torch.Tensor] = None, ref_logps: Optional[torch.Tensor] = None,
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        check_float("hidden", hidden, ndims=(3,))
        check_tensor("targets", targets, ndims=(2,))
        if hidden.shape[0] % 2:
            raise ValueError(f"hidden: expected an even batch [2N, T, H] (N chosen rows then N rejected rows), "
                             f"got shape {list(hidden.shape)}")
        w = as_weights("token_weights", token_weights, targets, "targets")
        check_same_device("token_weights", w, hidden, "hidden")
        lp = self._logps(hidden, weight, targets, bias, w)
        ref = self._reference(targets, w, weight, ref_logps, ref_hidden, ref_weight, ref_bias, need=True)
        n = hidden.shape[0] // 2
        return masked_dpo_loss(lp[:n], lp[n:], ref[:n], ref[n:], w[:n], w[n:], self.beta,
                               label_smoothing=self.label_smoothing)


class FusedLinearMaskedPPOLoss(_FusedBase):
    """Masked PPO from hidden states: ``token_logps`` (fused) + :func:`masked_ppo_loss`.

    Args (constructor): ``clip_eps``, ``clip_eps_high``, ``kl_coef``, ``kl_estimator``,
    ``entropy_coef`` as in :func:`masked_ppo_loss` (a nonzero ``entropy_coef`` makes the fused op
    also return the entropy); ``ignore_index``, ``temperature``, ``chunk_size``, ``backend`` as in
    :func:`token_logps`.

    ``forward(hidden [N, T, H], weight [V, H], targets [N, T], old_logps [N, T], advantages [N, T] | [N],
    mask [N, T], bias=None, *, ref_hidden=None, ref_weight=None, ref_bias=None, ref_logps=None)
    -> (loss, metrics)``. The reference (needed when ``kl_coef != 0``) is ``ref_logps`` or is
    computed from ``ref_hidden`` without gradient. Positions with mask 0 are packed out.

    Example:
        >>> loss_fn = FusedLinearMaskedPPOLoss(clip_eps=0.2, kl_coef=0.05)
        >>> loss, metrics = loss_fn(h, lm_head.weight, tokens, old_logps, advantages, mask, ref_logps=ref_lp)
    """

    def __init__(self, clip_eps: float = 0.2, clip_eps_high: Optional[float] = None, kl_coef: float = 0.0,
                 kl_estimator: str = "k3", entropy_coef: float = 0.0, ignore_index: int = -100,
                 temperature: float = 1.0, chunk_size: Optional[int] = None, backend: Optional[str] = None):
        super().__init__(ignore_index, temperature, chunk_size, backend)
        self.clip_eps = check_real("clip_eps", clip_eps)
        self.clip_eps_high = None if clip_eps_high is None else check_real("clip_eps_high", clip_eps_high)
        self.kl_coef = check_real("kl_coef", kl_coef)
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator: expected one of {KL_ESTIMATORS}, got {kl_estimator!r}")
        self.kl_estimator = kl_estimator
        self.entropy_coef = check_real("entropy_coef", entropy_coef)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                bias: Optional[torch.Tensor] = None, *, ref_hidden: Optional[torch.Tensor] = None,
                ref_weight: Optional[torch.Tensor] = None, ref_bias: Optional[torch.Tensor] = None,
                ref_logps: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        check_float("hidden", hidden, ndims=(3,))
        check_tensor("targets", targets, ndims=(2,))
        w = as_weights("mask", mask, targets, "targets")
        check_same_device("mask", w, hidden, "hidden")
        entropy = None
        if self.entropy_coef != 0:
            lp, entropy = self._logps(hidden, weight, targets, bias, w, return_entropy=True)
        else:
            lp = self._logps(hidden, weight, targets, bias, w)
        ref = self._reference(targets, w, weight, ref_logps, ref_hidden, ref_weight, ref_bias,
                              need=self.kl_coef != 0)
        return masked_ppo_loss(lp, old_logps, advantages, w, clip_eps=self.clip_eps,
                               clip_eps_high=self.clip_eps_high, ref_logps=ref, kl_coef=self.kl_coef,
                               kl_estimator=self.kl_estimator, entropy=entropy, entropy_coef=self.entropy_coef)


class FusedLinearMaskedGRPOLoss(_FusedBase):
    """Masked GRPO from hidden states: ``token_logps`` (fused) + :func:`masked_grpo_loss`.

    Args (constructor): ``loss_type``, ``clip_eps``, ``clip_eps_high``, ``ratio_max``, ``beta``,
    ``kl_importance_correction``, ``max_completion_length`` as in :func:`masked_grpo_loss`;
    ``ignore_index``, ``temperature``, ``chunk_size``, ``backend`` as in :func:`token_logps`.

    ``forward(hidden [N, T, H], weight [V, H], targets [N, T], advantages [N] | [N, T],
    token_mask=None [N, T], bias=None, *, old_logps=None, ref_hidden=None, ref_weight=None,
    ref_bias=None, ref_logps=None, num_items=None) -> (loss, metrics)``. The completion tokens are
    the targets other than ``ignore_index``; ``old_logps=None`` means on-policy (the policy's own
    detached log-probs). The reference (needed when ``beta != 0``) is ``ref_logps`` or is computed
    from ``ref_hidden`` without gradient. Only the logits of completion tokens are computed.

    Example:
        >>> loss_fn = FusedLinearMaskedGRPOLoss(loss_type="dapo")
        >>> loss, metrics = loss_fn(h, lm_head.weight, completion_targets, advantages, schmitt_mask(r, 0.1))
        >>> loss.backward()
    """

    def __init__(self, loss_type: str = "grpo", clip_eps: float = 0.2, clip_eps_high: Optional[float] = None,
                 ratio_max: Optional[float] = None, beta: float = 0.0, kl_importance_correction: bool = False,
                 max_completion_length: Optional[int] = None, ignore_index: int = -100, temperature: float = 1.0,
                 chunk_size: Optional[int] = None, backend: Optional[str] = None):
        super().__init__(ignore_index, temperature, chunk_size, backend)
        if loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
        self.loss_type = loss_type
        self.clip_eps = check_real("clip_eps", clip_eps)
        self.clip_eps_high = None if clip_eps_high is None else check_real("clip_eps_high", clip_eps_high)
        self.ratio_max = None if ratio_max is None else check_real("ratio_max", ratio_max)
        self.beta = check_real("beta", beta)
        self.kl_importance_correction = bool(kl_importance_correction)
        self.max_completion_length = max_completion_length

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                advantages: torch.Tensor, token_mask: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None, *, old_logps: Optional[torch.Tensor] = None,
                ref_hidden: Optional[torch.Tensor] = None, ref_weight: Optional[torch.Tensor] = None,
                ref_bias: Optional[torch.Tensor] = None, ref_logps: Optional[torch.Tensor] = None,
                num_items=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        check_float("hidden", hidden, ndims=(3,))
        check_tensor("targets", targets, ndims=(2,))
        completion = targets != self.ignore_index
        lp = self._logps(hidden, weight, targets, bias, completion)
        if old_logps is None:
            old_logps = lp.detach()
        ref = self._reference(targets, completion, weight, ref_logps, ref_hidden, ref_weight, ref_bias,
                              need=self.beta != 0)
        return masked_grpo_loss(lp, old_logps, advantages, completion, token_mask, loss_type=self.loss_type,
                                clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high, ratio_max=self.ratio_max,
                                ref_logps=ref, beta=self.beta, kl_importance_correction=self.kl_importance_correction,
                                max_completion_length=self.max_completion_length, num_items=num_items)

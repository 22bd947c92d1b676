"""Token masks from token-level rewards (adaptive message-wise alignment, section 3.2).

- :func:`schmitt_mask`: ``M = 1`` if ``r_t > b + delta``, ``0`` if ``|r_t - b| <= delta``,
  ``-1`` if ``r_t < b - delta`` (a Schmitt-trigger band around the baseline ``b``).
- :func:`threshold_mask` (eq. 8): binary; in a chosen response keep the tokens above the
  baseline, in a rejected response keep the tokens below it.

``baseline=None`` is the mean reward over the valid tokens of the whole batch; padding
(``attention_mask == 0``) always gets 0.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ._checks import check_finite, check_float, check_real, check_same_device, check_tensor

__all__ = ["schmitt_mask", "threshold_mask", "reward_baseline"]


def _valid(token_rewards: torch.Tensor, attention_mask) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(token_rewards, dtype=torch.bool)
    check_tensor("attention_mask", attention_mask)
    if attention_mask.shape != token_rewards.shape:
        raise ValueError(f"attention_mask: expected token_rewards' shape {list(token_rewards.shape)}, "
                         f"got {list(attention_mask.shape)}")
    check_same_device("attention_mask", attention_mask, token_rewards, "token_rewards")
    return attention_mask != 0


def reward_baseline(token_rewards: torch.Tensor, valid: torch.Tensor, baseline=None) -> torch.Tensor:
    """The baseline ``b`` broadcastable to ``token_rewards``: the given one, or the mean over valid tokens.

    ``baseline`` may be a number, a 0-d tensor, a per-sequence ``[N]`` or ``[N, 1]`` tensor, or any
    tensor broadcastable to ``token_rewards``. With no valid token the batch mean is 0.
    """
    acc = torch.float64 if token_rewards.dtype == torch.float64 else torch.float32
    if baseline is None:
        r = torch.where(valid, token_rewards.to(acc), torch.zeros((), dtype=acc, device=token_rewards.device))
        return r.sum() / valid.sum().clamp(min=1)
    if isinstance(baseline, torch.Tensor):
        check_float("baseline", baseline)
        check_same_device("baseline", baseline, token_rewards, "token_rewards")
        b = baseline.to(acc)
        if b.dim() == 1 and token_rewards.dim() == 2 and b.shape[0] == token_rewards.shape[0]:
            b = b[:, None]  # one baseline per sequence
        try:
            torch.broadcast_shapes(b.shape, token_rewards.shape)
        except RuntimeError:
            raise ValueError(f"baseline: expected a number, a per-sequence [N] tensor or a tensor broadcastable "
                             f"to token_rewards {list(token_rewards.shape)}, "
                             f"got shape {list(baseline.shape)}") from None
        check_finite("baseline", b)
        return b
    return torch.tensor(check_real("baseline", baseline), dtype=acc, device=token_rewards.device)


def _check_rewards(token_rewards):
    check_float("token_rewards", token_rewards, ndims=(1, 2))


def schmitt_mask(token_rewards: torch.Tensor, delta: float, baseline=None,
                 attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Three-level token mask with a Schmitt-trigger band around a baseline.

    ``M = 1 if r_t > b + delta; 0 if |r_t - b| <= delta; -1 if r_t < b - delta``; 0 on padding.

    Args:
        token_rewards: ``[N, T]`` (or ``[T]``) float token-level rewards; must be finite on valid tokens.
        delta: half-width of the dead band, a finite number >= 0.
        baseline: ``None`` (mean reward over the valid tokens of the batch), a number, or a tensor
            (``[N]`` per sequence, or broadcastable to ``token_rewards``).
        attention_mask: optional ``[N, T]`` mask, nonzero = valid token.

    Returns:
        ``int8`` tensor of ``token_rewards``' shape with values in ``{1, 0, -1}``.

    Example:
        >>> r = torch.tensor([[0.9, 0.5, 0.1, 0.0]]); am = torch.tensor([[1, 1, 1, 0]])
        >>> schmitt_mask(r, delta=0.2, attention_mask=am)      # baseline = mean(0.9, 0.5, 0.1) = 0.5
        tensor([[ 1,  0, -1,  0]], dtype=torch.int8)
    """
    _check_rewards(token_rewards)
    delta = check_real("delta", delta)
    if delta < 0:
        raise ValueError(f"delta: expected a number >= 0, got {delta}")
    valid = _valid(token_rewards, attention_mask)
    check_finite("token_rewards", token_rewards[valid])
    b = reward_baseline(token_rewards, valid, baseline)
    r = token_rewards.to(b.dtype)
    m = (r > b + delta).to(torch.int8) - (r < b - delta).to(torch.int8)
    return torch.where(valid, m, torch.zeros((), dtype=torch.int8, device=m.device))


def threshold_mask(token_rewards: torch.Tensor, is_chosen: Union[bool, torch.Tensor], baseline=None,
                   attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Binary token mask of eq. 8: which tokens carry the preference signal.

    In a chosen response a token is kept (1) when its reward is above the baseline (``r_t > b``);
    in a rejected response when it is below (``r_t < b``). Everything else, and padding, is 0.

    Args:
        token_rewards: ``[N, T]`` (or ``[T]``) float token-level rewards.
        is_chosen: a bool for the whole batch, or an ``[N]`` bool tensor (one per sequence).
        baseline, attention_mask: as in :func:`schmitt_mask`.

    Returns:
        ``int8`` tensor of ``token_rewards``' shape with values in ``{0, 1}``.

    Example:
        >>> r = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
        >>> threshold_mask(r, torch.tensor([True, False]))    # baseline 0.5
        tensor([[1, 0],
                [0, 1]], dtype=torch.int8)
    """
    _check_rewards(token_rewards)
    valid = _valid(token_rewards, attention_mask)
    check_finite("token_rewards", token_rewards[valid])
    if isinstance(is_chosen, bool):
        chosen = torch.full(token_rewards.shape[:1] if token_rewards.dim() == 2 else (), is_chosen,
                            device=token_rewards.device)
    else:
        check_tensor("is_chosen", is_chosen, ndims=(0, 1), dtypes=(torch.bool,), kind="bool")
        check_same_device("is_chosen", is_chosen, token_rewards, "token_rewards")
        n = token_rewards.shape[0] if token_rewards.dim() == 2 else 1
        if is_chosen.dim() == 1 and (token_rewards.dim() != 2 or is_chosen.shape[0] != n):
            raise ValueError(f"is_chosen: expected a bool or a [N] = [{n}] bool tensor (one per sequence), "
                             f"got shape {list(is_chosen.shape)}")
        chosen = is_chosen
    if token_rewards.dim() == 2 and chosen.dim() == 1:
        chosen = chosen[:, None]
    b = reward_baseline(token_rewards, valid, baseline)
    r = token_rewards.to(b.dtype)
    keep = torch.where(chosen, r > b, r < b) & valid
    return keep.to(torch.int8)

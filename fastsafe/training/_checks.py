"""Argument checks shared by the training losses.

Every error names the argument, the expected and the received value (the convention of
``fastsafe.ops.validate``, whose helpers are reused here).
"""
from __future__ import annotations

import torch

from fastsafe.ops.validate import check_real, check_same_device, check_tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FLOAT_KIND = "a floating point type (float32, float16, bfloat16 or float64)"

__all__ = ["FLOAT_DTYPES", "check_real", "check_same_device", "check_tensor", "check_float",
           "check_int_tensor", "check_same_shape", "check_finite", "check_shape", "as_weights"]


def check_float(name: str, value, *, ndims=None) -> torch.Tensor:
    """A floating point tensor (any of :data:`FLOAT_DTYPES`) of one of ``ndims`` ranks."""
    return check_tensor(name, value, ndims=ndims, dtypes=FLOAT_DTYPES, kind=_FLOAT_KIND)


def check_int_tensor(name: str, value, *, ndims=None) -> torch.Tensor:
    check_tensor(name, value, ndims=ndims)
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype (int64, int32, ...), got {value.dtype}")
    return value


def check_shape(name: str, value: torch.Tensor, shape, ref_desc: str) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)} ({ref_desc}), got {list(value.shape)}")


def check_same_shape(name: str, value: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if value.shape != ref.shape:
        raise ValueError(f"{name}: expected the shape of {ref_name} {list(ref.shape)}, got {list(value.shape)}")
    check_same_device(name, value, ref, ref_name)


def check_finite(name: str, value: torch.Tensor) -> None:
    """Raise ValueError if ``value`` holds a NaN or an infinity (one device sync)."""
    if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
        bad = value[~torch.isfinite(value)]
        raise ValueError(f"{name}: expected finite values, got {bad.numel()} non-finite "
                         f"(first: {bad.flatten()[0].item()})")


def as_weights(name: str, value, ref: torch.Tensor, ref_name: str) -> torch.Tensor:
    """Per-token weights: a float, bool or integer tensor of ``ref``'s shape, finite, as ``ref.dtype``."""
    check_tensor(name, value)
    check_same_shape(name, value, ref, ref_name)
    if value.dtype.is_complex:
        raise TypeError(f"{name}: expected a real (float, int or bool) tensor, got {value.dtype}")
    check_finite(name, value)
    return value.to(ref.dtype)


def check_logps(name: str, value, ref: torch.Tensor = None, ref_name: str = None) -> torch.Tensor:
    """Per-token log-probs: a 2-D float tensor (of ``ref``'s shape when given)."""
    check_float(name, value, ndims=(2,))
    if ref is not None:
        check_same_shape(name, value, ref, ref_name)
    return value


def check_pair_inputs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      chosen_weights, rejected_weights):
    """Validate the per-token tensors of a preference-pair loss; return the (chosen, rejected) weights."""
    check_logps("policy_chosen_logps", policy_chosen_logps)
    check_logps("policy_rejected_logps", policy_rejected_logps)
    if policy_rejected_logps.shape[0] != policy_chosen_logps.shape[0]:
        raise ValueError(f"policy_rejected_logps: expected N = {policy_chosen_logps.shape[0]} rows (one per pair, "
                         f"as policy_chosen_logps), got shape {list(policy_rejected_logps.shape)}")
    check_logps("ref_chosen_logps", ref_chosen_logps, policy_chosen_logps, "policy_chosen_logps")
    check_logps("ref_rejected_logps", ref_rejected_logps, policy_rejected_logps, "policy_rejected_logps")
    wc = as_weights("chosen_weights", chosen_weights, policy_chosen_logps, "policy_chosen_logps")
    wr = as_weights("rejected_weights", rejected_weights, policy_rejected_logps, "policy_rejected_logps")
    return wc, wr


def acc_dtype(*items) -> torch.dtype:
    """The accumulation dtype of the training code: float64 if any of ``items`` (tensors, dtypes or
    None) is float64, else float32 (token log-probs, losses and gradients accumulate in at least fp32).

    Example:
        >>> acc_dtype(torch.zeros(2, dtype=torch.bfloat16), None), acc_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    for t in items:
        if t is not None and (t if isinstance(t, torch.dtype) else t.dtype) == torch.float64:
            return torch.float64
    return torch.float32


def metric(x: torch.Tensor) -> torch.Tensor:
    """A logged metric: a detached 0-d float32 tensor (call ``.item()`` when logging; no sync here)."""
    return x.detach().to(torch.float32).reshape(())


def check_targets(flat_t: torch.Tensor, ignore_index: int, vocab_size: int) -> torch.Tensor:
    """``[M]`` bool ``flat_t != ignore_index``; ValueError if another id is outside ``[0, vocab_size)``
    (the token_logps targets; also run inside the op ``fastsafe::token_targets_valid``)."""
    valid = flat_t != ignore_index
    bad = valid & ((flat_t < 0) | (flat_t >= vocab_size))
    if bool(bad.any()):
        vals = flat_t[bad]
        raise ValueError(f"targets: expected ids in [0, V) = [0, {vocab_size}) or ignore_index = {ignore_index}, "
                         f"got {vals.numel()} out of range (min {vals.min().item()}, max {vals.max().item()})")
    return valid


def check_active(active, targets: torch.Tensor, hidden: torch.Tensor) -> None:
    """``active``: a tensor of ``targets``' shape on ``hidden``'s device (token_logps' mask of the
    tokens to compute)."""
    check_tensor("active", active)
    if active.shape != targets.shape:
        raise ValueError(f"active: expected targets' shape {list(targets.shape)}, got {list(active.shape)}")
    check_same_device("active", active, hidden, "hidden")

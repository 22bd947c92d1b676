"""Argument checking for the ops: every error names the argument, the expected and the received value."""
from __future__ import annotations

import math
import numbers

import torch

from .bitmask import bitmask_words
from .types import SafeTopKInputs

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_tensor(name: str, value, *, ndims=None, dtypes=None, kind: str | None = None) -> torch.Tensor:
    """Check that ``value`` is a tensor of one of ``ndims`` ranks and one of ``dtypes``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndims is not None and value.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name}: expected a {want} tensor, got shape {_shape(value)}")
    if dtypes is not None and value.dtype not in dtypes:
        want = kind or ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype {want}, got {value.dtype}")
    return value


def check_same_device(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str = "logits") -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref_name}'s device {ref.device}, got {t.device}")


def check_real(name: str, value, *, positive: bool = False) -> float:
    """Check that ``value`` is a finite real number (> 0 when ``positive``); returns it as float."""
    if type(value) is float or type(value) is int:      # the common case, without the ABC checks
        value = float(value)
        if math.isfinite(value) and (value > 0 or not positive):
            return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name}: expected a number > 0, got {value}")
    return value


def check_int(name: str, value, minimum: int | None = None) -> int:
    """Check that ``value`` is an int (not a bool), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_k(k, vocab_size: int) -> int:
    """Check that ``k`` is an int with ``1 <= k <= vocab_size``."""
    if type(k) is int and 1 <= k <= vocab_size:
        return k
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    k = int(k)
    if k < 1 or k > vocab_size:
        raise ValueError(f"k: expected 1 <= k <= V = {vocab_size}, got {k}")
    return k


def _rowwise(t: torch.Tensor) -> torch.Tensor:
    """Make the last dimension unit-stride (kernels take a row stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def validate_safe_topk(logits, k, *, bias_table=None, positions=None, bias_scale=1.0,
                       banned_bitmask=None, dense_reward=None, reward_weight=0.0,
                       temperature=1.0) -> SafeTopKInputs:
    """Validate and normalise the arguments of ``safe_topk`` (see its docstring)."""
    check_tensor("logits", logits, ndims=(2,), dtypes=FLOAT_DTYPES, kind="float32, float16 or bfloat16")
    B, V = logits.shape
    if V < 1:
        raise ValueError(f"logits: expected a vocabulary size V >= 1, got shape {_shape(logits)}")
    k = check_k(k, V)
    temperature = check_real("temperature", temperature, positive=True)
    bias_scale = check_real("bias_scale", bias_scale)
    reward_weight = check_real("reward_weight", reward_weight)
    logits = _rowwise(logits)

    table = None
    pos = None
    if bias_table is not None:
        check_tensor("bias_table", bias_table, ndims=(1, 2), dtypes=FLOAT_DTYPES + (torch.float64,),
                     kind="a floating point type")
        check_same_device("bias_table", bias_table, logits)
        if bias_table.shape[-1] != V:
            raise ValueError(
                f"bias_table: vocabulary size mismatch: bias_table has {bias_table.shape[-1]} columns "
                f"(shape {_shape(bias_table)}) but logits has V = {V}; the table was estimated for "
                f"another vocabulary")
        table = bias_table.reshape(1, V) if bias_table.dim() == 1 else bias_table
        if table.shape[0] < 1:
            raise ValueError(f"bias_table: expected at least one row, got shape {_shape(bias_table)}")
        if table.dtype != torch.float32 or not table.is_contiguous():
            table = table.to(torch.float32).contiguous()
        L = table.shape[0]
        if positions is None:
            if L > 1:
                raise ValueError(
                    f"positions: required when bias_table has L = {L} > 1 rows (shape {_shape(bias_table)}); "
                    f"pass the response position of each batch row as a [B] int tensor")
            pos = torch.zeros(B, dtype=torch.int64, device=logits.device)
        else:
            if isinstance(positions, numbers.Integral) and not isinstance(positions, bool):
                pos = torch.full((B,), int(positions), dtype=torch.int64, device=logits.device)
            else:
                check_tensor("positions", positions, ndims=(1,))
                if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
                    raise TypeError(f"positions: expected an integer dtype, got {positions.dtype}")
                check_same_device("positions", positions, logits)
                if positions.shape[0] != B:
                    raise ValueError(f"positions: expected shape [B] = [{B}], got {_shape(positions)}")
                pos = positions.to(torch.int64)
            pos = pos.clamp(0, L - 1)
            if not pos.is_contiguous():
                pos = pos.contiguous()

    mask = None
    if banned_bitmask is not None:
        check_tensor("banned_bitmask", banned_bitmask, ndims=(1, 2), dtypes=(torch.int32,), kind="int32")
        check_same_device("banned_bitmask", banned_bitmask, logits)
        W = bitmask_words(V)
        if banned_bitmask.shape[-1] != W:
            raise ValueError(
                f"banned_bitmask: expected ceil(V/32) = {W} int32 words per row for V = {V}, got shape "
                f"{_shape(banned_bitmask)} (a mask for another vocabulary size?)")
        if banned_bitmask.dim() == 2 and banned_bitmask.shape[0] != B:
            raise ValueError(f"banned_bitmask: expected shape [B, W] = [{B}, {W}] or [{W}], got "
                             f"{_shape(banned_bitmask)}")
        mask = banned_bitmask.contiguous()

    reward = None
    if dense_reward is not None:
        check_tensor("dense_reward", dense_reward, ndims=(2,), dtypes=FLOAT_DTYPES + (torch.float64,),
                     kind="a floating point type")
        check_same_device("dense_reward", dense_reward, logits)
        if tuple(dense_reward.shape) != (B, V):
            raise ValueError(f"dense_reward: expected shape [B, V] = [{B}, {V}], got {_shape(dense_reward)}")
        reward = _rowwise(dense_reward.to(logits.dtype))

    return SafeTopKInputs(logits=logits, k=k, bias_table=table, positions=pos, bias_scale=bias_scale,
                          banned_bitmask=mask, dense_reward=reward, reward_weight=reward_weight,
                          temperature=temperature)


def token_rows(name: str, histories, tail: int | None = None) -> list[list[int]]:
    """Token-id histories (``[B, T]`` integer tensor, or a list of int lists / 1-D tensors) as python
    lists, each cut to its last ``tail`` tokens when ``tail`` is given; errors name ``name``.

    Example:
        >>> token_rows("histories", [[1, 2, 3], torch.tensor([4, 5])], tail=2)
        [[2, 3], [4, 5]]
    """
    if isinstance(histories, torch.Tensor):
        check_history_tensor(name, histories)
        h = histories
        if tail is not None:
            h = h[:, max(0, h.shape[1] - tail):] if tail > 0 else h[:, :0]
        return h.tolist()
    if isinstance(histories, (list, tuple)):
        rows = []
        for i, r in enumerate(histories):
            if isinstance(r, torch.Tensor):
                r = r.tolist()
            if not isinstance(r, (list, tuple)):
                raise TypeError(f"{name}[{i}]: expected a list of token ids, got {type(r).__name__}")
            if tail is not None:
                r = r[max(0, len(r) - tail):] if tail > 0 else []
            rows.append(list(r))
        return rows
    raise TypeError(f"{name}: expected a [B, T] integer tensor or a list of lists of ints, "
                    f"got {type(histories).__name__}")


def check_history_tensor(name: str, t: torch.Tensor) -> None:
    """Check that ``t`` is a 2-D integer tensor of token ids."""
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [B, T] tensor, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got {t.dtype}")

"""Triton kernels of ``safe_topk``: the fused decoding step in two passes (GPU; CPU under TRITON_INTERPRET=1).

Pass 1, grid ``(B, n_splits)``: each program reads one slice of a row's vocabulary, tile by tile
(``BLOCK_V`` tokens at a time), computes the float32 scores exactly as the torch reference does
(``((x / temperature) - bias_scale * bias[pos, v]) + reward_weight * r``, ``-inf`` where banned),
keeps an online ``(max, sum exp(x - max))`` pair of the finite scores plus NaN / +inf flags, and
keeps the slice's best ``KP`` candidates (``KP`` = k rounded up to a power of two).

Pass 2, grid ``(B,)``: merges the ``n_splits`` candidate lists and logsumexp partials of a row and
writes ``values [B, k]``, ``indices [B, k]`` and ``logsumexp [B]``. Only these and the tiny
per-split partials are written; the logits are read once.

Selection works on one distinct int64 key per token: the high 32 bits are the score mapped to an
order-preserving integer (NaN counts as ``-inf``, ``-0.0`` as ``+0.0``), the low 32 bits are
``2**31 - 1 - id``. Larger key = better candidate, and equal scores are ordered by lower id, so
the top ``k`` keys are exactly the reference's top-k (including the ``-inf`` fill of rows with
fewer than k allowed tokens). Keys are distinct, so rows full of banned (``-inf``) tokens cost
the same as any other row: past the first tile a banned token never beats the running k-th key.

Per tile, the keys that beat the slice's current ``KP``-th best key are counted. None: the tile
costs nothing more (the usual case late in a slice). A few (``<= FEW``): they are inserted one by
one over the current minimum. More: the tile's top ``KP`` is taken with a partial bitonic sort
and merged with the running set. Pass 2 folds the splits' candidates in the same way.

Numerics: scores use IEEE division (``div_rn``) and no fused multiply-add
(``enable_fp_fusion=False``), so they round exactly like the torch reference on the CPU; the
logsumexp uses ``tl.exp`` on ``score - max`` in float32 with ``-inf - -inf`` guarded.

Limits: ``1 <= k <= MAX_K = 1024``; ``V < 2**31``. Launch parameters (``plan_launch``) are
heuristics that have not been tuned on a GPU yet.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
# Reductions call tl.reduce with Triton's own combine functions: that is what tl.max / tl.min / tl.sum
# do for 32/64-bit inputs, but the interpreter runs it as one numpy call, while every nested jit
# call (tl.max is one) costs it a full re-patch of triton.language (~1 ms).
from triton.language.standard import _elementwise_max as _MAX
from triton.language.standard import _elementwise_min as _MIN
from triton.language.standard import _sum_combine as _ADD

from fastsafe.ops.custom_ops import safe_topk_fake, safe_topk_op_args
from fastsafe.ops.types import SafeTopKInputs

try:
    from torch._library.triton import is_wrap_triton_enabled as _tracing
except ImportError:           # pragma: no cover - older torch: nothing traces the kernels
    def _tracing() -> bool:
        return False

__all__ = ["safe_topk_triton", "safe_topk_triton_op", "MAX_K", "plan_launch", "compile_for_gpu"]

#: Largest ``k`` this backend supports (``k`` is padded to a power of two at compile time).
MAX_K = 1024
#: Key of padding lanes: smaller than the key of any real token (even a banned one).
_SENTINEL: tl.constexpr = tl.constexpr(-(2**63))
# Bound on the candidates pass 2 merges per row (``n_splits * KP``).
_MAX_CANDIDATES = 16384
# On a GPU a split keeps at least this many tiles when the row is long enough (and k > 8): the
# first tiles of a split pay for a sort, later ones are mostly skipped.
_MIN_TILES_PER_SPLIT = 4


@triton.jit
def _bitonic_topk(x, LOG_N: tl.constexpr, LOG_K: tl.constexpr, DESCENDING: tl.constexpr):
    """The ``2**LOG_K`` largest of the ``2**LOG_N`` distinct int64 keys ``x``, sorted.

    ``x`` is viewed as a ``[2] * LOG_N`` hypercube: axis ``LOG_N - 1 - j`` is bit ``j`` of the flat
    index, so a compare-exchange at distance ``2**j`` pairs the two entries along that axis (the
    partner of an entry is ``pair sum - entry``, exact in wrapping int64 arithmetic). First runs of
    ``2**LOG_K`` keys are bitonic-sorted in alternating directions (ascending where bit ``LOG_K`` of
    the index is 0); then, until one run is left, the elementwise max of neighbouring
    (ascending, descending) runs keeps the best half of each pair as a bitonic run, which one
    bitonic merge re-sorts. ``LOG_K == LOG_N`` is a full sort. Helpers are inlined on purpose: the
    interpreter pays a lot per nested jit call.
    """
    h = tl.reshape(x, [2] * LOG_N)
    for s in tl.static_range(1, LOG_K + 1):
        for t in tl.static_range(s):
            partner = tl.reduce(h, LOG_N - s + t, _ADD, keep_dims=True) - h
            upper = tl.reshape(tl.arange(0, 2), [1] * (LOG_N - s + t) + [2] + [1] * (s - 1 - t))
            if s == LOG_N:
                take_max = upper ^ (1 if DESCENDING else 0)
            else:
                take_max = upper ^ tl.reshape(tl.arange(0, 2), [1] * (LOG_N - 1 - s) + [2] + [1] * s)
            h = tl.where(take_max != 0, tl.maximum(h, partner), tl.minimum(h, partner))
    for r in tl.static_range(LOG_N - LOG_K):
        h = tl.reduce(h, LOG_N - r - 1 - LOG_K, _MAX)          # now LOG_N - r - 1 axes
        for t in tl.static_range(LOG_K):
            partner = tl.reduce(h, LOG_N - r - 1 - LOG_K + t, _ADD, keep_dims=True) - h
            upper = tl.reshape(tl.arange(0, 2), [1] * (LOG_N - r - 1 - LOG_K + t) + [2] + [1] * (LOG_K - 1 - t))
            if r == LOG_N - LOG_K - 1:
                take_max = upper ^ (1 if DESCENDING else 0)
            else:
                take_max = upper ^ tl.reshape(tl.arange(0, 2), [1] * (LOG_N - r - 2 - LOG_K) + [2] + [1] * LOG_K)
            h = tl.where(take_max != 0, tl.maximum(h, partner), tl.minimum(h, partner))
    return tl.reshape(h, [2**LOG_K])


@triton.jit
def _absorb(best, thr, keys, KP: tl.constexpr, LOG_KP: tl.constexpr, LOG_N: tl.constexpr,
            FEW: tl.constexpr):
    """Fold the keys ``[2**LOG_N]`` into the running best set ``best [KP]`` (unordered) of minimum ``thr``.

    Nothing to do when no key beats ``thr`` (the common case late in a row, and for banned tokens
    past the first tile). Up to ``FEW`` winners are inserted one by one over the current minimum;
    more winners take the tile's top ``KP`` with a partial bitonic sort and merge it.
    """
    above = keys > thr
    n_above = tl.reduce(above.to(tl.int32), 0, _ADD)
    if n_above > FEW:
        top = _bitonic_topk(keys, LOG_N, LOG_KP, False)                       # ascending
        best = tl.maximum(_bitonic_topk(best, LOG_KP, LOG_KP, True), top)     # best KP of both
        thr = tl.reduce(best, 0, _MIN)
    elif n_above > 0:
        cand = tl.where(above, keys, _SENTINEL)
        lane = tl.arange(0, KP)
        for _ in range(n_above):
            y = tl.reduce(cand, 0, _MAX)
            cand = tl.where(cand == y, _SENTINEL, cand)
            slot = tl.reduce(tl.where(best == thr, lane, KP), 0, _MIN)          # one slot holding the minimum
            best = tl.where(lane == slot, tl.maximum(best, y), best)
            thr = tl.reduce(best, 0, _MIN)
    return best, thr


@triton.jit
def _safe_topk_partial_kernel(
    logits_ptr, stride_logits,
    bias_ptr, pos_ptr, bias_scale,
    mask_ptr, stride_mask,
    reward_ptr, stride_reward, reward_weight,
    temperature,
    cand_ptr, part_m_ptr, part_s_ptr, part_flag_ptr,
    V, slice_len, n_splits,
    KP: tl.constexpr, LOG_KP: tl.constexpr, BLOCK_V: tl.constexpr, LOG_BLOCK: tl.constexpr,
    FEW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_REWARD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    lo = split * slice_len
    hi = tl.minimum(lo + slice_len, V)

    lane = tl.arange(0, BLOCK_V)
    best = tl.full([KP], _SENTINEL, tl.int64)
    thr = tl.reduce(best, 0, _MIN)
    m = tl.full([], -float("inf"), tl.float32)       # running max of the finite scores
    s = tl.full([], 0.0, tl.float32)                 # sum of exp(score - m)
    bad = tl.full([], 0, tl.int32)                   # bit 0: a NaN score seen, bit 1: a +inf score seen
    if HAS_BIAS:
        bias_row = bias_ptr + tl.load(pos_ptr + row) * V
    for start in range(lo, hi, BLOCK_V):
        offs = start + lane
        inb = offs < hi
        x = tl.load(logits_ptr + row * stride_logits + offs, mask=inb, other=0.0).to(tl.float32)
        x = tl.math.div_rn(x, temperature)
        if HAS_BIAS:
            x = x - bias_scale * tl.load(bias_row + offs, mask=inb, other=0.0)
        if HAS_REWARD:
            x = x + reward_weight * tl.load(reward_ptr + row * stride_reward + offs, mask=inb,
                                            other=0.0).to(tl.float32)
        if HAS_MASK:
            word = tl.load(mask_ptr + row * stride_mask + offs // 32, mask=inb, other=0)
            x = tl.where(((word >> (offs % 32)) & 1) != 0, x, -float("inf"))
        x = tl.where(inb, x, -float("inf"))

        # logsumexp partial over finite scores; NaN and +inf are flagged and resolved in pass 2
        is_nan = x != x
        is_pinf = x == float("inf")
        bad = bad | tl.reduce(is_nan.to(tl.int32) | (is_pinf.to(tl.int32) * 2), 0, _MAX)
        xf = tl.where(is_nan | is_pinf, -float("inf"), x)
        new_m = tl.maximum(m, tl.reduce(xf, 0, _MAX))
        ref = tl.where(new_m == -float("inf"), 0.0, new_m)              # exp(-inf - -inf) guard
        s = s * tl.exp(m - ref) + tl.reduce(tl.exp(xf - ref), 0, _ADD)
        m = new_m

        # selection keys: order-preserving int of the score (NaN -> -inf, -0.0 -> +0.0) | 2**31-1-id
        bits = tl.where(is_nan, -float("inf"), x).to(tl.int32, bitcast=True)
        bits = tl.where(bits == -2147483648, 0, bits)              # -0.0 ties with +0.0
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        keys = (ordered.to(tl.int64) << 32) | (2147483647 - offs).to(tl.int64)
        keys = tl.where(inb, keys, _SENTINEL)
        best, thr = _absorb(best, thr, keys, KP, LOG_KP, LOG_BLOCK, FEW)

    part = row * n_splits + split
    tl.store(cand_ptr + part * KP + tl.arange(0, KP), best)
    tl.store(part_m_ptr + part, m)
    tl.store(part_s_ptr + part, s)
    tl.store(part_flag_ptr + part, bad)


@triton.jit
def _safe_topk_merge_kernel(
    cand_ptr, part_m_ptr, part_s_ptr, part_flag_ptr,
    values_ptr, indices_ptr, lse_ptr,
    n_splits, k,
    KP: tl.constexpr, LOG_KP: tl.constexpr, BLOCK_C: tl.constexpr, LOG_C: tl.constexpr,
    FEW: tl.constexpr, SPLITS_P: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)

    # logsumexp from the per-split (max, sumexp) partials
    sp = tl.arange(0, SPLITS_P)
    sp_in = sp < n_splits
    pm = tl.load(part_m_ptr + row * n_splits + sp, mask=sp_in, other=-float("inf"))
    ps = tl.load(part_s_ptr + row * n_splits + sp, mask=sp_in, other=0.0)
    pf = tl.load(part_flag_ptr + row * n_splits + sp, mask=sp_in, other=0)
    big = tl.reduce(pm, 0, _MAX)
    ref = tl.where(big == -float("inf"), 0.0, big)
    total = tl.reduce(ps * tl.exp(pm - ref), 0, _ADD)
    lse = tl.where(big == -float("inf"), -float("inf"),               # nothing finite in the row
                   tl.log(tl.where(big == -float("inf"), 1.0, total)) + ref)
    flags = tl.reduce(pf, 0, _MAX)
    lse = tl.where((flags & 2) != 0, float("inf"), lse)
    lse = tl.where((flags & 1) != 0, float("nan"), lse)
    tl.store(lse_ptr + row, lse)

    # top-k of the splits' candidates
    n_cand = n_splits * KP
    best = tl.full([KP], _SENTINEL, tl.int64)
    thr = tl.reduce(best, 0, _MIN)
    lane = tl.arange(0, BLOCK_C)
    for start in range(0, n_cand, BLOCK_C):
        offs = start + lane
        keys = tl.load(cand_ptr + row * n_cand + offs, mask=offs < n_cand, other=_SENTINEL)
        best, thr = _absorb(best, thr, keys, KP, LOG_KP, LOG_C, FEW)
    best = _bitonic_topk(best, LOG_KP, LOG_KP, True)

    ordered = (best >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    vals = bits.to(tl.float32, bitcast=True)
    ids = (2147483647 - best.to(tl.int32)).to(tl.int64)   # low 32 bits hold 2**31 - 1 - id
    out = tl.arange(0, KP)
    tl.store(values_ptr + row * k + out, vals, mask=out < k)
    tl.store(indices_ptr + row * k + out, ids, mask=out < k)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan_launch(batch: int, vocab_size: int, k: int, device: torch.device, *,
                block_v: int | None = None, n_splits: int | None = None) -> dict:
    """Launch parameters for ``safe_topk_triton``: ``KP``, ``BLOCK_V``, ``n_splits``, ``slice_len``.

    On a GPU the splits per row grow until ``B * n_splits`` covers about two waves of SMs, bounded
    by ``tiles / 4`` (for k > 8 a split keeps at least 4 tiles of ``BLOCK_V = max(1024, KP)``) and
    by ``n_splits * KP <= 16384`` candidates for pass 2; on the CPU interpreter a row gets at most
    4 splits. ``block_v`` / ``n_splits`` force a choice (tests, tuning). Untuned on real hardware.

    Example:
        >>> plan_launch(8, 151936, 50, torch.device("cpu"))
        {'KP': 64, 'BLOCK_V': 1024, 'n_splits': 4, 'slice_len': 38912}
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k: the triton backend supports 1 <= k <= {MAX_K}, got {k!r} "
                         f"(use backend='torch' or 'cpp' for larger k)")
    kp = max(2, triton.next_power_of_2(k))
    if block_v is None:
        block_v = max(kp, 1024 if device.type == "cuda" else min(1024, triton.next_power_of_2(vocab_size)))
    if block_v < kp or block_v & (block_v - 1):
        raise ValueError(f"block_v: expected a power of two >= {kp} (k={k} rounded up), got {block_v}")
    tiles = triton.cdiv(vocab_size, block_v)
    if n_splits is None:
        if device.type == "cuda":
            sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            min_tiles = _MIN_TILES_PER_SPLIT if kp > 8 else 1      # tiny k: a tile's sort is cheap
            target = min(triton.cdiv(2 * sms, max(batch, 1)), tiles // min_tiles)
        else:
            target = 4
        n_splits = max(1, min(target, tiles, _MAX_CANDIDATES // kp))
    if isinstance(n_splits, bool) or not isinstance(n_splits, int) or n_splits < 1:
        raise ValueError(f"n_splits: expected a positive int, got {n_splits!r}")
    n_splits = min(n_splits, tiles)
    slice_len = triton.cdiv(tiles, n_splits) * block_v
    n_splits = triton.cdiv(vocab_size, slice_len)        # no empty slice
    return {"KP": kp, "BLOCK_V": block_v, "n_splits": n_splits, "slice_len": slice_len}


def safe_topk_triton(inp: SafeTopKInputs, *, block_v: int | None = None, n_splits: int | None = None,
                     block_c: int | None = None):
    """Triton ``safe_topk``: ``(values [B, k] float32, indices [B, k] int64, logsumexp [B] float32)``.

    Args:
        inp: validated inputs from :func:`fastsafe.ops.validate.validate_safe_topk` (logits
            ``[B, V]`` fp32/fp16/bf16 with unit column stride; optional float32 ``[L, V]``
            ``bias_table`` with clamped int64 ``positions [B]``; int32 ``banned_bitmask`` ``[W]`` or
            ``[B, W]`` with bit 1 = allowed; ``dense_reward [B, V]`` in the logits' dtype).
        block_v, n_splits: override the tile size and the splits per row (testing, tuning).
        block_c: override the candidates pass 2 reads per step (a power of two >= KP).

    Supports ``1 <= k <= MAX_K`` (1024); larger ``k`` raises ValueError. Matches
    :func:`fastsafe.ops.reference.safe_topk_reference`: same float32 score order, ties by lower id,
    NaN never selected, ``-inf`` fill with the lowest unused ids, logsumexp NaN / ``-inf`` rules.

    Example:
        >>> from fastsafe.ops.validate import validate_safe_topk
        >>> vals, ids, lse = safe_topk_triton(validate_safe_topk(torch.randn(2, 1000), 5))
        >>> vals.shape, ids.dtype, lse.shape
        (torch.Size([2, 5]), torch.int64, torch.Size([2]))
    """
    return safe_topk_triton_op(inp, block_v=block_v, n_splits=n_splits, block_c=block_c)


def safe_topk_triton_op(inp: SafeTopKInputs, *, block_v: int | None = None, n_splits: int | None = None,
                        block_c: int | None = None):
    """Call the op ``fastsafe::safe_topk_triton`` on validated inputs (see :func:`safe_topk_triton`)."""
    return _OP(*safe_topk_op_args(inp), block_v, n_splits, block_c)


def _launch(logits: torch.Tensor, k: int, bias_table: Optional[torch.Tensor], positions: Optional[torch.Tensor],
            bias_scale: float, banned_bitmask: Optional[torch.Tensor], dense_reward: Optional[torch.Tensor],
            reward_weight: float, temperature: float, block_v: Optional[int] = None,
            n_splits: Optional[int] = None, block_c: Optional[int] = None
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Body of ``fastsafe::safe_topk_triton``: outputs, then both kernels through ``wrap_triton``.

    Traced with fake tensors by ``torch.compile`` (the kernels then show up in the graph); run
    with real tensors eagerly. The interpreter's kernels (TRITON_INTERPRET=1) cannot be traced.
    """
    B, V = logits.shape
    plan = plan_launch(B, V, k, logits.device, block_v=block_v, n_splits=n_splits)
    kp, block, ns, slice_len = plan["KP"], plan["BLOCK_V"], plan["n_splits"], plan["slice_len"]
    if block_c is None:
        block_c = max(kp, min(2048, triton.next_power_of_2(ns * kp)))
    elif isinstance(block_c, bool) or not isinstance(block_c, int) or block_c < kp or block_c & (block_c - 1):
        raise ValueError(f"block_c: expected a power of two >= {kp} (k={k} rounded up), got {block_c!r}")
    dev = logits.device
    values = torch.empty(B, k, dtype=torch.float32, device=dev)
    indices = torch.empty(B, k, dtype=torch.int64, device=dev)
    lse = torch.empty(B, dtype=torch.float32, device=dev)
    if B == 0:
        return values, indices, lse
    if logits.stride(1) != 1:
        raise ValueError(f"logits: expected unit column stride, got strides {tuple(logits.stride())}")
    cand = torch.empty(B, ns * kp, dtype=torch.int64, device=dev)
    part_m = torch.empty(B, ns, dtype=torch.float32, device=dev)
    part_s = torch.empty(B, ns, dtype=torch.float32, device=dev)
    part_flag = torch.empty(B, ns, dtype=torch.int32, device=dev)

    has_bias = bias_table is not None
    has_mask = banned_bitmask is not None
    has_reward = dense_reward is not None
    bias = bias_table if has_bias else logits
    pos = positions if has_bias else logits
    mask = banned_bitmask if has_mask else logits
    stride_mask = (mask.shape[-1] if mask.dim() == 2 else 0) if has_mask else 0
    reward = dense_reward if has_reward else logits
    stride_reward = reward.stride(0) if has_reward else 0
    warps = 4 if block <= 1024 else 8
    few = min(32, max(2, kp // 4))   # winners of a tile inserted one by one before sorting pays off
    # enable_fp_fusion=False: no fused multiply-add, so scores round exactly like the torch reference.
    # It is a Triton launch option, not a kernel argument: traced (torch.compile), Inductor compiles
    # the kernels with its own options, so the option is left out there (scores may then differ from
    # eager in the last bit: untested on a GPU).
    tracing = _tracing()
    fusion = {} if tracing else {"enable_fp_fusion": False}
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        _wrap(_safe_topk_partial_kernel, tracing)[(B, ns)](
            logits, logits.stride(0),
            bias, pos, float(bias_scale),
            mask, stride_mask,
            reward, stride_reward, float(reward_weight),
            float(temperature),
            cand, part_m, part_s, part_flag,
            V, slice_len, ns,
            KP=kp, LOG_KP=kp.bit_length() - 1, BLOCK_V=block, LOG_BLOCK=block.bit_length() - 1,
            FEW=few, HAS_BIAS=has_bias, HAS_MASK=has_mask, HAS_REWARD=has_reward,
            num_warps=warps, **fusion,
        )
        _wrap(_safe_topk_merge_kernel, tracing)[(B,)](
            cand, part_m, part_s, part_flag,
            values, indices, lse,
            ns, k,
            KP=kp, LOG_KP=kp.bit_length() - 1, BLOCK_C=block_c, LOG_C=block_c.bit_length() - 1,
            FEW=few, SPLITS_P=max(2, triton.next_power_of_2(ns)),
            num_warps=4 if block_c <= 1024 else 8, **fusion,
        )
    return values, indices, lse


def _wrap(kernel, tracing: bool):
    """``wrap_triton(kernel)`` (what a triton_op must launch through) while tracing; the kernel
    itself when running eagerly, where the interpreter runs it (it cannot be traced) or torch has no
    ``wrap_triton``."""
    if _interpreted(kernel):
        if tracing:
            raise NotImplementedError(
                "fastsafe::safe_topk_triton: tracing (torch.compile, fake tensors) needs the compiled Triton "
                "kernels; under TRITON_INTERPRET=1 the kernels only run eagerly on real tensors")
        return kernel
    return kernel if _wrap_triton is None or not tracing else _wrap_triton(kernel)


def _interpreted(kernel) -> bool:
    return not isinstance(kernel, triton.runtime.jit.JITFunction)


_wrap_triton = getattr(torch.library, "wrap_triton", None)
if hasattr(torch.library, "triton_op"):
    _OP = torch.library.triton_op("fastsafe::safe_topk_triton", _launch, mutates_args=())
else:                          # pragma: no cover - torch < 2.6: an opaque custom op
    _OP = torch.library.custom_op("fastsafe::safe_topk_triton", _launch, mutates_args=())
    _OP.register_fake(safe_topk_fake)


def compile_for_gpu(arch: int = 90, k: int = 50, logits_dtype: str = "bf16", all_inputs: bool = True) -> dict:
    """Compile both kernels ahead of time for ``sm_<arch>`` (no GPU needed; run with TRITON_INTERPRET unset).

    A check that the kernels are valid for the GPU compiler, not only for the interpreter.
    ``logits_dtype`` is a Triton type name (``fp32``, ``fp16``, ``bf16``). Returns, per kernel, its
    shared memory bytes and cubin size.

    Example:
        >>> compile_for_gpu(90, k=50)["partial"]["cubin_bytes"] > 0      # doctest: +SKIP
        True
    """
    from triton.backends.compiler import GPUTarget
    from .aot import compile_kernel

    plan = plan_launch(8, 151936, k, torch.device("cpu"), block_v=max(1024, triton.next_power_of_2(k)))
    kp, block = plan["KP"], plan["BLOCK_V"]
    few = min(32, max(2, kp // 4))
    sig1 = dict(logits_ptr="*" + logits_dtype, stride_logits="i32", bias_ptr="*fp32", pos_ptr="*i64",
                bias_scale="fp32", mask_ptr="*i32", stride_mask="i32", reward_ptr="*" + logits_dtype,
                stride_reward="i32", reward_weight="fp32", temperature="fp32", cand_ptr="*i64",
                part_m_ptr="*fp32", part_s_ptr="*fp32", part_flag_ptr="*i32", V="i32", slice_len="i32",
                n_splits="i32")
    const1 = dict(KP=kp, LOG_KP=kp.bit_length() - 1, BLOCK_V=block, LOG_BLOCK=block.bit_length() - 1, FEW=few,
                  HAS_BIAS=all_inputs, HAS_MASK=all_inputs, HAS_REWARD=all_inputs)
    block_c = 2048
    sig2 = dict(cand_ptr="*i64", part_m_ptr="*fp32", part_s_ptr="*fp32", part_flag_ptr="*i32",
                values_ptr="*fp32", indices_ptr="*i64", lse_ptr="*fp32", n_splits="i32", k="i32")
    const2 = dict(KP=kp, LOG_KP=kp.bit_length() - 1, BLOCK_C=block_c, LOG_C=block_c.bit_length() - 1, FEW=few,
                  SPLITS_P=256)
    target = GPUTarget("cuda", arch, 32)
    out = {}
    kernels = (("partial", _safe_topk_partial_kernel, sig1, const1, 4 if block <= 1024 else 8),
               ("merge", _safe_topk_merge_kernel, sig2, const2, 8))
    for name, fn, sig, const, warps in kernels:
        compiled = compile_kernel(fn, sig, const, target, num_warps=warps, enable_fp_fusion=False)
        meta = compiled.metadata
        out[name] = {"shared": getattr(meta, "shared", None), "cubin_bytes": len(compiled.asm.get("cubin", b""))}
    return out

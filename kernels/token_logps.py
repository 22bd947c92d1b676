"""Triton kernels of ``fastsafe.training.token_logps`` (GPU; CPU under TRITON_INTERPRET=1).

Per-token ``log softmax(h @ W.T + b)[target] / temperature`` (plus, optionally, the
full-vocabulary ``KL(pi_ref || pi)`` and the entropy) without writing the ``[M, V]`` logits.

Forward, grid ``(cdiv(M, BLOCK_M), n_splits)``: a program owns ``BLOCK_M`` tokens and one slice
of the vocabulary. It walks the slice ``BLOCK_V`` columns at a time; each logit tile is a K-loop of
``tl.dot`` over ``H`` in ``BLOCK_K`` steps with fp32 accumulation. An online logsumexp keeps
``(max, sum exp(z - max))`` per token, plus the target logit, ``sum exp(z - max) * z`` (entropy)
and, with a reference, the reference ``(max, sum)`` and ``sum exp(zr - max_r) * (zr - z)`` (KL).
The partials of the ``n_splits`` slices (``[M, n_splits]`` floats each) are merged in torch:

    lse = logsumexp, log p(target) = z_target - lse, H = lse - E_p[z],
    KL(ref || pi) = E_ref[zr - z] - lse_ref + lse.

Backward, grid ``(cdiv(M, BLOCK_M), cdiv(V, BLOCK_V))``: each program recomputes its logit tile
(and the reference tile for the KL), forms

    dz = g_lp * (onehot(target) - p) + g_kl * (p - p_ref) - g_ent * p * (z - E_p[z])

for the per-token upstream gradients ``g_*`` (any sign, any value), divides by the temperature and
adds ``dz @ W`` into ``grad_hidden`` and ``dz.T @ h`` into ``grad_weight`` with fp32 atomics, in
``BLOCK_K`` slices of ``H``. Gradients are accumulated in fp32: ``grad_hidden`` in an ``[M, H]``
buffer, ``grad_weight`` one vocabulary chunk (``VOCAB_CHUNK`` rows, one launch each) at a time in
a ``[chunk, H]`` buffer cast into the parameter dtype, so no ``[V, H]`` fp32 buffer exists. The
reference side is constant (no gradient).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["TritonTokenLogps", "token_logps_triton_forward", "token_logps_triton_partials", "launch_config"]


@triton.jit
def _tile_logits(x_ptr, stride_x, w_ptr, stride_w, b_ptr, rows, row_ok, cols, col_ok, K, inv_temp,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 ``(x[rows] @ w[cols].T + b[cols]) * inv_temp`` as a ``[BLOCK_M, BLOCK_V]`` tile."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < K
        x = tl.load(x_ptr + rows64[:, None] * stride_x + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols64[:, None] * stride_w + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot mishandles bf16 operands: multiply their fp32 values
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    return acc * inv_temp


@triton.jit
def _round_like_gpu(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (round to nearest even), returned as fp32 (interpreter only)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _token_logps_fwd_kernel(
    h_ptr, stride_h, w_ptr, stride_w, b_ptr, t_ptr,
    rh_ptr, stride_rh, rw_ptr, stride_rw, rb_ptr,
    part_m_ptr, part_s_ptr, part_t_ptr, part_ez_ptr, part_rm_ptr, part_rs_ptr, part_rd_ptr,
    M, V, K, inv_temp, split_len, n_splits,
    HAS_BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_REF_BIAS: tl.constexpr, WANT_ENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, V)

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    s_i = tl.zeros([BLOCK_M], tl.float32)
    t_i = tl.zeros([BLOCK_M], tl.float32)
    ez_i = tl.zeros([BLOCK_M], tl.float32)
    rm_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    rs_i = tl.zeros([BLOCK_M], tl.float32)
    rd_i = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(lo, hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < hi
        z = _tile_logits(h_ptr, stride_h, w_ptr, stride_w, b_ptr, rows, row_ok, cols, col_ok, K, inv_temp,
                         HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PREC, UPCAST)
        # z stays finite in the padding columns; masks keep them out (no 0 * inf NaNs).
        m_new = tl.maximum(m_i, tl.max(tl.where(col_ok[None, :], z, -float("inf")), 1))
        alpha = tl.exp(m_i - m_new)
        e = tl.where(col_ok[None, :], tl.exp(z - m_new[:, None]), 0.0)
        s_i = s_i * alpha + tl.sum(e, 1)
        if WANT_ENT:
            ez_i = ez_i * alpha + tl.sum(e * z, 1)
        t_i += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
        if HAS_REF:
            zr = _tile_logits(rh_ptr, stride_rh, rw_ptr, stride_rw, rb_ptr, rows, row_ok, cols, col_ok, K,
                              inv_temp, HAS_REF_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PREC, UPCAST)
            rm_new = tl.maximum(rm_i, tl.max(tl.where(col_ok[None, :], zr, -float("inf")), 1))
            r_alpha = tl.exp(rm_i - rm_new)
            er = tl.where(col_ok[None, :], tl.exp(zr - rm_new[:, None]), 0.0)
            rs_i = rs_i * r_alpha + tl.sum(er, 1)
            rd_i = rd_i * r_alpha + tl.sum(er * (zr - z), 1)
            rm_i = rm_new
        m_i = m_new

    out = rows.to(tl.int64) * n_splits + split
    tl.store(part_m_ptr + out, m_i, mask=row_ok)
    tl.store(part_s_ptr + out, s_i, mask=row_ok)
    tl.store(part_t_ptr + out, t_i, mask=row_ok)
    if WANT_ENT:
        tl.store(part_ez_ptr + out, ez_i, mask=row_ok)
    if HAS_REF:
        tl.store(part_rm_ptr + out, rm_i, mask=row_ok)
        tl.store(part_rs_ptr + out, rs_i, mask=row_ok)
        tl.store(part_rd_ptr + out, rd_i, mask=row_ok)


@triton.jit
def _token_logps_bwd_kernel(
    h_ptr, stride_h, w_ptr, stride_w, b_ptr, t_ptr,
    rh_ptr, stride_rh, rw_ptr, stride_rw, rb_ptr,
    lse_ptr, rlse_ptr, ez_ptr, glp_ptr, gkl_ptr, gent_ptr,
    gh_ptr, gw_ptr, gb_ptr,
    M, v_lo, v_hi, K, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
    HAS_GLP: tl.constexpr, HAS_KL: tl.constexpr, HAS_ENT: tl.constexpr,
    NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < v_hi
    ok = row_ok[:, None] & col_ok[None, :]

    z = _tile_logits(h_ptr, stride_h, w_ptr, stride_w, b_ptr, rows, row_ok, cols, col_ok, K, inv_temp,
                     HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PREC, UPCAST)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    p = tl.where(ok, tl.exp(z - lse[:, None]), 0.0)
    dz = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    if HAS_GLP:
        tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
        g = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
        onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        dz += g[:, None] * (onehot - p)
    if HAS_KL:
        zr = _tile_logits(rh_ptr, stride_rh, rw_ptr, stride_rw, rb_ptr, rows, row_ok, cols, col_ok, K,
                          inv_temp, HAS_REF_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PREC, UPCAST)
        rlse = tl.load(rlse_ptr + rows, mask=row_ok, other=0.0)
        pr = tl.where(ok, tl.exp(zr - rlse[:, None]), 0.0)
        gk = tl.load(gkl_ptr + rows, mask=row_ok, other=0.0)
        dz += gk[:, None] * (p - pr)
    if HAS_ENT:
        ez = tl.load(ez_ptr + rows, mask=row_ok, other=0.0)
        ge = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        dz -= ge[:, None] * p * (z - ez[:, None])
    dz = tl.where(ok, dz, 0.0) * inv_temp

    if NEED_B:
        tl.atomic_add(gb_ptr + cols, tl.sum(dz, 0), mask=col_ok)
    if UPCAST:
        # The interpreter truncates fp32 -> bf16 casts; round to nearest even as the GPU does.
        dzc = _round_like_gpu(dz, h_ptr.dtype.element_ty)
    else:
        dzc = dz.to(h_ptr.dtype.element_ty)  # the MMA operand dtype
    ks = tl.arange(0, BLOCK_K)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < K
        if NEED_H:
            w = tl.load(w_ptr + cols64[:, None] * stride_w + kk[None, :], mask=col_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            gh = tl.dot(dzc, w, input_precision=PREC)
            tl.atomic_add(gh_ptr + rows64[:, None] * K + kk[None, :], gh, mask=row_ok[:, None] & k_ok[None, :])
        if NEED_W:
            x = tl.load(h_ptr + rows64[:, None] * stride_h + kk[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
            gw = tl.dot(tl.trans(dzc), x, input_precision=PREC)
            # gw_ptr is the fp32 accumulator of this vocabulary chunk (rows v_lo..v_hi-1)
            tl.atomic_add(gw_ptr + (cols64 - v_lo)[:, None] * K + kk[None, :], gw, mask=col_ok[:, None] & k_ok[None, :])


def _interpreted(device: torch.device) -> bool:
    return device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_config(dtype: torch.dtype, device) -> dict:
    """Block sizes and launch options for ``dtype`` on ``device`` (small tiles under the interpreter)."""
    if _interpreted(device):
        # a small vocabulary chunk so the tests cross chunk edges
        return dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=16, num_warps=1, num_stages=1, VOCAB_CHUNK=64)
    if dtype == torch.float32:  # exact fp32 (input_precision="ieee") dots: smaller tiles
        return dict(BLOCK_M=32, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=2, VOCAB_CHUNK=16384)
    return dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3, VOCAB_CHUNK=16384)


def _n_splits(M: int, V: int, cfg: dict, device: torch.device) -> int:
    v_blocks = triton.cdiv(V, cfg["BLOCK_V"])
    m_blocks = max(1, triton.cdiv(M, cfg["BLOCK_M"]))
    if _interpreted(device):
        want = 2  # exercise the merge of the split partials in the tests
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(2 * sms, m_blocks)
    return max(1, min(want, v_blocks))


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"hidden: the triton backend takes float32, float16 or bfloat16, got {t.dtype}; "
                        f"use backend='torch' for {t.dtype}")


def _rowmajor(t):
    return None if t is None else (t if t.stride(-1) == 1 else t.contiguous())


def token_logps_triton_partials(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias,
                                temperature: float, want_entropy: bool, *, n_splits=None, config=None):
    """Forward kernel on packed tokens: ``(m, s, t, ez, rm, rs, rd)``, fp32 ``[M, S]`` per-split
    partials (``ez`` None without ``want_entropy``, the ``r*`` None without ``ref_hidden``), the
    input of ``fastsafe.training.token_logps_merge.merge_partials``. A target outside
    ``[0, V)`` (held by another rank's shard) adds nothing to ``t``."""
    _check_dtype(hidden)
    M, K = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    has_ref = ref_hidden is not None
    f32 = dict(dtype=torch.float32, device=dev)
    empty = torch.empty(0, **f32)
    cfg = dict(config or launch_config(hidden.dtype, dev))
    S = n_splits or _n_splits(M, V, cfg, dev)
    split_len = triton.cdiv(triton.cdiv(V, S), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
    S = triton.cdiv(V, split_len)
    parts = {k: torch.empty(M, S, **f32) for k in ("m", "s", "t")}
    parts["ez"] = torch.empty(M, S, **f32) if want_entropy else empty
    for k in ("rm", "rs", "rd"):
        parts[k] = torch.empty(M, S, **f32) if has_ref else empty
    if M > 0:
        hidden, weight, bias = _rowmajor(hidden), _rowmajor(weight), _rowmajor(bias)
        ref_hidden, ref_weight, ref_bias = _rowmajor(ref_hidden), _rowmajor(ref_weight), _rowmajor(ref_bias)
        rh = ref_hidden if has_ref else hidden
        rw = ref_weight if has_ref else weight
        prec = "ieee" if hidden.dtype == torch.float32 else "tf32"
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), S)
        _token_logps_fwd_kernel[grid](
            hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else weight, targets,
            rh, rh.stride(0), rw, rw.stride(0), ref_bias if ref_bias is not None else rw,
            parts["m"], parts["s"], parts["t"], parts["ez"], parts["rm"], parts["rs"], parts["rd"],
            M, V, K, 1.0 / temperature, split_len, S,
            HAS_BIAS=bias is not None, HAS_REF=has_ref, HAS_REF_BIAS=has_ref and ref_bias is not None,
            WANT_ENT=bool(want_entropy), BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"],
            PREC=prec, UPCAST=_interpreted(dev), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return (parts["m"], parts["s"], parts["t"], parts["ez"] if want_entropy else None,
            *((parts[k] for k in ("rm", "rs", "rd")) if has_ref else (None, None, None)))


def token_logps_triton_forward(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias,
                               temperature: float, want_entropy: bool, *, n_splits=None, config=None,
                               group=None):
    """Forward of the Triton path on packed tokens: ``(logp, kl, entropy, lse, ref_lse, mean_z)``, fp32 ``[M]``.

    ``kl`` / ``ref_lse`` are empty without ``ref_hidden``; ``entropy`` / ``mean_z`` without
    ``want_entropy``. With a process ``group`` the splits of every rank's shard are merged.
    """
    from fastsafe.training.token_logps_merge import merge_partials
    parts = token_logps_triton_partials(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias,
                                        temperature, want_entropy, n_splits=n_splits, config=config)
    return merge_partials(*parts, group=group)


class TritonTokenLogps(torch.autograd.Function):
    """The Triton path of ``token_logps`` on packed active tokens.

    ``forward(hidden [M, H], weight [V, H], bias [V] | None, targets [M] int, ref_hidden [M, H] | None,
    ref_weight [V, H] | None, ref_bias [V] | None, temperature, want_entropy, group=None)`` returns
    fp32 ``(logp [M], kl [M] | empty, entropy [M] | empty)``; with a process ``group`` see
    ``fastsafe.training.token_logps.ChunkedTokenLogps`` (vocabulary-parallel shards). Backward takes a gradient per token for
    each output and returns gradients for ``hidden``, ``weight`` and ``bias`` (fp32-accumulated).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, temperature, want_entropy,
                group=None):
        targets = targets.contiguous()
        lp, kl, ent, lse, ref_lse, mean_z = token_logps_triton_forward(
            hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, temperature, want_entropy, group=group)
        ctx.group = group
        ctx.save_for_backward(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse, ref_lse, mean_z)
        ctx.temperature = temperature
        ctx.want_kl = ref_hidden is not None
        ctx.want_entropy = bool(want_entropy)
        if not ctx.want_kl:
            ctx.mark_non_differentiable(kl)
        if not ctx.want_entropy:
            ctx.mark_non_differentiable(ent)
        return lp, kl, ent

    @staticmethod
    def backward(ctx, g_lp, g_kl, g_ent):
        hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse, ref_lse, mean_z = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_b = need_b and bias is not None
        M, K = hidden.shape
        V = weight.shape[0]
        dev = hidden.device
        f32 = dict(dtype=torch.float32, device=dev)
        gh = torch.zeros(M, K, **f32) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = torch.zeros(V, **f32) if need_b else None
        use_kl = ctx.want_kl and g_kl is not None
        use_ent = ctx.want_entropy and g_ent is not None
        if M > 0 and (need_h or need_w or need_b) and (g_lp is not None or use_kl or use_ent):
            cfg = launch_config(hidden.dtype, dev)
            hidden, weight, bias = _rowmajor(hidden), _rowmajor(weight), _rowmajor(bias)
            rh = _rowmajor(ref_hidden) if use_kl else hidden
            rw = _rowmajor(ref_weight) if use_kl else weight
            rb = _rowmajor(ref_bias) if (use_kl and ref_bias is not None) else None
            dummy = torch.empty(0, **f32)
            prec = "ieee" if hidden.dtype == torch.float32 else "tf32"
            glp = g_lp.float().contiguous() if g_lp is not None else dummy
            gkl = g_kl.float().contiguous() if use_kl else dummy
            gent = g_ent.float().contiguous() if use_ent else dummy
            # The weight gradient is summed in fp32 one vocabulary chunk at a time (a [chunk, H]
            # buffer, then cast into the parameter dtype), so no [V, H] fp32 buffer is needed.
            chunk = cfg["VOCAB_CHUNK"]
            gw_acc = torch.empty(min(chunk, V), K, **f32) if need_w else dummy
            for v_lo in range(0, V, chunk):
                v_hi = min(V, v_lo + chunk)
                if need_w:
                    gw_acc.zero_()
                grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(v_hi - v_lo, cfg["BLOCK_V"]))
                _token_logps_bwd_kernel[grid](
                    hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else weight,
                    targets, rh, rh.stride(0), rw, rw.stride(0), rb if rb is not None else rw,
                    lse, ref_lse if use_kl else dummy, mean_z if use_ent else dummy, glp, gkl, gent,
                    gh if need_h else dummy, gw_acc, gb if need_b else dummy,
                    M, v_lo, v_hi, K, 1.0 / ctx.temperature,
                    HAS_BIAS=bias is not None, HAS_REF_BIAS=rb is not None,
                    HAS_GLP=g_lp is not None, HAS_KL=use_kl, HAS_ENT=use_ent,
                    NEED_H=need_h, NEED_W=need_w, NEED_B=need_b,
                    BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"], PREC=prec,
                    UPCAST=_interpreted(dev), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                )
                if need_w:
                    gw[v_lo:v_hi].copy_(gw_acc[: v_hi - v_lo])
        from fastsafe.training.token_logps_merge import reduce_hidden_grad
        reduce_hidden_grad(gh, getattr(ctx, "group", None))
        return (None if gh is None else gh.to(hidden.dtype), gw,
                None if gb is None else gb.to(bias.dtype), None, None, None, None, None, None, None)

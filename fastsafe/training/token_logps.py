"""Fused per-token log-probabilities from hidden states and the lm_head weight.

``token_logps`` never builds the ``[N*T, V]`` logits. Two backends compute it:

- ``torch``: a tiled PyTorch path (any device; the default on CPU tensors). Forward and backward
  walk ``[tokens, vocabulary]`` tiles of at most 4096 vocabulary columns and about
  ``chunk_size * V`` elements (by default 1 MiB of fp32 on the CPU with one thread, 16 MiB with
  more); the forward folds each tile
  into running per-token partials (online logsumexp), the backward recomputes the tile's logits.
  Extra memory: a few tiles, the fp32 hidden-state gradient accumulator (``[M, H]``) and, for a
  low-precision weight, one ``[min(V, 4096), H]`` fp32 buffer (an fp32 weight's gradient is
  accumulated in place in the output); no ``[V, H]`` fp32 copy, no packed copy of the hidden
  states (the active rows are indexed tile by tile).
- ``triton``: Triton kernels (``kernels/token_logps.py``) that tile tokens and vocabulary with an
  online logsumexp, forward and backward, accumulating gradients in fp32. The default on CUDA
  tensors; on the CPU only when asked for with ``backend="triton"`` and ``TRITON_INTERPRET=1``.

Both are ``torch.autograd.Function``s whose backward takes a gradient per token for each output
(log-prob, KL, entropy), of any sign and value, so per-token weights and signed masks compose.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastsafe.ops.dispatch import OPS, backend_for

from ._checks import (acc_dtype, check_active, check_float, check_int_tensor, check_real, check_same_device,
                      check_targets)
from .token_logps_merge import merge_partials, reduce_hidden_grad
from .token_logps_vocab_parallel import vocab_shard

__all__ = ["token_logps", "token_logps_backend", "default_chunk_size", "TOKEN_LOGPS_BACKENDS"]

TOKEN_LOGPS_BACKENDS = OPS["token_logps"].backends
# Elements of one [ct, cv] tile of the torch path (chunk_size * V). On the CPU with one thread,
# 1 MiB of fp32: the tile stays in cache (V=65536, NT=2048 fwd+bwd: 1.2 s vs 2.3 s at 4 MiB and
# 2.8 s at 64 MiB). With several intra-op threads every small op is a parallel region whose
# barrier costs more than the op (badly so on a shared machine), so tiles are 16 MiB there. GPUs:
# 64 MiB (fewer, larger kernels). A few tiles are alive at once.
_TILE_ELEMENTS_CPU_ONE_THREAD = 1 << 18
_TILE_ELEMENTS_CPU_THREADS = 1 << 22
_TILE_ELEMENTS_OTHER = 1 << 24


def default_chunk_size(num_tokens: int, vocab_size: int, device_type: str = "cpu") -> int:
    """``chunk_size`` of the torch path: rows of ``vocab_size`` logits per tile, between 1 and 4096.

    A tile holds about ``chunk_size * vocab_size`` logits, cut into at most 4096 vocabulary
    columns (:func:`backward_tile`): ``2**18`` (1 MiB fp32) on the CPU with one torch thread,
    ``2**22`` with more, ``2**24`` on other devices.
    """
    if device_type == "cpu":
        budget = _TILE_ELEMENTS_CPU_ONE_THREAD if torch.get_num_threads() == 1 else _TILE_ELEMENTS_CPU_THREADS
    else:
        budget = _TILE_ELEMENTS_OTHER
    c = max(1, min(4096, budget // max(1, vocab_size)))
    return max(1, min(c, num_tokens))


def token_logps_backend(tensor: torch.Tensor, backend: Optional[str] = None) -> str:
    """Name of the backend :func:`token_logps` uses for ``tensor``'s device.

    A thin alias of ``fastsafe.ops.backend_for(tensor, backend, op="token_logps")``: one registry
    and one override rule (``backend=``, else ``FASTSAFE_BACKEND``) serve every op.
    ``backend=None`` picks ``"triton"`` for CUDA tensors when Triton is importable, else
    ``"torch"``. CPU tensors always default to ``"torch"`` (even with ``TRITON_INTERPRET=1``);
    ``backend="triton"`` forces the kernels (on the CPU this needs ``TRITON_INTERPRET=1``).

    Example:
        >>> token_logps_backend(torch.zeros(2, 8))
        'torch'
    """
    return backend_for(tensor, backend, op="token_logps")


# ----------------------------------------------------------------------------------------------
# torch backend: chunked over tokens
# ----------------------------------------------------------------------------------------------

def _chunk_logits(h, weight, bias, inv_temp, acc):
    """``(h @ weight.T + bias) / temperature`` in ``acc``: one new ``[rows, cols]`` buffer (two for a
    low-precision ``h``: the product, then its ``acc`` copy)."""
    z = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
    z = z.to(acc)
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    return z


def _rows(x, rows, s, e):
    """Rows ``s:e`` of the packed tokens: ``x[s:e]``, or ``x[rows[s:e]]`` when ``rows`` indexes ``x``."""
    return x[s:e] if rows is None else x.index_select(0, rows[s:e])


def _fold(run, tile, first):
    """Merge a vocabulary tile's ``(max, sums...)`` partials into the running ones, in place."""
    m_run, sums_run = run
    m_tile, sums_tile = tile
    if first:
        m_run.copy_(m_tile)
        for a, b in zip(sums_run, sums_tile):
            a.copy_(b)
        return
    m_new = torch.maximum(m_run, m_tile)
    keep, add = torch.exp(m_run - m_new), torch.exp(m_tile - m_new)
    for a, b in zip(sums_run, sums_tile):
        a.mul_(keep).add_(b * add)
    m_run.copy_(m_new)


def chunked_partials(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, temperature: float,
                     chunk_size: int, want_entropy: bool, rows=None):
    """Per-token partials of the torch path over ``weight``'s rows, tile by tile.

    Tiles are ``backward_tile(M, V, chunk_size)``: at most 4096 vocabulary columns and about
    ``chunk_size * V`` elements; each tile's partials are folded into running ``[M]`` partials
    (online logsumexp), so the extra memory is a few tiles, whatever ``V``. ``targets`` are row
    indices into ``weight``; one outside ``[0, V)`` (a target held by another rank's shard) adds
    nothing to ``t``. ``rows`` (optional ``[M]`` int64) says which rows of ``hidden`` /
    ``ref_hidden`` are the ``M`` tokens (no packed copy is made). Returns ``(m, s, t, ez, rm, rs,
    rd)`` as ``[M, 1]`` tensors of the accumulation dtype (``ez`` None without ``want_entropy``, the
    ``r*`` None without ``ref_hidden``), the input of
    :func:`~fastsafe.training.token_logps_merge.merge_partials`.
    """
    M = targets.shape[0]
    V = weight.shape[0]
    acc = acc_dtype(hidden)
    inv_temp = 1.0 / temperature
    want_kl = ref_hidden is not None

    def buf(on=True):
        return torch.zeros(M, dtype=acc, device=hidden.device) if on else None

    m, s, t, ez = buf(), buf(), buf(), buf(want_entropy)
    rm, rs, rd = buf(want_kl), buf(want_kl), buf(want_kl)
    zero = torch.zeros((), dtype=acc, device=hidden.device)
    cv, ct = backward_tile(M, V, chunk_size)
    for v0 in range(0, V, cv):
        v1 = min(V, v0 + cv)
        w_c = weight[v0:v1]
        b_c = None if bias is None else bias[v0:v1]
        for c0 in range(0, M, ct):
            c1 = min(M, c0 + ct)
            z = _chunk_logits(_rows(hidden, rows, c0, c1), w_c, b_c, inv_temp, acc)     # [ct, cv]
            c_m = z.amax(dim=1)
            e = torch.sub(z, c_m[:, None]).exp_()
            local = targets[c0:c1] - v0
            inside = (local >= 0) & (local < v1 - v0)
            t[c0:c1] += torch.where(inside, z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None])[:, 0], zero)
            sums = [e.sum(1)]
            if want_entropy:
                sums.append(e.mul_(z).sum(1))
            del e
            _fold((m[c0:c1], [x[c0:c1] for x in (s, ez) if x is not None]), (c_m, sums), v0 == 0)
            if want_kl:
                zr = _chunk_logits(_rows(ref_hidden, rows, c0, c1), ref_weight[v0:v1],
                                   None if ref_bias is None else ref_bias[v0:v1], inv_temp, acc)
                r_m = zr.amax(dim=1)
                er = torch.sub(zr, r_m[:, None]).exp_()
                r_sums = [er.sum(1), er.mul_(zr.sub_(z)).sum(1)]
                del zr, er
                _fold((rm[c0:c1], [rs[c0:c1], rd[c0:c1]]), (r_m, r_sums), v0 == 0)
            del z
    col = [None if x is None else x[:, None] for x in (m, s, t, ez, rm, rs, rd)]
    return tuple(col)


class ChunkedTokenLogps(torch.autograd.Function):
    """Chunked log-softmax-and-gather (plus optional KL and entropy) over packed active tokens.

    ``forward(hidden [M, H], weight [V, H], bias [V] | None, targets [M], ref_hidden [M, H] | None,
    ref_weight [V, H] | None, ref_bias [V] | None, temperature, chunk_size, want_entropy,
    group=None, rows=None)`` returns ``(logp [M], kl [M] | empty, entropy [M] | empty)`` in float32
    (float64 for float64 inputs). The reference side is constant: it gets no gradient. With
    ``rows`` (``[M]`` int64), ``hidden`` / ``ref_hidden`` are ``[M_all, H]`` and the tokens are their
    rows ``rows``: nothing is copied, and the hidden-state gradient is ``[M_all, H]`` (0 elsewhere).

    Memory: the forward and the backward walk ``[ct, cv]`` tiles (:func:`backward_tile`), a few
    alive at once; the backward accumulates the weight gradient in place in its output (fp32
    weights; one ``[cv, H]`` fp32 buffer otherwise) and the hidden-state gradient in one ``[M, H]``
    buffer of the accumulation dtype.

    With a process ``group``, ``weight`` / ``bias`` (and ``ref_weight`` / ``ref_bias``) are this
    rank's rows of a vocabulary-parallel lm_head and ``targets`` are relative to this rank's first
    row: the logsumexps are merged across the group, and the backward sums the hidden-state
    gradient over the group (each rank keeps its shard's weight gradient).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias,
                temperature, chunk_size, want_entropy, group=None, rows=None):
        want_kl = ref_hidden is not None
        parts = chunked_partials(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias,
                                 temperature, chunk_size, want_entropy, rows)
        lp, kl, ent, lse, ref_lse, mean_z = merge_partials(*parts, group=group)
        ctx.save_for_backward(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias,
                              lse, ref_lse, mean_z, rows)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.want_kl = want_kl
        ctx.want_entropy = want_entropy
        ctx.group = group
        if not want_kl:
            ctx.mark_non_differentiable(kl)
        if not want_entropy:
            ctx.mark_non_differentiable(ent)
        return lp, kl, ent

    @staticmethod
    def backward(ctx, g_lp, g_kl, g_ent):
        (hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias,
         lse, ref_lse, mean_z, *rest) = ctx.saved_tensors
        rows = rest[0] if rest else None
        M, H = targets.shape[0], hidden.shape[1]
        V = weight.shape[0]
        acc = acc_dtype(hidden)
        low = hidden.dtype != acc
        inv_temp = 1.0 / ctx.temperature
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_b = need_b and bias is not None
        use_kl = ctx.want_kl and g_kl is not None
        use_ent = ctx.want_entropy and g_ent is not None
        dev = hidden.device
        # Gradients are accumulated in fp32 (fp64 for fp64 inputs): grad_hidden in one buffer over
        # the vocabulary chunks (hidden's rows: [M_all, H] with rows=), grad_weight per vocabulary
        # chunk over the token tiles, in place in the output when the weight is in the
        # accumulation dtype (else in one [cv, H] buffer): no [V, H] fp32 copy.
        grad_h = torch.zeros(hidden.shape[0], H, dtype=acc, device=dev) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty(V, dtype=acc, device=dev) if need_b else None
        if M == 0 or not (need_h or need_w or need_b) or (g_lp is None and not use_kl and not use_ent):
            if grad_w is not None:
                grad_w.zero_()
            if grad_b is not None:
                grad_b.zero_()
        else:
            cv, ct = backward_tile(M, V, ctx.chunk_size)
            gl = None if g_lp is None else g_lp.to(acc)
            gk = g_kl.to(acc) if use_kl else None
            ge = g_ent.to(acc) if use_ent else None
            w_in_place = need_w and weight.dtype == acc
            for v0 in range(0, V, cv):
                v1 = min(V, v0 + cv)
                w_c = weight[v0:v1]
                b_c = None if bias is None else bias[v0:v1]
                w_c_acc = w_c.to(acc) if (need_h and low) else w_c
                if w_in_place:
                    acc_w = grad_w[v0:v1].zero_()
                else:
                    acc_w = torch.zeros(v1 - v0, H, dtype=acc, device=dev) if need_w else None
                acc_b = grad_b[v0:v1].zero_() if need_b else None
                for s in range(0, M, ct):
                    e = min(M, s + ct)
                    h = _rows(hidden, rows, s, e)
                    z = _chunk_logits(h, w_c, b_c, inv_temp, acc)            # [ct, cv]
                    if use_ent:
                        p = torch.sub(z, lse[s:e, None]).exp_()
                        z.sub_(mean_z[s:e, None]).mul_(p)                      # p * (z - E_p[z])
                    else:
                        p = z.sub_(lse[s:e, None]).exp_()                      # in place: z is not needed
                    # dz = g_lp * (onehot - p) + g_kl * (p - p_ref) - g_ent * p * (z - E_p[z])
                    coef = -gl[s:e] if gl is not None else torch.zeros(e - s, dtype=acc, device=dev)
                    if use_kl:
                        coef = coef + gk[s:e]
                        zr = _chunk_logits(_rows(ref_hidden, rows, s, e), ref_weight[v0:v1],
                                           None if ref_bias is None else ref_bias[v0:v1], inv_temp, acc)
                        pr = zr.sub_(ref_lse[s:e, None]).exp_()
                    if use_ent:
                        dz = p.mul_(coef[:, None]).sub_(z.mul_(ge[s:e, None]))
                    else:
                        dz = p.mul_(coef[:, None])
                    del z, p
                    if use_kl:
                        dz.sub_(pr.mul_(gk[s:e, None]))
                        del zr, pr
                    if gl is not None:
                        local = targets[s:e] - v0
                        inside = (local >= 0) & (local < v1 - v0)
                        dz.scatter_add_(1, local.clamp(0, v1 - v0 - 1)[:, None],
                                        torch.where(inside, gl[s:e], torch.zeros((), dtype=acc, device=dev))[:, None])
                    if inv_temp != 1.0:
                        dz.mul_(inv_temp)
                    if acc_b is not None:
                        acc_b.add_(dz.sum(0))
                    if need_h:
                        if rows is None:
                            grad_h[s:e].addmm_(dz, w_c_acc)
                        else:
                            grad_h.index_add_(0, rows[s:e], dz @ w_c_acc)
                    if need_w:
                        acc_w.addmm_(dz.t(), h.to(acc) if low else h)
                    del dz
                if need_w and not w_in_place:
                    grad_w[v0:v1] = acc_w.to(weight.dtype)
        reduce_hidden_grad(grad_h, getattr(ctx, "group", None))
        return (None if grad_h is None else grad_h.to(hidden.dtype), grad_w,
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None, None, None,
                None)


def backward_tile(num_tokens: int, vocab_size: int, chunk_size: int):
    """``(vocab_cols, token_rows)`` of one backward tile: at most 4096 columns and about
    ``chunk_size * vocab_size`` elements, the forward chunk's budget."""
    cv = min(vocab_size, 4096)
    ct = max(1, min(num_tokens, (chunk_size * vocab_size) // cv))
    return cv, ct


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------

def _check_not_sharded(name, t):
    """Refuse an lm_head weight that a sharding engine holds outside its module's forward."""
    if t is None:
        return
    if type(t).__name__ == "DTensor":
        raise TypeError(f"{name}: got a DTensor (placements {getattr(t, 'placements', '?')}), e.g. an FSDP2 "
                        f"(fully_shard) parameter read outside its module's forward; compute the loss inside the "
                        f"forward with fastsafe.training.run_in_forward(model, loss_fn, ...) so the engine gathers "
                        f"it, or pass a plain tensor (vocabulary shards: process_group=)")
    if hasattr(t, "ds_status") and t.numel() == 0:
        raise TypeError(f"{name}: got a DeepSpeed ZeRO-3 partitioned parameter (an empty placeholder of shape "
                        f"{list(getattr(t, 'ds_shape', t.shape))}); run the loss inside the lm_head's forward with "
                        f"fastsafe.training.run_in_forward(model.lm_head, loss_fn, ...), or gather it with "
                        f"deepspeed.zero.GatheredParameters for a computation without gradient")


def _check_lm_head(name_w, weight, name_b, bias, hidden, name_h):
    _check_not_sharded(name_w, weight)
    check_float(name_w, weight, ndims=(2,))
    check_same_device(name_w, weight, hidden, name_h)
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(f"{name_w}: expected shape [V, H] with H = {H} (the last dim of {name_h}), "
                         f"got {list(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{name_w}: expected a vocabulary size V >= 1, got shape {list(weight.shape)}")
    if bias is not None:
        check_float(name_b, bias, ndims=(1,))
        check_same_device(name_b, bias, hidden, name_h)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{name_b}: expected shape [V] = [{weight.shape[0]}], got {list(bias.shape)}")


def _harmonise_dtypes(pairs):
    """Same dtype for hidden, weight and bias, or the autocast dtype when autocast is on."""
    device_type = pairs[0][1].device.type
    dtypes = {t.dtype for _, t in pairs if t is not None}
    if len(dtypes) == 1:
        return [t for _, t in pairs]
    if torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        return [None if t is None else t.to(dt) for _, t in pairs]
    desc = ", ".join(f"{n} {t.dtype}" for n, t in pairs if t is not None)
    raise TypeError(f"{pairs[0][0]}: expected one dtype for {', '.join(n for n, t in pairs if t is not None)} "
                    f"(or an enabled torch.autocast that casts them), got {desc}; cast them with .to(dtype)")


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: Optional[torch.Tensor] = None, ignore_index: int = -100, temperature: float = 1.0, *,
                active: Optional[torch.Tensor] = None,
                ref_hidden: Optional[torch.Tensor] = None, ref_weight: Optional[torch.Tensor] = None,
                ref_bias: Optional[torch.Tensor] = None, return_kl: bool = False,
                return_entropy: bool = False, chunk_size: Optional[int] = None,
                backend: Optional[str] = None, process_group=None, vocab_size: Optional[int] = None):
    """Per-token ``log p(target)`` from hidden states and the lm_head, without materialising logits.

    ``logits = (hidden @ weight.T + bias) / temperature``; returns ``log_softmax(logits)[target]``.

    Args:
        hidden: ``[N, T, H]`` or ``[M, H]``, float32 / bfloat16 / float16 (float64 for gradcheck).
        weight: ``[V, H]`` lm_head weight, same dtype as ``hidden`` (a bf16 ``hidden`` with an fp32
            ``weight`` is a TypeError unless ``torch.autocast`` is enabled, which casts both to the
            autocast dtype).
        targets: ``[N, T]`` (or ``[M]``) integer token ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` lm_head bias.
        ignore_index: target value of positions to skip (output 0, no gradient).
        temperature: logits are divided by it (> 0), for the policy and the reference alike.
        active: optional mask of ``targets``' shape (bool, or any dtype: nonzero = active, so a
            per-token weight tensor can be passed as is). Inactive positions are packed out before
            the matmul, so cost scales with the active tokens; their outputs are 0.
        ref_hidden, ref_weight, ref_bias: the reference model's hidden states (``hidden``'s shape)
            and lm_head. ``ref_weight=None`` reuses ``weight`` and ``bias``. Constants: no gradient.
        return_kl: also return the full-vocabulary ``KL(pi_ref || pi)`` per position, computed
            from logsumexps (needs ``ref_hidden``). Differentiable w.r.t. the policy side.
        return_entropy: also return the policy entropy per position (differentiable).
        chunk_size: the torch path's tile size in rows of ``V`` logits (default
            :func:`default_chunk_size`: 1 MiB fp32 tiles on the CPU with one thread).
        backend: ``None`` (Triton on CUDA, torch on CPU; ``FASTSAFE_BACKEND`` overrides, see
            :mod:`fastsafe.ops.dispatch`), ``"torch"`` or ``"triton"``.
        process_group: vocabulary parallelism (a column-parallel lm_head, as in Megatron or
            torchtitan). Each rank of the ``torch.distributed`` group passes the same ``hidden``,
            ``targets``, ``active`` (and ``ref_hidden``) and its own contiguous block of the
            lm_head's rows as ``weight`` ``[V_r, H]`` (``bias`` ``[V_r]``, ``ref_weight``
            ``[V_r, H]``, ``ref_bias``): rank 0 the first rows, then rank 1, ...; blocks may be
            uneven. ``targets`` are global ids. The logsumexps (and the entropy and KL sums) are
            merged across the group, the target logit comes from the rank holding it, and every
            rank gets the same outputs. The backward gives each rank its shard's weight (and bias)
            gradient and the full hidden-state gradient, summed over the group (so do not also
            all-reduce it, e.g. with Megatron's copy-to-parallel-region). One all-gather of the
            shard sizes per call checks the layout; mismatched shards fail on every rank.
        vocab_size: the global vocabulary size, checked against the sum of the shards (or
            ``weight``'s rows without ``process_group``); ``None`` derives it.

    Returns:
        ``lp`` of ``targets``' shape, float32 (float64 for float64 inputs), 0 at ignored and
        inactive positions; or a tuple ``(lp, kl)``, ``(lp, entropy)`` or ``(lp, kl, entropy)``.
        The backward accepts any per-token upstream gradient for each output; gradients flow to
        ``hidden``, ``weight`` and ``bias`` (the weight gradient is accumulated in fp32).

    Example:
        >>> h, w = torch.randn(2, 6, 16), torch.randn(50, 16, requires_grad=True)
        >>> t = torch.randint(0, 50, (2, 6)); t[1, 4:] = -100
        >>> lp = token_logps(h, w, t)                       # [2, 6] float32, lp[1, 4:] == 0
        >>> (lp * torch.randn(2, 6)).sum().backward()        # any per-token weights
        >>> lp, kl = token_logps(h, w, t, ref_hidden=h + 0.1, ref_weight=w.detach(), return_kl=True)
    """
    check_float("hidden", hidden, ndims=(2, 3))
    H = hidden.shape[-1]
    check_int_tensor("targets", targets)
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets: expected shape {list(hidden.shape[:-1])} (hidden's shape without H), "
                         f"got {list(targets.shape)}")
    check_same_device("targets", targets, hidden, "hidden")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size < 1):
        raise ValueError(f"vocab_size: expected an int >= 1 or None, got {vocab_size!r}")
    shard = None
    if process_group is not None:
        _check_not_sharded("weight", weight)
        check_float("weight", weight, ndims=(2,))
        # Before any check that compares weight with hidden: a bad shard must fail on every rank.
        shard = vocab_shard(process_group, weight, hidden, targets, bias, ref_hidden, ref_weight, ref_bias,
                            return_kl, return_entropy, vocab_size)
    _check_lm_head("weight", weight, "bias", bias, hidden, "hidden")
    V = weight.shape[0]
    V_all = shard.vocab_size if shard is not None else V
    if shard is None and vocab_size is not None and vocab_size != V:
        raise ValueError(f"vocab_size: expected weight's rows V = {V} (or pass process_group for a "
                         f"vocabulary-parallel shard), got {vocab_size}")
    temperature = check_real("temperature", temperature, positive=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected an int >= 1 or None, got {chunk_size!r}")
    if return_kl and ref_hidden is None:
        raise ValueError("ref_hidden: required when return_kl=True (the reference model's hidden states, "
                         f"shape {list(hidden.shape)}), got None")
    if ref_hidden is not None and not return_kl:
        raise ValueError("ref_hidden: only used for the KL; pass return_kl=True with it (or drop it)")
    if ref_hidden is not None:
        check_float("ref_hidden", ref_hidden)
        if ref_hidden.shape != hidden.shape:
            raise ValueError(f"ref_hidden: expected hidden's shape {list(hidden.shape)}, got {list(ref_hidden.shape)}")
        check_same_device("ref_hidden", ref_hidden, hidden, "hidden")
        if ref_weight is None:
            ref_weight, ref_bias = weight.detach(), (None if bias is None else bias.detach())
        else:
            _check_lm_head("ref_weight", ref_weight, "ref_bias", ref_bias, hidden, "hidden")
            if ref_weight.shape[0] != V:
                raise ValueError(f"ref_weight: expected V = {V} rows (weight's vocabulary), "
                                 f"got {list(ref_weight.shape)}")
    elif ref_weight is not None or ref_bias is not None:
        raise ValueError("ref_weight: only used with ref_hidden and return_kl=True, got a tensor without ref_hidden")

    hidden, weight, bias = _harmonise_dtypes([("hidden", hidden), ("weight", weight), ("bias", bias)])
    if ref_hidden is not None:
        ref_hidden, ref_weight, ref_bias = _harmonise_dtypes(
            [("ref_hidden", ref_hidden), ("ref_weight", ref_weight.detach()),
             ("ref_bias", None if ref_bias is None else ref_bias.detach())])
        if ref_hidden.dtype != hidden.dtype:
            raise TypeError(f"ref_hidden: expected hidden's dtype {hidden.dtype}, got {ref_hidden.dtype}")
        ref_hidden = ref_hidden.detach()

    if shard is None:   # one device: the registered ops (token_logps_op), traceable by torch.compile
        from .token_logps_op import run_token_logps
        return run_token_logps(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias,
                               ignore_index=ignore_index, temperature=temperature, active=active,
                               return_kl=return_kl, return_entropy=return_entropy, chunk_size=chunk_size,
                               backend=backend)
    out_shape = targets.shape
    flat_t = targets.reshape(-1)
    valid = check_targets(flat_t, ignore_index, V_all)
    if active is not None:
        check_active(active, targets, hidden)
        valid = valid & (active.reshape(-1) != 0)

    M_all = flat_t.numel()
    h2 = hidden.reshape(M_all, H)
    all_active = bool(valid.all())
    if all_active:
        idx = None
        h_act, t_act = h2, flat_t.long()
        rh_act = None if ref_hidden is None else ref_hidden.reshape(M_all, H)
    else:
        idx = valid.nonzero().squeeze(1)
        h_act = h2.index_select(0, idx)
        t_act = flat_t.index_select(0, idx).long()
        rh_act = None if ref_hidden is None else ref_hidden.reshape(M_all, H).index_select(0, idx)
    M = h_act.shape[0]
    h_act = h_act if h_act.stride(-1) == 1 else h_act.contiguous()
    group = None
    if shard is not None:
        group = process_group
        if shard.offset:
            t_act = t_act - shard.offset          # rows of this rank's shard; others' fall outside
    chosen = token_logps_backend(hidden, backend)
    if chosen == "triton":
        from fastsafe.kernels.token_logps import TritonTokenLogps
        lp, kl, ent = TritonTokenLogps.apply(h_act, weight, bias, t_act, rh_act, ref_weight, ref_bias,
                                             temperature, bool(return_entropy), group)
    else:
        C = chunk_size if chunk_size is not None else default_chunk_size(max(M, 1), V, hidden.device.type)
        lp, kl, ent = ChunkedTokenLogps.apply(h_act, weight, bias, t_act, rh_act, ref_weight, ref_bias,
                                              temperature, C, bool(return_entropy), group)

    return unpack_outputs(lp, kl, ent, idx, M_all, out_shape, return_kl, return_entropy)


def unpack_outputs(lp, kl, ent, idx, num_tokens: int, out_shape, return_kl: bool, return_entropy: bool):
    """The public result of :func:`token_logps` from the per-active-token outputs: each scattered
    back to every position (``idx``: the active ones, ``None`` = all; inactive positions get 0) and
    shaped ``out_shape``; the log-probs alone, or a tuple with the KL and/or entropy asked for."""
    def scatter(x):
        if idx is None:
            return x.view(out_shape)
        return x.new_zeros(num_tokens).index_copy(0, idx, x).view(out_shape)

    outs = [scatter(lp)]
    if return_kl:
        outs.append(scatter(kl))
    if return_entropy:
        outs.append(scatter(ent))
    return outs[0] if len(outs) == 1 else tuple(outs)

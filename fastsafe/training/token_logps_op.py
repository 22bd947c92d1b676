"""``token_logps`` as registered torch operators, and the tail of :func:`token_logps` that calls them.

Ops (``torch.ops.fastsafe.*``), each with a fake (meta) implementation, autograd registered with
``torch.library.register_autograd`` (the backward is an op too):

* ``token_logps_torch`` / ``token_logps_torch_backward``: the chunked PyTorch path
  (:class:`~fastsafe.training.token_logps.ChunkedTokenLogps`'s forward and backward, run as
  the op bodies, so values and gradients are those of the autograd.Function).
* ``token_logps_triton`` / ``token_logps_triton_backward``: the Triton path
  (:class:`fastsafe.kernels.token_logps.TritonTokenLogps`), opaque custom ops (the kernels are
  launched by the op body; ``torch.compile`` does not see inside them).
* ``token_targets_valid``: ``targets != ignore_index`` that also refuses ids outside
  ``[0, V)`` with :func:`token_logps`'s error (used in compiled graphs, where the Python check
  cannot read the values).

The forward ops return ``(lp, kl, entropy, lse, ref_lse, mean_z)``; the last three are what the
backward needs. Unwanted outputs (``kl`` without a reference, the entropy without
``want_entropy``) are empty.

Under ``torch.compile`` :func:`run_token_logps` does not pack the active tokens (their number is
data-dependent): every position goes through the op, inactive ones with zeroed hidden states,
and their outputs and gradients are masked to 0. Values agree with the eager (packed) path to
float rounding; the cost is that of all positions.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from ._checks import acc_dtype, check_active, check_targets
from .token_logps import ChunkedTokenLogps, default_chunk_size, token_logps_backend, unpack_outputs

__all__ = ["token_logps_op", "run_token_logps", "check_targets"]

_LIB = torch.library.Library("fastsafe", "FRAGMENT")

_TORCH_ARGS = ("Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor? ref_hidden, "
               "Tensor? ref_weight, Tensor? ref_bias, float temperature")
_OUTS = "(Tensor lp, Tensor kl, Tensor entropy, Tensor lse, Tensor ref_lse, Tensor mean_z)"
_BWD_ARGS = ("Tensor g_lp, Tensor g_kl, Tensor g_entropy, Tensor hidden, Tensor weight, Tensor? bias, "
             "Tensor targets, Tensor? ref_hidden, Tensor? ref_weight, Tensor? ref_bias, Tensor lse, "
             "Tensor ref_lse, Tensor mean_z, float temperature")
_BWD_FLAGS = "bool want_kl, bool want_entropy, bool need_hidden, bool need_weight, bool need_bias"
_GRADS = "(Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)"


class _Ctx:
    """Stands in for an autograd ctx, so an autograd.Function's forward / backward run as op bodies."""

    def __init__(self, saved=(), needs_input_grad=(), **attrs):
        self.saved_tensors = tuple(saved)
        self.needs_input_grad = tuple(needs_input_grad)
        self.__dict__.update(attrs)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass


def _triton():
    return importlib.import_module("fastsafe.kernels.token_logps").TritonTokenLogps


def _acc(hidden: torch.Tensor, backend: str) -> torch.dtype:
    """The accumulation dtype of ``backend``: the training code's for torch, float32 in the kernels."""
    return acc_dtype(hidden) if backend == "torch" else torch.float32


def _fresh(outs):
    """Distinct tensors (an op's outputs may not alias each other); empties are re-made."""
    seen, res = set(), []
    for t in outs:
        if id(t) in seen or t.numel() == 0:
            t = t.new_empty(t.shape)
        seen.add(id(t))
        res.append(t)
    return tuple(res)


def _fwd_fake(backend):
    def fake(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, temperature, *rest):
        want_entropy = rest[1] if backend == "torch" else rest[0]       # torch: chunk_size, want_entropy[, rows]
        M = targets.shape[0]
        dt = _acc(hidden, backend)
        kl_n = M if ref_hidden is not None else 0
        ent_n = M if want_entropy else 0
        return tuple(hidden.new_empty((n,), dtype=dt) for n in (M, kl_n, ent_n, M, kl_n, ent_n))
    return fake


def _torch_fwd(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, temperature, chunk_size,
               want_entropy, rows=None):
    ctx = _Ctx()
    lp, kl, ent = ChunkedTokenLogps.forward(ctx, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias,
                                            temperature, chunk_size, want_entropy, None, rows)
    return _fresh((lp, kl, ent) + tuple(ctx.saved_tensors[7:10]))


def _triton_fwd(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, temperature, want_entropy):
    ctx = _Ctx()
    lp, kl, ent = _triton().forward(ctx, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias,
                                    temperature, want_entropy)
    return _fresh((lp, kl, ent) + tuple(ctx.saved_tensors[7:10]))


def _grads(res, hidden):
    empty = hidden.new_empty((0,))
    return tuple(empty.clone() if g is None else g for g in res[:3])


def _torch_bwd(g_lp, g_kl, g_ent, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse,
               ref_lse, mean_z, temperature, chunk_size, want_kl, want_entropy, need_h, need_w, need_b, rows=None):
    ctx = _Ctx((hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse, ref_lse, mean_z, rows),
               (need_h, need_w, need_b) + (False,) * 7, temperature=temperature, chunk_size=chunk_size,
               want_kl=want_kl, want_entropy=want_entropy, group=None)   # no process group: one device
    return _grads(ChunkedTokenLogps.backward(ctx, g_lp, g_kl, g_ent), hidden)


def _triton_bwd(g_lp, g_kl, g_ent, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse,
                ref_lse, mean_z, temperature, want_kl, want_entropy, need_h, need_w, need_b):
    ctx = _Ctx((hidden, weight, bias, targets.contiguous(), ref_hidden, ref_weight, ref_bias, lse, ref_lse,
                mean_z), (need_h, need_w, need_b) + (False,) * 6, temperature=temperature, want_kl=want_kl,
               want_entropy=want_entropy, group=None)
    return _grads(_triton().backward(ctx, g_lp, g_kl, g_ent), hidden)


def _bwd_fake(g_lp, g_kl, g_ent, hidden, weight, bias, *rest):
    if rest and not isinstance(rest[-1], bool):     # the torch op's trailing rows
        rest = rest[:-1]
    need_h, need_w, need_b = rest[-3:]
    gh = hidden.new_empty(hidden.shape) if need_h else hidden.new_empty((0,))
    gw = torch.empty_like(weight) if need_w else hidden.new_empty((0,))
    gb = bias.new_empty(bias.shape) if (need_b and bias is not None) else hidden.new_empty((0,))
    return gh, gw, gb


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, temperature = inputs[:8]
    torch_op = len(inputs) >= 10           # (..., chunk_size, want_entropy[, rows]); triton: (..., want_entropy)
    want_entropy = inputs[9] if torch_op else inputs[8]
    rows = inputs[10] if len(inputs) == 11 else None
    lp, kl, ent, lse, ref_lse, mean_z = output
    ctx.save_for_backward(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse, ref_lse, mean_z,
                          rows)
    ctx.temperature = temperature
    ctx.chunk_size = inputs[8] if torch_op else None
    ctx.want_kl = ref_hidden is not None
    ctx.want_entropy = bool(want_entropy)
    ctx.set_materialize_grads(False)       # an output nobody uses (often the entropy) costs no backward work
    ctx.mark_non_differentiable(lse, ref_lse, mean_z)
    if not ctx.want_kl:
        ctx.mark_non_differentiable(kl)
    if not ctx.want_entropy:
        ctx.mark_non_differentiable(ent)


def _backward(backend):
    def backward(ctx, g_lp, g_kl, g_ent, *unused):
        hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse, ref_lse, mean_z, rows = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = bool(need_b and bias is not None)
        acc = _acc(hidden, backend)
        M = targets.shape[0]
        # outputs without a gradient (not used by the loss) are left out of the backward pass
        use_kl = ctx.want_kl and g_kl is not None
        use_ent = ctx.want_entropy and g_ent is not None
        g_lp = torch.zeros(M, dtype=acc, device=hidden.device) if g_lp is None else g_lp
        g_kl = g_kl if use_kl else hidden.new_zeros(0, dtype=acc)
        g_ent = g_ent if use_ent else hidden.new_zeros(0, dtype=acc)
        args = (g_lp, g_kl, g_ent, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse, ref_lse,
                mean_z, ctx.temperature)
        if backend == "torch":
            args = args + (ctx.chunk_size,)
        op = _OPS[backend][1]
        flags = (use_kl, use_ent, bool(need_h), bool(need_w), need_b)
        gh, gw, gb = op(*args, *flags, rows) if backend == "torch" else op(*args, *flags)
        return ((gh if need_h else None), (gw if need_w else None), (gb if need_b else None)) + \
            (None,) * (len(ctx.needs_input_grad) - 3)
    return backward


_LIB.define(f"token_logps_torch({_TORCH_ARGS}, int chunk_size, bool want_entropy, Tensor? rows=None) -> {_OUTS}")
_LIB.define(f"token_logps_torch_backward({_BWD_ARGS}, int chunk_size, {_BWD_FLAGS}, Tensor? rows=None) -> {_GRADS}")
_LIB.define(f"token_logps_triton({_TORCH_ARGS}, bool want_entropy) -> {_OUTS}")
_LIB.define(f"token_logps_triton_backward({_BWD_ARGS}, {_BWD_FLAGS}) -> {_GRADS}")
for _name, _fn in (("token_logps_torch", _torch_fwd), ("token_logps_torch_backward", _torch_bwd)):
    _LIB.impl(_name, _fn, "CPU")
    _LIB.impl(_name, _fn, "CUDA")
for _name, _fn in (("token_logps_triton", _triton_fwd), ("token_logps_triton_backward", _triton_bwd)):
    _LIB.impl(_name, _fn, "CUDA")
    _LIB.impl(_name, _fn, "CPU")          # the interpreter (TRITON_INTERPRET=1)
for _backend in ("torch", "triton"):
    torch.library.register_fake(f"fastsafe::token_logps_{_backend}", _fwd_fake(_backend), lib=_LIB)
    torch.library.register_fake(f"fastsafe::token_logps_{_backend}_backward", _bwd_fake, lib=_LIB)
    torch.library.register_autograd(f"fastsafe::token_logps_{_backend}", _backward(_backend),
                                    setup_context=_setup_context, lib=_LIB)

_OPS = {
    "torch": (torch.ops.fastsafe.token_logps_torch.default, torch.ops.fastsafe.token_logps_torch_backward.default),
    "triton": (torch.ops.fastsafe.token_logps_triton.default,
               torch.ops.fastsafe.token_logps_triton_backward.default),
}


def token_logps_op(backend: str, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias,
                   temperature: float, chunk_size: int, want_entropy: bool, rows=None):
    """``(lp, kl, entropy)`` of packed tokens through the op of ``backend`` (``"torch"`` or ``"triton"``).

    Shapes as in :class:`~fastsafe.training.token_logps.ChunkedTokenLogps` (``hidden [M, H]``,
    ``targets [M]`` int64 in ``[0, V)``); ``chunk_size`` is used by the torch path only, and so is
    ``rows`` (``[M]`` int64: the tokens are these rows of ``hidden [M_all, H]`` / ``ref_hidden``).

    Example:
        >>> h, w = torch.randn(6, 16), torch.randn(50, 16, requires_grad=True)
        >>> lp, kl, ent = token_logps_op("torch", h, w, None, torch.randint(0, 50, (6,)), None, None, None,
        ...                              1.0, 4, False)
        >>> lp.shape, kl.numel(), ent.numel()
        (torch.Size([6]), 0, 0)
    """
    if backend == "triton":
        if rows is not None:
            hidden = hidden.index_select(0, rows)
            ref_hidden = None if ref_hidden is None else ref_hidden.index_select(0, rows)
        outs = _OPS["triton"][0](hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, temperature,
                                 want_entropy)
    else:
        outs = _OPS["torch"][0](hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, temperature,
                                chunk_size, want_entropy, rows)
    return outs[0], outs[1], outs[2]


# ----------------------------------------------------------------------------------------------
# target check (an op, so it also runs inside a compiled graph)
# ----------------------------------------------------------------------------------------------

def _valid_impl(flat_t, ignore_index, vocab_size):
    if flat_t.is_cuda and torch.cuda.is_current_stream_capturing():
        return flat_t != ignore_index            # no host read while a CUDA graph is captured
    return check_targets(flat_t, ignore_index, vocab_size)


_LIB.define("token_targets_valid(Tensor targets, int ignore_index, int vocab_size) -> Tensor")
for _key in ("CPU", "CUDA", "CompositeExplicitAutograd"):
    _LIB.impl("token_targets_valid", _valid_impl, _key)
torch.library.register_fake("fastsafe::token_targets_valid",
                            lambda t, i, v: torch.empty_like(t, dtype=torch.bool), lib=_LIB)
_VALID = torch.ops.fastsafe.token_targets_valid.default


# ----------------------------------------------------------------------------------------------
# the tail of token_logps(): pack (eager) or mask (compiled), call the op, scatter back
# ----------------------------------------------------------------------------------------------

def run_token_logps(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, *, ignore_index: int,
                    temperature: float, active, return_kl: bool, return_entropy: bool,
                    chunk_size: Optional[int], backend: Optional[str]):
    """Everything of :func:`token_logps` after argument checking (validated, dtype-harmonised inputs).

    Eager: packs the active, non-ignored tokens, runs the backend's op on them and scatters the
    results back (zeros elsewhere). Under ``torch.compile``: no packing (see the module docstring).
    """
    out_shape = targets.shape
    H = hidden.shape[-1]
    V = weight.shape[0]
    flat_t = targets.reshape(-1)
    M_all = flat_t.numel()
    h2 = hidden.reshape(M_all, H)
    rh2 = None if ref_hidden is None else ref_hidden.reshape(M_all, H)
    compiling = torch.compiler.is_compiling()
    valid = _VALID(flat_t, ignore_index, V) if compiling else check_targets(flat_t, ignore_index, V)
    if active is not None:
        check_active(active, targets, hidden)
    chosen = token_logps_backend(hidden, backend)     # under torch.compile: a trace-time constant

    if compiling:
        if active is not None:
            valid = valid & (active.reshape(-1) != 0)
        keep = valid.unsqueeze(-1)
        h_act = torch.where(keep, h2, 0)
        t_act = torch.where(valid, flat_t, 0).long()
        rh_act = None if rh2 is None else torch.where(keep, rh2, 0)
        C = chunk_size if chunk_size is not None else default_chunk_size(max(M_all, 1), V, hidden.device.type)
        lp, kl, ent = token_logps_op(chosen, h_act, weight, bias, t_act, rh_act, ref_weight, ref_bias,
                                     temperature, C, bool(return_entropy))
        # every position ran: zero the inactive ones (outputs not asked for may be empty: left as they are)
        lp, kl, ent = (torch.where(valid, x, 0) if x.shape == valid.shape else x for x in (lp, kl, ent))
        idx = None
    else:
        if active is not None:
            valid = valid & (active.reshape(-1) != 0)
        # The active tokens: their rows of h2 (indexed tile by tile in the op, no packed copy).
        idx = None if bool(valid.all()) else valid.nonzero().squeeze(1)
        t_act = flat_t.long() if idx is None else flat_t.index_select(0, idx).long()
        M = t_act.shape[0]
        h2 = h2 if h2.stride(-1) == 1 else h2.contiguous()
        C = chunk_size if chunk_size is not None else default_chunk_size(max(M, 1), V, hidden.device.type)
        lp, kl, ent = token_logps_op(chosen, h2, weight, bias, t_act, rh2, ref_weight, ref_bias,
                                     temperature, C, bool(return_entropy), idx)

    return unpack_outputs(lp, kl, ent, idx, M_all, out_shape, return_kl, return_entropy)

"""The decoding ops as registered torch operators (``torch.ops.fastsafe.*``).

Registered here, each with a fake (meta) implementation so ``torch.compile(fullgraph=True)``
traces a step that calls them (no graph break) and CUDA graphs can capture them:

* ``fastsafe::safe_topk_torch`` (the plain-PyTorch reference, CPU and CUDA),
  ``fastsafe::safe_topk_cpp`` (C++ CPU kernel) and ``fastsafe::safe_topk_cuda`` (C++ CUDA
  kernel), all with the schema :data:`SAFE_TOPK_SCHEMA`. ``fastsafe::safe_topk_triton`` is a
  ``torch.library.triton_op`` defined next to its kernels in ``fastsafe/kernels/safe_topk.py``.
* ``fastsafe::choose`` (any device): the candidate pick of :func:`fastsafe.ops.choose`.

The public functions (:func:`fastsafe.ops.safe_topk`, :func:`fastsafe.ops.choose`) validate their
arguments in Python, pick the backend outside the op (:func:`fastsafe.ops.backend_for`; one op per
backend, so the choice is static in a traced graph), then call the op. The ops take the
validated, normalised inputs only (see :class:`fastsafe.ops.types.SafeTopKInputs`).

Checks that need tensor values (NaN rows, rows with no allowed candidate and no fallback) run
inside ``fastsafe::choose``'s implementation, so they raise the same errors eagerly and in a
compiled graph; they read the values on the host, so they are skipped while a CUDA graph is
being captured (a captured graph has no host round trip; its NaN / dead rows are then not refused).

Example:
    >>> import fastsafe.ops.custom_ops                         # registers the ops
    >>> v, i, lse = torch.ops.fastsafe.safe_topk_torch(torch.randn(2, 100), 5, None, None, 1.0,
    ...                                                 None, None, 0.0, 1.0)
    >>> v.shape, i.dtype, lse.shape
    (torch.Size([2, 5]), torch.int64, torch.Size([2]))
"""
from __future__ import annotations

from typing import Optional

import torch

from .choose_impl import choose_ids
from .dispatch import native_module
from .reference import safe_topk_reference
from .types import SafeTopKInputs

__all__ = ["SAFE_TOPK_SCHEMA", "SAFE_TOPK_OPS", "safe_topk_fake", "safe_topk_op_args"]

#: Arguments and results shared by every ``fastsafe::safe_topk_<backend>`` op.
SAFE_TOPK_SCHEMA = ("(Tensor logits, int k, Tensor? bias_table, Tensor? positions, float bias_scale, "
                    "Tensor? banned_bitmask, Tensor? dense_reward, float reward_weight, float temperature) "
                    "-> (Tensor values, Tensor indices, Tensor logsumexp)")
#: Backends whose ``safe_topk`` op is defined in this module (``triton``: in fastsafe.kernels.safe_topk).
SAFE_TOPK_OPS = ("torch", "cpp", "cuda")

_LIB = torch.library.Library("fastsafe", "FRAGMENT")


def safe_topk_op_args(inp: SafeTopKInputs) -> tuple:
    """The positional arguments of a ``fastsafe::safe_topk_<backend>`` op for validated inputs."""
    return (inp.logits, inp.k, inp.bias_table, inp.positions, inp.bias_scale, inp.banned_bitmask,
            inp.dense_reward, inp.reward_weight, inp.temperature)


def _inputs(logits, k, bias_table, positions, bias_scale, banned_bitmask, dense_reward, reward_weight,
            temperature) -> SafeTopKInputs:
    return SafeTopKInputs(logits=logits, k=k, bias_table=bias_table, positions=positions,
                          bias_scale=bias_scale, banned_bitmask=banned_bitmask, dense_reward=dense_reward,
                          reward_weight=reward_weight, temperature=temperature)


def safe_topk_fake(logits, k, *args):
    """Shapes and dtypes of a ``safe_topk`` op's results: ``[B, k]`` float32, ``[B, k]`` int64, ``[B]`` float32."""
    B = logits.shape[0]
    return (logits.new_empty((B, k), dtype=torch.float32), logits.new_empty((B, k), dtype=torch.int64),
            logits.new_empty((B,), dtype=torch.float32))


def _torch_impl(*args):
    return safe_topk_reference(_inputs(*args))


def _cpp_impl(*args):
    return native_module().safe_topk_cpu(*args)   # imported on first use: the op exists without the build


def _cuda_impl(*args):
    return native_module().safe_topk_cuda(*args)


_LIB.define("safe_topk_torch" + SAFE_TOPK_SCHEMA)
_LIB.impl("safe_topk_torch", _torch_impl, "CPU")
_LIB.impl("safe_topk_torch", _torch_impl, "CUDA")
_LIB.define("safe_topk_cpp" + SAFE_TOPK_SCHEMA)
_LIB.impl("safe_topk_cpp", _cpp_impl, "CPU")
_LIB.define("safe_topk_cuda" + SAFE_TOPK_SCHEMA)
_LIB.impl("safe_topk_cuda", _cuda_impl, "CUDA")
for _backend in SAFE_TOPK_OPS:
    torch.library.register_fake(f"fastsafe::safe_topk_{_backend}", safe_topk_fake, lib=_LIB)


# ----------------------------------------------------------------------------------------------
# choose
# ----------------------------------------------------------------------------------------------

_LIB.define("choose(Tensor values, Tensor indices, Tensor logsumexp, Tensor? candidate_reward, "
            "Tensor? candidate_allowed, float reward_weight, Tensor? noise, float top_p, float min_p, "
            "int? fallback_id) -> Tensor")


def _choose_impl(values, indices, logsumexp, candidate_reward, candidate_allowed, reward_weight,
                 noise, top_p, min_p, fallback_id):
    return choose_ids(values, indices, logsumexp, candidate_reward, candidate_allowed, reward_weight,
                      noise, top_p, min_p, fallback_id, check=not _capturing(values))


def _choose_fake(values, indices, logsumexp, candidate_reward, candidate_allowed, reward_weight,
                 noise, top_p, min_p, fallback_id):
    return indices.new_empty((values.shape[0],), dtype=torch.int64)


# CPU / CUDA kernels (inner aten calls are cheaper there than under CompositeExplicitAutograd, which
# serves the other devices)
for _key in ("CPU", "CUDA", "CompositeExplicitAutograd"):
    _LIB.impl("choose", _choose_impl, _key)
torch.library.register_fake("fastsafe::choose", _choose_fake, lib=_LIB)


def _capturing(t: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on ``t``'s device (host reads are not allowed then)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def choose_op(values: torch.Tensor, indices: torch.Tensor, logsumexp: torch.Tensor,
              candidate_reward: Optional[torch.Tensor], candidate_allowed: Optional[torch.Tensor],
              reward_weight: float, noise: Optional[torch.Tensor], top_p: float, min_p: float,
              fallback_id: Optional[int]) -> torch.Tensor:
    """Call ``fastsafe::choose`` (validated arguments; see :func:`fastsafe.ops.choose`)."""
    return _CHOOSE(values, indices, logsumexp, candidate_reward, candidate_allowed, reward_weight, noise,
                   top_p, min_p, fallback_id)


_CHOOSE = torch.ops.fastsafe.choose.default

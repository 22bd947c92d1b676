"""The DeviceMatcher step as registered torch operators (``torch.ops.fastsafe.device_matcher_*``).

Three ops, each with a CPU kernel (C++, ``csrc/device_matcher_cpu.cpp``) and a CUDA kernel
(``csrc/device_matcher_cuda.cu``) of the extension ``fastsafe._C``, and a fake (meta)
implementation, so ``torch.compile(fullgraph=True)`` traces a step that calls them and CUDA graphs
can capture them:

* ``device_matcher_advance(state, token_ids, tables, meta) -> state``
* ``device_matcher_banned_bitmask(state, tables, meta) -> words [B, W] int32``
* ``device_matcher_check_candidates(state, cand_ids, tables, meta) -> (ok [B, k] bool, entity [B, k] int32)``

``tables`` are the matcher's tensors in the order of :data:`NATIVE_TABLES`, ``meta`` the ints of
:data:`NATIVE_META`. :class:`~fastsafe.safety.DeviceMatcher` validates the arguments in Python
and calls these ops when the ``device_matcher`` backend (:func:`fastsafe.ops.backend_for`) is
``cpp`` or ``cuda``; its own tensor program (backend ``torch``) is the reference they are tested
against. The kernels check dtypes, devices and every table size again (a second line when they
are called directly); on the CPU a state row that is not a state of the matcher is an error, on
CUDA it is clamped into range (a check would synchronise).

Example:
    >>> from fastsafe.safety import DeviceMatcher
    >>> dm = DeviceMatcher.build(None, token_id_phrases=[[5, 7]], vocab_size=10)
    >>> dm.backend in ("cpp", "torch")
    True
"""
from __future__ import annotations

import torch

from ..ops.dispatch import native_module
from .char_automaton import BND, CP_LIMIT, FLAG_BND, FLAG_CONFIRM, FLAG_SEPARATOR, FLAG_WORD, OTHER_NONWORD, SQ2, SQ3, SQ4

# the kernels' copies of these constants (csrc/device_matcher_step.h)
assert (OTHER_NONWORD, BND, SQ2, SQ3, SQ4, CP_LIMIT) == (0, 3, 4, 5, 7, 0x30000), \
    "char_automaton's special classes moved: update kOtherNonword/kBnd/kSq2/kSq3/kSq4/kCpLimit in csrc/device_matcher_step.h"
assert (FLAG_BND, FLAG_CONFIRM, FLAG_WORD, FLAG_SEPARATOR) == (1, 4, 8, 16), \
    "char_automaton's action flags moved: update kFlag* in csrc/device_matcher_step.h"

__all__ = ["NATIVE_TABLES", "NATIVE_META", "advance_op", "banned_bitmask_op", "check_candidates_op"]

#: The tables passed to the native ops, in order (int64 ``goto_keys``, the rest int32).
NATIVE_TABLES = ("goto_keys", "goto_next", "chain_next", "ban_first", "ban_next", "ban_off", "ban_cnt", "heavy_id",
                 "ban_word", "ban_mask", "heavy_rows", "base", "delta", "out_word", "out_now", "act_ctx", "act_sym",
                 "act_flags", "slots", "head_n", "head_bits", "tail_n", "tail_bits", "tail_need", "body", "cp0", "cp1",
                 "out_spelled", "triple_end")
#: The ints passed to the native ops, in order.
NATIVE_META = ("vocab_size", "chain_depth", "ban_depth", "has_text", "classes", "word_boundaries")

_LIB = torch.library.Library("fastsafe", "FRAGMENT")
_LIB.define("device_matcher_advance(Tensor state, Tensor token_ids, Tensor[] tables, int[] meta) -> Tensor")
_LIB.define("device_matcher_banned_bitmask(Tensor state, Tensor[] tables, int[] meta) -> Tensor")
_LIB.define("device_matcher_check_candidates(Tensor state, Tensor cand_ids, Tensor[] tables, int[] meta) "
            "-> (Tensor, Tensor)")


def _impls(suffix: str):
    def advance(state, token_ids, tables, meta):
        return getattr(native_module(), "device_matcher_advance_" + suffix)(state, token_ids, tables, meta)

    def banned_bitmask(state, tables, meta):
        return getattr(native_module(), "device_matcher_banned_bitmask_" + suffix)(state, tables, meta)

    def check_candidates(state, cand_ids, tables, meta):
        return getattr(native_module(), "device_matcher_check_candidates_" + suffix)(state, cand_ids, tables, meta)

    return advance, banned_bitmask, check_candidates


for _key, _suffix in (("CPU", "cpu"), ("CUDA", "cuda")):
    for _name, _fn in zip(("advance", "banned_bitmask", "check_candidates"), _impls(_suffix)):
        _LIB.impl("device_matcher_" + _name, _fn, _key)


@torch.library.register_fake("fastsafe::device_matcher_advance", lib=_LIB)
def _advance_fake(state, token_ids, tables, meta):
    return torch.empty_like(state)


@torch.library.register_fake("fastsafe::device_matcher_banned_bitmask", lib=_LIB)
def _bitmask_fake(state, tables, meta):
    return state.new_empty((state.shape[0], (meta[0] + 31) // 32), dtype=torch.int32)


@torch.library.register_fake("fastsafe::device_matcher_check_candidates", lib=_LIB)
def _check_fake(state, cand_ids, tables, meta):
    return (cand_ids.new_empty(cand_ids.shape, dtype=torch.bool),
            cand_ids.new_empty(cand_ids.shape, dtype=torch.int32))


advance_op = torch.ops.fastsafe.device_matcher_advance.default
banned_bitmask_op = torch.ops.fastsafe.device_matcher_banned_bitmask.default
check_candidates_op = torch.ops.fastsafe.device_matcher_check_candidates.default

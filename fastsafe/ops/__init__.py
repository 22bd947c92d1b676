"""fastsafe.ops: the fused decoding ops and their backends.

>>> from fastsafe.ops import safe_topk, choose, pack_bitmask, unpack_bitmask, backends, backend_for
"""
from .bitmask import ban_tokens_, bitmask_words, full_bitmask, pack_bitmask, unpack_bitmask
from .choose import choose
from .dispatch import BACKEND_NAMES, BackendInfo, backend_for, backends
from .topk import safe_topk
from .types import SafeTopK, SafeTopKInputs

__all__ = [
    "safe_topk", "choose", "pack_bitmask", "unpack_bitmask", "bitmask_words", "full_bitmask", "ban_tokens_",
    "backends", "backend_for", "BackendInfo", "BACKEND_NAMES", "SafeTopK", "SafeTopKInputs",
]

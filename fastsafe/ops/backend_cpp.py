"""``cpp`` backend: the C++ CPU kernel of ``fastsafe._C`` (OpenMP over rows and blocks of V), run as
the op ``fastsafe::safe_topk_cpp``."""
import torch

from .custom_ops import safe_topk_op_args
from .dispatch import register
from .types import SafeTopKInputs

_OP = torch.ops.fastsafe.safe_topk_cpp.default


@register("safe_topk", "cpp")
def safe_topk_cpp(inp: SafeTopKInputs):
    return _OP(*safe_topk_op_args(inp))

"""``cuda`` backend: the C++ CUDA kernel of ``fastsafe._C`` (split-V pass + merge pass), run as the
op ``fastsafe::safe_topk_cuda``."""
import torch

from .custom_ops import safe_topk_op_args
from .dispatch import register
from .types import SafeTopKInputs

_OP = torch.ops.fastsafe.safe_topk_cuda.default


@register("safe_topk", "cuda")
def safe_topk_cuda(inp: SafeTopKInputs):
    return _OP(*safe_topk_op_args(inp))

"""``torch`` backend: the plain-PyTorch reference (any device), run as the op ``fastsafe::safe_topk_torch``."""
import torch

from .custom_ops import safe_topk_op_args
from .dispatch import register
from .types import SafeTopKInputs

_OP = torch.ops.fastsafe.safe_topk_torch.default


@register("safe_topk", "torch")
def safe_topk_torch(inp: SafeTopKInputs):
    return _OP(*safe_topk_op_args(inp))

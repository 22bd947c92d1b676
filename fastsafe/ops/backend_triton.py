"""``triton`` backend: the Triton kernels of ``fastsafe.kernels`` (GPU, or CPU under TRITON_INTERPRET=1),
run as the ``torch.library.triton_op`` ``fastsafe::safe_topk_triton``."""
from .dispatch import register
from .types import SafeTopKInputs


@register("safe_topk", "triton")
def safe_topk_triton(inp: SafeTopKInputs):
    from fastsafe.kernels.safe_topk import safe_topk_triton_op
    return safe_topk_triton_op(inp)

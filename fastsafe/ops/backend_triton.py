"""``triton`` backend: the Triton kernels of ``fastsafe.kernels`` (GPU, or CPU under TRITON_INTERPRET=1)."""
from .dispatch import register
from .types import SafeTopKInputs


@register("safe_topk", "triton")
def safe_topk_triton(inp: SafeTopKInputs):
    from fastsafe.kernels.safe_topk import safe_topk_triton as launch
    return launch(inp)

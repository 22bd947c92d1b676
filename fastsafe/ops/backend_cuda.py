"""``cuda`` backend: the C++ CUDA kernel of ``fastsafe._C`` (split-V pass + merge pass)."""
from .backend_cpp import _native_args
from .dispatch import native_module, register
from .types import SafeTopKInputs


@register("safe_topk", "cuda")
def safe_topk_cuda(inp: SafeTopKInputs):
    return native_module().safe_topk_cuda(*_native_args(inp))

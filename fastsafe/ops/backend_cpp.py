"""``cpp`` backend: the C++ CPU kernel of ``fastsafe._C`` (OpenMP over rows and blocks of V)."""
from .dispatch import native_module, register
from .types import SafeTopKInputs


def _native_args(inp: SafeTopKInputs):
    return (inp.logits, inp.k, inp.bias_table, inp.positions, inp.bias_scale, inp.banned_bitmask,
            inp.dense_reward, inp.reward_weight, inp.temperature)


@register("safe_topk", "cpp")
def safe_topk_cpp(inp: SafeTopKInputs):
    return native_module().safe_topk_cpu(*_native_args(inp))

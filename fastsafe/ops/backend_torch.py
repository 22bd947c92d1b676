"""``torch`` backend: the plain-PyTorch reference (any device)."""
from .dispatch import register
from .reference import safe_topk_reference

register("safe_topk", "torch")(safe_topk_reference)

"""Triton kernels of fastsafe, installed as ``fastsafe.kernels`` (GPU; CPU under TRITON_INTERPRET=1)."""

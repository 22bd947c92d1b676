"""Integrations with existing trainers. Each submodule imports its (optional) framework lazily:

- ``fastsafe.integrations.trl``: :class:`MaskedDPOTrainer`, a TRL ``DPOTrainer`` using the fused
  token-weighted DPO loss (needs ``pip install 'fastsafe[trl]'``).
"""
__all__ = ["trl"]

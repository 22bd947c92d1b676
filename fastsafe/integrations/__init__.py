"""Integrations with existing trainers. Each submodule imports its (optional) framework lazily:

- ``fastsafe.integrations.trl``: :class:`MaskedDPOTrainer`, a TRL ``DPOTrainer`` using the fused
  token-weighted DPO loss, and :class:`MaskedGRPOTrainer`, a TRL ``GRPOTrainer`` with a token mask
  from per-token rewards (needs ``pip install 'fastsafe[trl]'``).
"""
__all__ = ["trl"]

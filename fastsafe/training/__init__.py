"""fastsafe.training: fused token log-probs, token masks and masked preference losses.

>>> from fastsafe.training import (token_logps, schmitt_mask, threshold_mask, masked_dpo_loss,
...                                masked_ppo_loss, masked_grpo_loss, masked_rs_loss, tdpo_loss,
...                                FusedLinearMaskedDPOLoss, FusedLinearMaskedPPOLoss, FusedLinearMaskedGRPOLoss)
"""
from .in_forward import run_in_forward
from .losses_dpo import masked_dpo_loss
from .losses_ppo import kl_estimate, masked_grpo_loss, masked_ppo_loss
from .losses_rs import masked_rs_loss
from .masks import schmitt_mask, threshold_mask
from .modules import FusedLinearMaskedDPOLoss, FusedLinearMaskedGRPOLoss, FusedLinearMaskedPPOLoss
from .tdpo import tdpo_loss
from .token_logps import token_logps, token_logps_backend

__all__ = [
    "token_logps", "token_logps_backend",
    "schmitt_mask", "threshold_mask",
    "masked_dpo_loss", "masked_ppo_loss", "masked_grpo_loss", "masked_rs_loss", "tdpo_loss", "kl_estimate",
    "FusedLinearMaskedDPOLoss", "FusedLinearMaskedPPOLoss", "FusedLinearMaskedGRPOLoss",
    "run_in_forward",
]

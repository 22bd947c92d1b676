"""fastsafe.training: fused token log-probs, token masks and masked preference losses."""
from .token_logps import token_logps, token_logps_backend

__all__ = ["token_logps", "token_logps_backend"]

"""Training losses: reconstruction now; perceptual and adversarial terms plug into ``VQLoss``."""

from .reconstruction import VQLoss

__all__ = ["VQLoss"]

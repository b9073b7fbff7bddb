"""Training losses: reconstruction now; perceptual and adversarial terms plug into ``VQLoss``."""

from .perceptual import LPIPS, VGG16Features, WeightsNotFoundError
from .reconstruction import VQLoss

__all__ = ["LPIPS", "VGG16Features", "VQLoss", "WeightsNotFoundError"]

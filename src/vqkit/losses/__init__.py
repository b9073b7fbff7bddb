"""Training losses: reconstruction (``VQLoss``), perceptual (``LPIPS``) and adversarial
(``AdversarialLoss``, used by ``vqkit.training.VQGANModule``)."""

from .adversarial import (
    AdversarialLoss,
    hinge_d_loss,
    hinge_g_loss,
    lecam_penalty,
    non_saturating_d_loss,
    non_saturating_g_loss,
)
from .inception import InceptionFeatureLoss
from .perceptual import LPIPS, VGG16Features, WeightsNotFoundError
from .reconstruction import VQLoss

__all__ = [
    "AdversarialLoss",
    "hinge_d_loss",
    "hinge_g_loss",
    "InceptionFeatureLoss",
    "lecam_penalty",
    "LPIPS",
    "non_saturating_d_loss",
    "non_saturating_g_loss",
    "VGG16Features",
    "VQLoss",
    "WeightsNotFoundError",
]

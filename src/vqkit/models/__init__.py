"""vqkit.models: the convolutional autoencoder and VQModel (plain nn.Modules, no Lightning)."""

from .autoencoder import Decoder, Encoder
from .blocks import AttnBlock, Downsample, ResBlock, Upsample, norm
from .vqmodel import ResNetVQModel, VQModel, VQModelOutput

__all__ = [
    "AttnBlock",
    "Decoder",
    "Downsample",
    "Encoder",
    "ResBlock",
    "ResNetVQModel",
    "Upsample",
    "VQModel",
    "VQModelOutput",
    "norm",
]

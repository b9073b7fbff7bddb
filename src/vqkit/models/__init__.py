"""vqkit.models: the convolutional autoencoder, VQModel and the PatchGAN discriminator
(plain nn.Modules, no Lightning)."""

from .autoencoder import Decoder, Encoder
from .blocks import AttnBlock, Downsample, ResBlock, Upsample, norm
from .discriminator import PatchDiscriminator
from .sparse3d import SparseSDFVQVAE, SubmanifoldConv3d
from .vqmodel import ResNetVQModel, VQModel, VQModelOutput

__all__ = [
    "AttnBlock",
    "Decoder",
    "Downsample",
    "Encoder",
    "PatchDiscriminator",
    "ResBlock",
    "ResNetVQModel",
    "SparseSDFVQVAE",
    "SubmanifoldConv3d",
    "Upsample",
    "VQModel",
    "VQModelOutput",
    "norm",
]

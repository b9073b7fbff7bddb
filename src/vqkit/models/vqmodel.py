"""VQModel: encoder -> 1x1 conv -> vector quantizer -> 1x1 conv -> decoder.

The three parts are constructor arguments typed as classes, so LightningCLI / jsonargparse
builds them from ``class_path`` / ``init_args`` and rejects a wrong key at parse time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..configurable import Configurable, to_config
from ..pretrained import PretrainedMixin, inference_model_config, tokenizer_digest
from ..quantize.quantizer import VectorQuantizer
from .autoencoder import Decoder, Encoder


@dataclass
class VQModelOutput:
    """What ``VQModel.forward`` returns.

    ``vq_loss`` is the quantizer's loss (commitment, codebook, regularizers; broken down in
    ``vq_losses``); reconstruction and adversarial terms are the caller's (``vqkit.losses``).
    """

    reconstructions: Tensor
    quantized: Tensor
    indices: Tensor
    vq_loss: Tensor
    vq_losses: dict[str, Tensor] = field(default_factory=dict)
    used_codes: Tensor | None = None
    perplexity: Tensor | None = None
    passthrough: bool = False  # a quantizer warm-up step: the codes were not used


class VQModel(Configurable, PretrainedMixin, nn.Module):
    """A VQ-VAE over images: ``forward`` reconstructs, ``encode`` tokenizes, ``decode_indices``
    renders tokens. ``save_pretrained`` / ``from_pretrained`` (``vqkit.pretrained``) write and
    read it as ``config.json`` + ``model.safetensors``.

    Args:
        encoder: images -> (B, z_channels, h, w) latents.
        decoder: (B, z_channels, h, w) latents -> images; same down factor as the encoder.
        quantizer: a ``VectorQuantizer`` built with ``channel_first=True``; its ``dim`` is free,
            1x1 convs map ``z_channels`` to ``quantizer.dim`` and back.
    """

    def __init__(self, encoder: Encoder, decoder: Decoder, quantizer: VectorQuantizer) -> None:
        super().__init__()
        for name, obj, cls in (
            ("encoder", encoder, Encoder),
            ("decoder", decoder, Decoder),
            ("quantizer", quantizer, VectorQuantizer),
        ):
            if not isinstance(obj, cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(obj).__name__}")
        if not quantizer.channel_first:
            raise ValueError(
                "VQModel quantizes (B, D, h, w) feature maps: build the quantizer with "
                "VectorQuantizer(..., channel_first=True), got channel_first=False"
            )
        if encoder.down_factor != decoder.down_factor:
            raise ValueError(
                f"encoder down factor {encoder.down_factor} != decoder up factor "
                f"{decoder.down_factor}; give both the same channel_mult length"
            )
        self.encoder = encoder
        self.decoder = decoder
        self.quantizer = quantizer
        self.quant_conv = nn.Conv2d(encoder.z_channels, quantizer.dim, 1)
        self.post_quant_conv = nn.Conv2d(quantizer.dim, decoder.z_channels, 1)

    pretrained_kind = "tokenizer"
    pretrained_quantizer_prefix = "quantizer."

    @property
    def down_factor(self) -> int:
        return self.encoder.down_factor

    # ------------------------------------------------------------------------- pretrained
    def pretrained_config(self) -> dict:
        return inference_model_config(to_config(self, type(self).__name__))

    def pretrained_facts(self, image_size: int | None = None, **facts: Any) -> dict:
        """The image size (default: the encoder's ``resolution``), token grid, codebook shape
        and the weights' sha256 (``tokenizer_digest``), for loaders and the model card."""
        size = image_size if image_size is not None else self.encoder.resolution
        out = {
            "image_size": int(size),
            "image_channels": self.encoder.in_channels,
            "token_grid": list(self.token_grid(int(size))),
            "down_factor": self.down_factor,
            "codebook_size": self.quantizer.codebook_size,
            "codebook_dim": self.quantizer.codebook_dim,
            "value_range": [-1.0, 1.0],
            "sha256": tokenizer_digest(self),
        }
        out.update({k: v for k, v in facts.items() if v is not None})
        return out

    def token_grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the token map of an image of ``image_size`` (an int means square)."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        f = self.down_factor
        if h < f or w < f or h % f or w % f:
            raise ValueError(f"image size must be a multiple of the down factor {f}, got {h}x{w}")
        return h // f, w // f

    def forward(self, images: Tensor) -> VQModelOutput:
        q = self.quantizer(self.quant_conv(self.encoder(images)))
        reconstructions = self.decoder(self.post_quant_conv(q.quantized))
        return VQModelOutput(
            reconstructions=reconstructions,
            quantized=q.quantized,
            indices=q.indices,
            vq_loss=q.loss,
            vq_losses=q.losses,
            used_codes=q.used_codes,
            perplexity=q.perplexity,
            passthrough=q.passthrough,
        )

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Code indices (B, h, w); deterministic and touches no quantizer statistics."""
        return self.quantizer.encode(self.quant_conv(self.encoder(images)))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Images (B, C, h * f, w * f) in [-1, 1] from code indices (B, h, w)."""
        if indices.dim() != 3:
            raise ValueError(f"indices must be (B, h, w), got shape {tuple(indices.shape)}")
        vectors = self.quantizer.decode(indices)
        # The codebook is read in fp32; match the conv's dtype when the model itself is cast.
        vectors = vectors.to(self.post_quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(vectors))


class ResNetVQModel(VQModel):
    """A ``VQModel`` whose encoder and decoder mirror each other and share every shape argument,
    so a config names each shape once (``class_path: vqkit.models.ResNetVQModel``).

    Defaults are the seed plan's 256px model: five channel multipliers, down factor 16 -> 16x16
    tokens (``configs/vqvae_anime.yaml`` adds attention at 16x16). The quickstart
    (32px -> 8x8 tokens, 2 CPU cores) is ``resolution=32, base_channels=32,
    channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=64``; see ``configs/quickstart.yaml``
    and ``benchmarks/bench_model_step.py``.
    """

    def __init__(
        self,
        quantizer: VectorQuantizer,
        *,
        resolution: int = 256,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        z_channels: int = 256,
        dropout: float = 0.0,
        mid_attention: bool = True,
        norm_type: str = "group",
        norm_groups: int = 32,
        image_channels: int = 3,
    ) -> None:
        shape = {
            "base_channels": base_channels,
            "channel_mult": tuple(channel_mult),
            "num_res_blocks": num_res_blocks,
            "attn_resolutions": tuple(attn_resolutions),
            "resolution": resolution,
            "z_channels": z_channels,
            "dropout": dropout,
            "mid_attention": mid_attention,
            "norm_type": norm_type,
            "norm_groups": norm_groups,
        }
        super().__init__(
            Encoder(in_channels=image_channels, **shape),
            Decoder(out_channels=image_channels, **shape),
            quantizer,
        )

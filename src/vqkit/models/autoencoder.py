"""ResNet encoder and decoder of a VQ-VAE / VQ-GAN (taming-transformers' layout, typed args).

Layout of the encoder, stage by stage: ``num_res_blocks`` ResBlocks at the stage's width (each
followed by an AttnBlock where the current resolution is in ``attn_resolutions``), then a
stride-2 Downsample before the next stage. Residual blocks come before the downsampling, as in
taming, so the first stage works at full resolution; ``len(channel_mult) - 1`` downsamplings
give a down factor of 4, 8 or 16 for 3, 4 or 5 multipliers. The decoder mirrors it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configurable import Configurable
from .blocks import AttnBlock, Downsample, ResBlock, Upsample, norm


def _check_shape_args(
    base_channels: int,
    channel_mult: Sequence[int],
    num_res_blocks: int,
    attn_resolutions: Sequence[int],
    resolution: int,
) -> tuple[int, ...]:
    mult = tuple(channel_mult)
    if not mult or any(m < 1 for m in mult):
        raise ValueError(f"channel_mult must be a non-empty sequence of ints >= 1, got {mult}")
    if base_channels < 1:
        raise ValueError(f"base_channels must be >= 1, got {base_channels}")
    if num_res_blocks < 1:
        # The residual blocks change the width between stages; with none, channel_mult would
        # silently do nothing.
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    down = 2 ** (len(mult) - 1)
    if resolution < down or resolution % down:
        raise ValueError(
            f"resolution must be a multiple of the down factor {down} (channel_mult of length "
            f"{len(mult)}), got {resolution}"
        )
    reachable = {resolution // 2**i for i in range(len(mult))}
    bad = sorted(set(attn_resolutions) - reachable)
    if bad:
        raise ValueError(
            f"attn_resolutions {bad} never occur; the feature maps of a {resolution}px input are "
            f"{sorted(reachable, reverse=True)}"
        )
    return mult


def _check_input(x: Tensor, channels: int, down: int, what: str) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{what} expects (B, {channels}, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % down or w % down:
        raise ValueError(f"{what}: H and W must be multiples of {down}, got {h}x{w}")


class Encoder(Configurable, nn.Module):
    """Images (B, in_channels, H, W) -> latents (B, z_channels, H / f, W / f), f = down_factor.

    ``resolution`` is the nominal input size; it only places the attention blocks. The network
    is fully convolutional and accepts any H, W that are multiples of the down factor.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        resolution: int = 256,
        z_channels: int = 256,
        dropout: float = 0.0,
        mid_attention: bool = True,
        norm_type: str = "group",
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        mult = _check_shape_args(
            base_channels, channel_mult, num_res_blocks, attn_resolutions, resolution
        )
        self.in_channels = in_channels
        self.resolution = resolution
        if z_channels < 1:
            raise ValueError(f"z_channels must be >= 1, got {z_channels}")
        self.z_channels = z_channels
        self.down_factor = 2 ** (len(mult) - 1)
        kw = {"norm_groups": norm_groups, "norm_type": norm_type}

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        layers: list[nn.Module] = []
        ch, res = base_channels, resolution
        for i, m in enumerate(mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(ch, base_channels * m, dropout=dropout, **kw))
                ch = base_channels * m
                if res in attn_resolutions:
                    layers.append(AttnBlock(ch, **kw))
            if i < len(mult) - 1:
                layers.append(Downsample(ch))
                res //= 2
        self.down = nn.Sequential(*layers)
        self.mid = nn.Sequential(
            ResBlock(ch, ch, dropout=dropout, **kw),
            AttnBlock(ch, **kw) if mid_attention else nn.Identity(),
            ResBlock(ch, ch, dropout=dropout, **kw),
        )
        self.norm_out = norm(ch, norm_type, norm_groups)
        self.conv_out = nn.Conv2d(ch, z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_channels, self.down_factor, "Encoder")
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(Configurable, nn.Module):
    """Latents (B, z_channels, h, w) -> images (B, out_channels, h * f, w * f) in [-1, 1].

    Mirrors ``Encoder`` with the same arguments: mid block, then per stage from the deepest
    ``num_res_blocks`` ResBlocks (+ attention; the last one narrows to the next stage's width)
    followed by a nearest x2 Upsample, then norm -> SiLU -> conv to ``out_channels`` and tanh.
    """

    def __init__(
        self,
        out_channels: int = 3,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        resolution: int = 256,
        z_channels: int = 256,
        dropout: float = 0.0,
        mid_attention: bool = True,
        norm_type: str = "group",
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        mult = _check_shape_args(
            base_channels, channel_mult, num_res_blocks, attn_resolutions, resolution
        )
        self.out_channels = out_channels
        if z_channels < 1:
            raise ValueError(f"z_channels must be >= 1, got {z_channels}")
        self.z_channels = z_channels
        self.down_factor = 2 ** (len(mult) - 1)
        kw = {"norm_groups": norm_groups, "norm_type": norm_type}

        ch = base_channels * mult[-1]
        res = resolution // self.down_factor
        self.conv_in = nn.Conv2d(z_channels, ch, 3, padding=1)
        self.mid = nn.Sequential(
            ResBlock(ch, ch, dropout=dropout, **kw),
            AttnBlock(ch, **kw) if mid_attention else nn.Identity(),
            ResBlock(ch, ch, dropout=dropout, **kw),
        )
        layers: list[nn.Module] = []
        for i in reversed(range(len(mult))):
            for j in range(num_res_blocks):
                # The last block of a stage narrows to the next stage's width, so the upsampling
                # conv and the next stage run at the narrow width (the encoder widens right
                # after its downsampling). Taming widens at the first block instead, which runs
                # its costliest convs, at full resolution, at the wide width.
                last = j == num_res_blocks - 1
                out = base_channels * mult[i - 1 if last and i > 0 else i]
                layers.append(ResBlock(ch, out, dropout=dropout, **kw))
                ch = out
                if res in attn_resolutions:
                    layers.append(AttnBlock(ch, **kw))
            if i > 0:
                layers.append(Upsample(ch))
                res *= 2
        self.up = nn.Sequential(*layers)
        self.norm_out = norm(ch, norm_type, norm_groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        _check_input(z, self.z_channels, 1, "Decoder")
        h = self.up(self.mid(self.conv_in(z)))
        return torch.tanh(self.conv_out(F.silu(self.norm_out(h))))

"""Building blocks of the convolutional autoencoder: residual, attention, down/upsampling.

Every block keeps the memory format of its input (contiguous or channels_last) and its dtype,
so the same modules run under CUDA autocast and as channels_last on CPU.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

NORMS = ("group", "none")


def norm(channels: int, kind: str = "group", groups: int = 32) -> nn.Module:
    """A normalization layer over ``channels``.

    ``kind="group"`` is GroupNorm with the largest group count <= ``groups`` that divides the
    channels (48 channels with ``groups=32`` get 24 groups, not an error). A width with no
    divisor in ``[2, groups]`` (a prime like 37) raises instead of silently becoming one group,
    which would be a different layer (LayerNorm over C, H, W). ``kind="none"`` is the identity:
    GroupNorm is most of the non-conv time of a small model on CPU, see
    ``benchmarks/bench_model_step.py``.
    """
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if groups < 1:
        raise ValueError(f"norm_groups must be >= 1, got {groups}")
    if kind == "none":
        return nn.Identity()
    g = next(g for g in range(min(groups, channels), 0, -1) if channels % g == 0)
    if g == 1 and min(groups, channels) > 1:
        raise ValueError(
            f"no group count in [2, {groups}] divides {channels} channels; use a width with a "
            f"small factor (e.g. {channels + 1}) or norm_groups=1"
        )
    return nn.GroupNorm(g, channels, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-activation residual block: (norm -> SiLU -> conv3x3) twice, plus a skip.

    The skip is a 1x1 conv when the width changes. With ``norm="none"`` the second conv starts
    at zero so each block is the identity at init; without that, activations grow with depth
    and an un-normalized stack diverges in its first steps.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        norm_groups: int = 32,
        dropout: float = 0.0,
        norm_type: str = "group",
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.norm1 = norm(in_ch, norm_type, norm_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = norm(out_ch, norm_type, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        if norm_type == "none":
            nn.init.zeros_(self.conv2.weight)
            nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the spatial positions of a (B, C, H, W) map."""

    def __init__(self, ch: int, *, norm_groups: int = 32, norm_type: str = "group") -> None:
        super().__init__()
        self.norm = norm(ch, norm_type, norm_groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (n c) h w -> n b 1 (h w) c", n=3)
        # SDPA picks the flash / memory-efficient kernel on CUDA; scale is 1/sqrt(C) as in taming.
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    """Halve H and W with a stride-2 conv3x3.

    Padding is ``padding=1`` (one fused op) rather than taming's asymmetric right/bottom pad
    plus ``padding=0``: for even sizes both give H/2, but our kernel footprints sit one pixel
    up-left of taming's (the bottom/right pad row is never read). Weights ported from taming
    therefore sample a one-pixel-shifted grid; train from scratch or add the pad when porting.
    """

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2 then conv3x3 (no checkerboard of a transposed conv)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

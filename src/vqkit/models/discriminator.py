"""PatchGAN discriminator (pix2pix / taming-transformers' NLayerDiscriminator).

Each output logit judges one patch of the input: with the defaults (64 base channels, 3 strided
layers, 4x4 kernels) a logit sees 70x70 pixels, and a 256 px image gives a 30x30 logit map.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

NORMS = ("batch", "group", "instance", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


def init_weights(m: nn.Module) -> None:
    """taming's ``weights_init``: convs N(0, 0.02), norm scales N(1, 0.02) and shifts 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)) and m.weight is not None:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class PatchDiscriminator(nn.Module):
    """A fully convolutional discriminator that returns a map of patch logits.

    Args:
        in_channels: image channels.
        base_channels: width of the first layer (taming's ``ndf``); doubles per layer up to 8x.
        num_layers: strided layers after the first conv (taming's ``n_layers``); 3 gives the
            70x70 receptive field.
        norm: ``"batch"`` (taming), ``"group"``, ``"instance"`` or ``"none"``. Batch norm mixes
            the statistics of a batch; group/instance norm do not, and suit small batches.
        spectral_norm: wrap every conv in spectral normalization (a Lipschitz bound, seed 004
            section 7.2's remedy for an unstable GAN). Its power-iteration vectors are buffers,
            so they resume with ``state_dict``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        num_layers: int = 3,
        norm: str = "batch",
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        for name, v in (
            ("in_channels", in_channels),
            ("base_channels", base_channels),
            ("num_layers", num_layers),
        ):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        # Batch norm has its own shift, so its convs need no bias (as taming).
        bias = norm != "batch"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1  # the last widening conv keeps the resolution
            layers += [
                nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride, 1, bias=bias),
                _norm(norm, base_channels * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(init_weights)
        if spectral_norm:
            for i, m in enumerate(self.main):
                if isinstance(m, nn.Conv2d):
                    self.main[i] = _spectral_norm(m)
        self.in_channels = in_channels
        self.num_layers = num_layers

    @property
    def receptive_field(self) -> int:
        """Pixels per side that one output logit sees."""
        rf = 1
        # walk back from the output: last conv (k4 s1), the s1 widening conv, strided convs
        for stride in [1, 1] + [2] * self.num_layers:
            rf = (rf - 1) * stride + 4
        return rf

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, 1, h, w) patch logits."""
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"PatchDiscriminator expects (B, {self.in_channels}, H, W) images, "
                f"got shape {tuple(images.shape)}"
            )
        return self.main(images)

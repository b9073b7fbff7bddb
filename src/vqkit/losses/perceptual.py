"""LPIPS (VGG16 trunk, v0.1) without torchvision.

The ``lpips`` package imports torchvision, which cannot be installed next to every torch, so the
VGG16 feature stack is defined here with torchvision's exact module indices: a torchvision
``vgg16`` state dict (``features.N.weight``/``bias``) loads with strict key checking. The math is
that of ``lpips.LPIPS(net="vgg", version="0.1")`` (checked against it on stored reference outputs,
tests/test_lpips.py). Weights are read from files; the torch hub cache is filled on first use
(:mod:`vqkit.download`: checksum-verified, written whole or not at all):

- VGG16 ImageNet weights in torchvision format (``vgg16-397923af.pth``, 528 MiB): ``vgg_path``,
  else ``$VQKIT_VGG16``, else the torch hub cache where torchvision saves them, downloaded there
  from :data:`VGG16_URL` if absent (its sha256 must start with the ``397923af`` of its name).
- The LPIPS linear-layer weights (``lpips/weights/v0.1/vgg.pth``, 7 KB): ``lin_path``, else
  ``$VQKIT_LPIPS_LIN``, else the installed ``lpips`` package's files, located without importing
  it (``pip install --no-deps lpips==0.1.4``), else the torch hub cache, downloaded there from
  :data:`LPIPS_LIN_URL` if absent (full sha256 checked).

An explicit path (argument or environment variable) that does not exist is an error, never a
download. With ``VQKIT_OFFLINE=1`` or no network a missing file raises
:class:`WeightsNotFoundError` naming the file, its URL and where to put it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from ..download import (
    WeightsNotFoundError,
    fetch_weights,
    hash_prefix_from_name,
    hub_checkpoint_path,
    url_filename,
)

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILENAME}"
VGG16_ENV = "VQKIT_VGG16"
LPIPS_LIN_ENV = "VQKIT_LPIPS_LIN"
LPIPS_LIN_FILE = "lpips/weights/v0.1/vgg.pth"
LPIPS_LIN_URL = (
    "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
)
# sha256 of that file as lpips==0.1.4 ships it (7289 bytes).
LPIPS_LIN_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"

# torchvision's vgg16 "D" configuration: conv widths, "M" = 2x2 max pool.
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
# Indices in ``features`` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (lpips' slice ends).
_TAPS = (3, 8, 15, 22, 29)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# lpips' ScalingLayer: ImageNet mean/std expressed for inputs in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10  # lpips.normalize_tensor


class VGG16Features(nn.Module):
    """torchvision's ``vgg16().features`` (same module indices), returning the 5 LPIPS taps.

    Frozen and always in eval mode. ``forward`` stops after relu5_3 (the last pool is unused).
    """

    tap_names = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [
                    nn.Conv2d(in_ch, int(v), kernel_size=3, padding=1),
                    nn.ReLU(inplace=True),
                ]
                in_ch = int(v)
        self.features = nn.Sequential(*layers)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGG16Features:
        return super().train(False)  # no dropout/batch norm, but a frozen loss net stays in eval

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                taps.append(x)
                if i == _TAPS[-1]:
                    break
        return taps

    def load_torchvision_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a torchvision ``vgg16`` state dict: ``features.*`` strictly, ``classifier.*``
        ignored."""
        features = {
            k[len("features.") :]: v for k, v in state_dict.items() if k.startswith("features.")
        }
        other = sorted(k for k in state_dict if not k.startswith(("features.", "classifier.")))
        if other or not features:
            raise ValueError(
                "expected a torchvision vgg16 state dict with keys features.N.weight/bias "
                f"(classifier.* is ignored), got {len(features)} features.* keys and other keys "
                f"{other[:5]}"
            )
        self.features.load_state_dict(features, strict=True)


def _lpips_package_weights() -> Path | None:
    """``weights/v0.1/vgg.pth`` of the installed ``lpips`` package, found without importing it."""
    spec = importlib.util.find_spec("lpips")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "weights" / "v0.1" / "vgg.pth"
        if candidate.is_file():
            return candidate
    try:
        files = importlib.metadata.files("lpips") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).replace("\\", "/").endswith(LPIPS_LIN_FILE):
            candidate = Path(str(f.locate()))
            if candidate.is_file():
                return candidate
    return None


def _explicit_path(path: str | os.PathLike | None, arg: str, env: str) -> tuple[Path, str] | None:
    """(the file, where it was named) when the caller named one: ``path`` (the argument
    ``arg``), else the environment variable ``env``; None means the default places."""
    if path is not None:
        return Path(path).expanduser(), arg
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser(), f"${env}"
    return None


def vgg16_weights_path(path: str | os.PathLike | None = None) -> Path:
    """Where the VGG16 weights are read from: ``path``, else ``$VQKIT_VGG16``, else
    ``torch.hub.get_dir()/checkpoints/vgg16-397923af.pth``, downloaded there from
    :data:`VGG16_URL` if absent. Raises WeightsNotFoundError."""
    name = url_filename(VGG16_URL)
    hub_path = hub_checkpoint_path(name)
    what = f"LPIPS needs the VGG16 ImageNet weights in torchvision format ({name}, 528 MiB)"
    explicit = _explicit_path(path, "vgg_path", VGG16_ENV)
    if explicit is not None:
        candidate, source = explicit
        if not candidate.is_file():
            raise WeightsNotFoundError(
                f"{what}; no file at {candidate} (from {source}). Fix that path, or drop it to "
                f"use the torch hub cache {hub_path}, where vqkit downloads {VGG16_URL} on first "
                "use (never to an explicit path)."
            )
        return candidate
    return fetch_weights(
        VGG16_URL,
        hub_path,
        hash_prefix=hash_prefix_from_name(name),
        what=what,
        manual=(
            "where torchvision.models.vgg16(weights='IMAGENET1K_V1') also saves it, or set "
            f"{VGG16_ENV}=/path/to/{name}, or pass vgg_path="
        ),
    )


def lpips_lin_weights_path(path: str | os.PathLike | None = None) -> Path:
    """Where the LPIPS linear-layer weights are read from: ``path``, else ``$VQKIT_LPIPS_LIN``,
    else the installed ``lpips`` package's ``weights/v0.1/vgg.pth``, else the torch hub cache,
    downloaded there from :data:`LPIPS_LIN_URL` if absent. Raises WeightsNotFoundError."""
    explicit = _explicit_path(path, "lin_path", LPIPS_LIN_ENV)
    if explicit is not None:
        candidate, source = explicit
        if not candidate.is_file():
            raise WeightsNotFoundError(
                f"LPIPS linear-layer weights ({LPIPS_LIN_FILE} of the lpips package): no file at "
                f"{candidate} (from {source})"
            )
        return candidate
    found = _lpips_package_weights()
    if found is not None:
        return found
    return fetch_weights(
        LPIPS_LIN_URL,
        hub_checkpoint_path(f"lpips-v0.1-vgg-{LPIPS_LIN_SHA256[:8]}.pth"),
        sha256=LPIPS_LIN_SHA256,
        what=(
            f"LPIPS needs its linear-layer weights {LPIPS_LIN_FILE} (7 KB), shipped in the lpips "
            "package, which is not installed"
        ),
        manual=(
            "or install that package without its dependencies (they would pull torchvision and "
            f"another torch): pip install --no-deps lpips==0.1.4; or set {LPIPS_LIN_ENV}="
            "/path/to/vgg.pth, or pass lin_path="
        ),
    )


def _load(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download or another format
        raise ValueError(f"cannot read weights from {path}: {e}") from e
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict")
    return dict(state)


_LIN_KEY = re.compile(r"^(?:lins\.|lin)(\d)\.(?:model\.\d\.)?weight$")


class LPIPS(nn.Module):
    """LPIPS distance, VGG variant, v0.1: equal to ``lpips.LPIPS(net="vgg")`` on the same weights.

    Images are (B, 3, H, W) in [-1, 1] (``normalize=True`` for [0, 1]), H and W >= 16. Calling
    the module returns the per-image distance (B,) (``reduction="mean"``/``"sum"`` reduce it);
    ``loss(x, y)`` is always the batch mean, for a generator loss. Parameters are frozen but
    gradients flow to the inputs. ``LPIPS()`` loads the weights (see the module docstring),
    downloading missing ones into the torch hub cache, and raises :class:`WeightsNotFoundError`
    when a file is missing and cannot be downloaded; ``pretrained=False`` builds the network with
    random weights (for tests).

    Under autocast the VGG trunk runs in reduced precision; normalization, differences and the
    linear layers run in float32 (lpips' eps of 1e-10 is zero in float16).
    """

    def __init__(
        self,
        pretrained: bool = True,
        vgg_path: str | os.PathLike | None = None,
        lin_path: str | os.PathLike | None = None,
        reduction: Literal["none", "mean", "sum"] = "none",
    ) -> None:
        super().__init__()
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        if pretrained:
            self.net.load_torchvision_state_dict(_load(vgg16_weights_path(vgg_path)))
            self.load_lin_state_dict(_load(lpips_lin_weights_path(lin_path)))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(
        cls,
        vgg_path: str | os.PathLike | None = None,
        lin_path: str | os.PathLike | None = None,
        reduction: Literal["none", "mean", "sum"] = "none",
    ) -> LPIPS:
        """LPIPS with VGG16 ImageNet and LPIPS v0.1 weights, found or downloaded as the module
        docstring says."""
        return cls(pretrained=True, vgg_path=vgg_path, lin_path=lin_path, reduction=reduction)

    def load_lin_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load the 5 linear layers from lpips' file (``linK.model.1.weight``), a full lpips
        state dict, or this module's own keys (``lins.K.weight``); other keys are ignored."""
        weights: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            m = _LIN_KEY.match(key)
            if m:
                weights[f"{m.group(1)}.weight"] = value
        expected = {f"{k}.weight" for k in range(len(LPIPS_CHANNELS))}
        if set(weights) != expected:
            raise ValueError(
                "expected LPIPS linear weights lin0..lin4 (keys like lin0.model.1.weight), got "
                f"{sorted(k for k in state_dict if _LIN_KEY.match(k)) or sorted(state_dict)[:5]}"
            )
        self.lins.load_state_dict(weights, strict=True)

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # a frozen loss network stays in eval inside a training model

    def layer_distances(self, x: Tensor, y: Tensor, normalize: bool = False) -> Tensor:
        """Per-layer LPIPS terms, (B, 5) for relu1_2 ... relu5_3; they sum to the distance."""
        self._check(x, y)
        if normalize:
            x, y = 2 * x - 1, 2 * y - 1
        dtype = self.shift.dtype
        inp = (torch.cat([x, y]).to(dtype) - self.shift) / self.scale
        terms = []
        for feat, lin in zip(self.net(inp), self.lins, strict=True):
            feat = feat.to(torch.promote_types(feat.dtype, torch.float32))
            feat = feat / (feat.square().sum(dim=1, keepdim=True).sqrt() + _EPS)
            f0, f1 = feat.chunk(2)
            # A 1x1 conv without bias then a spatial mean == the weights against the channel means;
            # written elementwise so autocast leaves it in float32.
            diff = (f0 - f1).square().mean(dim=(2, 3))
            terms.append((diff * lin.weight.view(1, -1).to(diff.dtype)).sum(dim=1))
        return torch.stack(terms, dim=1)

    def distance(self, x: Tensor, y: Tensor, normalize: bool = False) -> Tensor:
        """Per-image LPIPS distance (B,), whatever ``reduction`` is."""
        terms = self.layer_distances(x, y, normalize=normalize)
        dist = terms[:, 0]
        for k in range(1, terms.shape[1]):  # lpips adds the layers one by one
            dist = dist + terms[:, k]
        return dist

    def forward(self, x: Tensor, y: Tensor, normalize: bool = False) -> Tensor:
        dist = self.distance(x, y, normalize=normalize)
        if self.reduction == "mean":
            return dist.mean()
        if self.reduction == "sum":
            return dist.sum()
        return dist

    def loss(self, x: Tensor, y: Tensor, normalize: bool = False) -> Tensor:
        """Batch mean of the distance: the perceptual term of a generator loss."""
        return self.distance(x, y, normalize=normalize).mean()

    @staticmethod
    def _check(x: Tensor, y: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects images of shape (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape != y.shape:
            raise ValueError(
                f"LPIPS inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if min(x.shape[-2:]) < 16:
            raise ValueError(
                f"LPIPS needs H and W >= 16 (4 poolings before relu5_3), got {tuple(x.shape)}"
            )
        if not (x.is_floating_point() and y.is_floating_point()):
            raise ValueError(f"LPIPS expects float images in [-1, 1], got {x.dtype} and {y.dtype}")

    def extra_repr(self) -> str:
        return f"net=vgg16, version=0.1, reduction={self.reduction!r}"

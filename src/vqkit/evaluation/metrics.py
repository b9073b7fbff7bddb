"""PSNR and SSIM of images in [-1, 1] (computed on [0, 1], per image, then averaged)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _to_unit(x: Tensor) -> Tensor:
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of per-image PSNR (dB) with data range 1 on [0, 1] images."""
    mse = (_to_unit(pred) - _to_unit(target)).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean()


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :])[None, None]
    return w.expand(channels, 1, size, size).contiguous()


def ssim(pred: Tensor, target: Tensor, *, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean SSIM (Wang et al. 2004: Gaussian 11x11, sigma 1.5, K1=0.01, K2=0.03, valid conv),
    the definition torchmetrics and scikit-image (gaussian_weights=True) use."""
    x, y = _to_unit(pred), _to_unit(target)
    c = x.shape[1]
    w = _gaussian_window(window, sigma, c, x.device, x.dtype)
    c1, c2 = 0.01**2, 0.03**2

    def filt(t: Tensor) -> Tensor:
        return F.conv2d(t, w, groups=c)

    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).mean()

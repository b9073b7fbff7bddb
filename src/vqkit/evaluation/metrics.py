"""PSNR and SSIM of images in [-1, 1], computed on [0, 1] (PSNR per image, then averaged)."""

from __future__ import annotations

import torch
from torch import Tensor


def _to_unit(x: Tensor) -> Tensor:
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of per-image PSNR (dB) with data range 1 on [0, 1] images."""
    mse = (_to_unit(pred) - _to_unit(target)).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean()


def ssim(pred: Tensor, target: Tensor) -> Tensor:
    """Mean SSIM on [0, 1] images (Gaussian 11x11, sigma 1.5, K1=0.01, K2=0.03), computed by
    torchmetrics so the figure is the one other tokenizer reports use."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(_to_unit(pred), _to_unit(target), data_range=1.0)

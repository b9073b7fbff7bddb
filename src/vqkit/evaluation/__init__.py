"""Reconstruction metrics and codebook reports."""

from .metrics import psnr, ssim

__all__ = ["psnr", "ssim"]

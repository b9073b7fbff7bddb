"""Reconstruction metrics and codebook reports."""

from .analyze import PerBatchUsage, UsageReport, analyze
from .metrics import psnr, ssim

__all__ = ["PerBatchUsage", "UsageReport", "analyze", "psnr", "ssim"]

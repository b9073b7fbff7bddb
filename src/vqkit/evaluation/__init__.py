"""Reconstruction metrics and codebook reports."""

from .analyze import PerBatchUsage, UsageReport, analyze
from .evaluate import evaluate
from .fid import InceptionFeatures, frechet_distance, inception_stats, rfid
from .metrics import psnr, ssim

__all__ = [
    "InceptionFeatures",
    "PerBatchUsage",
    "UsageReport",
    "analyze",
    "evaluate",
    "frechet_distance",
    "inception_stats",
    "psnr",
    "rfid",
    "ssim",
]

"""vqkit: discrete image tokenizers (VQ-VAE, VQ-GAN) whose codebooks stay alive."""

import logging

from .quantize import (
    CodeUsage,
    DeadCodeRestart,
    EMAUpdate,
    EntropyPenalty,
    KMeansInit,
    KMeansReestimate,
    KMeansResult,
    LowUsageReset,
    QuantizerOutput,
    ReservoirSampler,
    UsageStats,
    VectorQuantizer,
    kmeans,
    reset_optimizer_state,
    usage_stats,
)

logging.getLogger("vqkit").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "CodeUsage",
    "DeadCodeRestart",
    "EMAUpdate",
    "EntropyPenalty",
    "KMeansInit",
    "KMeansReestimate",
    "KMeansResult",
    "LowUsageReset",
    "QuantizerOutput",
    "ReservoirSampler",
    "UsageStats",
    "VectorQuantizer",
    "kmeans",
    "reset_optimizer_state",
    "usage_stats",
]

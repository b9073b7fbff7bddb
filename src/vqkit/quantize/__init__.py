"""vqkit.quantize: the library core. Plain torch; no Lightning, no I/O."""

from .distance import nearest, pairwise_sqdist
from .kmeans import KMeansResult, kmeans, kmeans_plusplus
from .maintenance import (
    DeadCodeRestart,
    EMAUpdate,
    KMeansInit,
    KMeansReestimate,
    LowUsageReset,
    Maintenance,
    MaintenanceEvent,
    default_kmeans_start,
    default_local_trials,
    default_reassign,
    default_reservoir_size,
)
from .quantizer import NonFiniteError, QuantizerOutput, VectorQuantizer, reset_optimizer_state
from .regularizers import EntropyPenalty, Regularizer
from .reservoir import ReservoirSampler
from .usage import CodeUsage, EMAUsageStats, UsageStats, usage_stats

__all__ = [
    "CodeUsage",
    "DeadCodeRestart",
    "EMAUpdate",
    "EMAUsageStats",
    "EntropyPenalty",
    "KMeansInit",
    "KMeansReestimate",
    "KMeansResult",
    "LowUsageReset",
    "Maintenance",
    "MaintenanceEvent",
    "NonFiniteError",
    "QuantizerOutput",
    "Regularizer",
    "ReservoirSampler",
    "UsageStats",
    "VectorQuantizer",
    "default_kmeans_start",
    "default_local_trials",
    "default_reassign",
    "default_reservoir_size",
    "kmeans",
    "kmeans_plusplus",
    "nearest",
    "pairwise_sqdist",
    "reset_optimizer_state",
    "usage_stats",
]

"""vqkit.integrations: drop-ins for model families vqkit does not ship.

Each module here builds on ``vqkit.quantize`` and plain torch only; the libraries those models
use (sparse convolutions and the like) are met by duck typing, never imported.
"""

from .sparse import (
    BatchUsage,
    SampleUsage,
    SparseQuantizerOutput,
    SparseVectorQuantizer,
    sample_usage,
)

__all__ = [
    "BatchUsage",
    "SampleUsage",
    "SparseQuantizerOutput",
    "SparseVectorQuantizer",
    "sample_usage",
]

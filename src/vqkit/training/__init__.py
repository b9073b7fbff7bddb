"""Lightning training: the module, callbacks and schedules."""

from .callbacks import TrainingSummary
from .checkpoint import CheckpointError, load_model, load_tokenizer, read_checkpoint
from .module import VQTokenizerModule
from .schedules import warmup_cosine

__all__ = [
    "CheckpointError",
    "load_model",
    "load_tokenizer",
    "read_checkpoint",
    "TrainingSummary",
    "VQTokenizerModule",
    "warmup_cosine",
]

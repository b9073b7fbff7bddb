"""Lightning training: the module, callbacks and schedules."""

from .callbacks import EvaluationCallback, TrainingSummary
from .checkpoint import CheckpointError, load_model, load_tokenizer, read_checkpoint
from .module import VQTokenizerModule
from .schedules import warmup_cosine
from .vqgan import VQGANModule

__all__ = [
    "CheckpointError",
    "EvaluationCallback",
    "load_model",
    "load_tokenizer",
    "read_checkpoint",
    "TrainingSummary",
    "VQGANModule",
    "VQTokenizerModule",
    "warmup_cosine",
]

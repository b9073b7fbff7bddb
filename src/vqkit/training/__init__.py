"""Lightning training: the module, callbacks and schedules."""

from .callbacks import EvaluationCallback, TrainingSummary
from .checkpoint import CheckpointError, load_model, load_tokenizer, read_checkpoint
from .console import ConsoleLog, setup_logging
from .module import VQTokenizerModule
from .progress import StepProgressBar
from .schedules import warmup_cosine
from .vqgan import VQGANModule

__all__ = [
    "CheckpointError",
    "ConsoleLog",
    "EvaluationCallback",
    "load_model",
    "load_tokenizer",
    "read_checkpoint",
    "setup_logging",
    "StepProgressBar",
    "TrainingSummary",
    "VQGANModule",
    "VQTokenizerModule",
    "warmup_cosine",
]

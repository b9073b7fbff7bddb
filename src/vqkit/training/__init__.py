"""Lightning training: the module, callbacks and schedules."""

from .callbacks import EvaluationCallback, SaveOnSigterm, TrainingSummary
from .checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    load_model,
    load_tokenizer,
    read_checkpoint,
)
from .console import ConsoleLog, setup_logging
from .module import VQTokenizerModule
from .progress import StepProgressBar
from .schedules import warmup_cosine
from .sparse3d import SparseSDFModule
from .vqgan import VQGANModule

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "ConsoleLog",
    "EvaluationCallback",
    "load_model",
    "load_tokenizer",
    "read_checkpoint",
    "SaveOnSigterm",
    "SparseSDFModule",
    "setup_logging",
    "StepProgressBar",
    "TrainingSummary",
    "VQGANModule",
    "VQTokenizerModule",
    "warmup_cosine",
]

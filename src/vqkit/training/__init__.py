"""Lightning training: the module, callbacks and schedules."""

from .callbacks import TrainingSummary
from .module import VQTokenizerModule
from .schedules import warmup_cosine

__all__ = ["TrainingSummary", "VQTokenizerModule", "warmup_cosine"]

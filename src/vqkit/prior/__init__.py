"""Autoregressive priors over a tokenizer's code grid (seed 004, phase 3).

``CodeTransformer`` and ``PretrainedPrior`` need only vqkit's core dependencies; the training
parts (``PriorModule``, ``TokenDataModule``, ``load_prior``) import Lightning when first used.
"""

from .pretrained import PretrainedPrior
from .transformer import CodeTransformer, sample_logits

_TRAINING = {
    "TokenDataModule": ".data",
    "encode_dataset": ".data",
    "PriorModule": ".module",
    "load_prior": ".module",
    "load_prior_transformer": ".module",
    "tokenizer_digest": "..pretrained",
}


def __getattr__(name: str):  # noqa: ANN202
    if name in _TRAINING:
        import importlib

        return getattr(importlib.import_module(_TRAINING[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CodeTransformer",
    "PretrainedPrior",
    "PriorModule",
    "TokenDataModule",
    "encode_dataset",
    "load_prior",
    "load_prior_transformer",
    "sample_logits",
    "tokenizer_digest",
]

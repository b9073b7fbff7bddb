"""Autoregressive priors over a tokenizer's code grid (seed 004, phase 3)."""

from .data import TokenDataModule, encode_dataset
from .module import PriorModule, load_prior, load_prior_transformer
from .tokenizer import tokenizer_digest
from .transformer import CodeTransformer, sample_logits

__all__ = [
    "CodeTransformer",
    "PriorModule",
    "TokenDataModule",
    "encode_dataset",
    "load_prior",
    "load_prior_transformer",
    "sample_logits",
    "tokenizer_digest",
]

"""Loss terms on the soft code assignment softmax(-d / tau)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configurable import Configurable
from . import distributed as D
from .interface import CodebookOwner


class Regularizer(Configurable, nn.Module):
    """Base class: ``forward(quantizer, z) -> weighted loss``; ``name`` keys it in ``losses``."""

    name = "regularizer"

    def bind(self, quantizer: CodebookOwner) -> None:
        """Called once by the quantizer that owns this term."""

    def forward(self, quantizer: CodebookOwner, z: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class EntropyPenalty(Regularizer):
    """Per-token entropy minus the entropy of the batch-average assignment, times ``weight``.

    Minimizing it makes each token decisive while spreading the batch over all codes. Under
    DDP the batch average is taken over every process (with gradients flowing back to each), so
    "spread" means spread over the global batch. The soft assignment is a full (M, K) matrix
    with gradients, so at most ``max_tokens`` random tokens of a batch are used.
    """

    name = "entropy"

    def __init__(
        self, weight: float = 0.1, temperature: float = 1.0, max_tokens: int | None = 8192
    ) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        self.weight = weight
        self.temperature = temperature
        self.max_tokens = max_tokens

    def forward(self, quantizer: CodebookOwner, z: Tensor) -> Tensor:
        if self.max_tokens is not None and z.shape[0] > self.max_tokens:
            z = z[torch.randperm(z.shape[0], device=z.device)[: self.max_tokens]]
        logits = -quantizer.distances(z) / self.temperature
        logp = F.log_softmax(logits, dim=1)
        p = logp.exp()
        per_token = -(p * logp).sum(1).mean()
        psum = p.sum(0)
        n = torch.tensor(float(z.shape[0]), device=z.device)
        if quantizer.training and D.is_distributed():
            psum = D.differentiable_all_reduce_sum(psum)
            n = D.all_reduce_sum_(n)
        avg = psum / n.clamp_min(1.0)
        batch = -(avg * torch.log(avg.clamp_min(1e-12))).sum()
        return self.weight * (per_token - batch)

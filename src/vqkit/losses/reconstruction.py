"""The VQ-VAE objective: lambda_rec * (L1 [+ L2]) + the quantizer's own loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class VQLoss(nn.Module):
    """Weighted sum of reconstruction terms and the quantizer loss.

    ``forward`` returns the total and a dict of the weighted terms (so the dict sums to the
    total), which the training module logs one by one. Perceptual and adversarial terms extend
    this object rather than the training step.
    """

    def __init__(
        self, l1_weight: float = 1.0, l2_weight: float = 0.0, quantizer_weight: float = 1.0
    ) -> None:
        super().__init__()
        for name, w in (
            ("l1_weight", l1_weight),
            ("l2_weight", l2_weight),
            ("quantizer_weight", quantizer_weight),
        ):
            if w < 0:
                raise ValueError(f"{name} must be >= 0, got {w}")
        if l1_weight == 0 and l2_weight == 0:
            raise ValueError("at least one of l1_weight and l2_weight must be > 0")
        self.l1_weight = l1_weight
        self.l2_weight = l2_weight
        self.quantizer_weight = quantizer_weight

    def forward(
        self, images: Tensor, reconstructions: Tensor, vq_losses: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        terms: dict[str, Tensor] = {}
        if self.l1_weight:
            terms["l1"] = self.l1_weight * F.l1_loss(reconstructions, images)
        if self.l2_weight:
            terms["l2"] = self.l2_weight * F.mse_loss(reconstructions, images)
        for name, value in vq_losses.items():
            terms[f"vq_{name}"] = self.quantizer_weight * value
        total = sum(terms.values())
        return total, terms

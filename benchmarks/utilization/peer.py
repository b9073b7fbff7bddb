"""Row 10's adapter: ``vector_quantize_pytorch`` presented as a vqkit quantizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vqkit.quantize import CodeUsage, QuantizerOutput
from vqkit.quantize.distance import nearest


class PeerQuantizer(nn.Module):
    """``vector_quantize_pytorch.VectorQuantize`` presented as the quantizer ``VQModel`` and
    ``VQTokenizerModule`` expect: a ``QuantizerOutput`` from ``forward``, ``encode``/``decode``,
    ``codebook_size``/``dim``/``channel_first``, ``uses_ema`` (its codebook is an EMA buffer, no
    optimizer parameter), an empty ``replaced_mask`` and a ``CodeUsage`` fed from the indices it
    returns (so its usage is counted by vqkit's code, like every other row)."""

    channel_first = True

    def __init__(self, dim: int, codebook_size: int, **peer_kwargs: Any) -> None:
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        try:  # its k-means init warns through loguru on every tiny batch
            from loguru import logger

            logger.disable("vector_quantize_pytorch")
        except ImportError:
            pass
        self.vq = VectorQuantize(
            dim=dim, codebook_size=codebook_size, accept_image_fmap=True, **peer_kwargs
        )
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = dim
        self.maintenance = nn.ModuleList()
        self.usage = CodeUsage(codebook_size)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("replaced_mask", torch.zeros(codebook_size, dtype=torch.bool))
        self.register_buffer("num_replacements", torch.zeros((), dtype=torch.long))

    @property
    def uses_ema(self) -> bool:
        return not any(p.requires_grad for p in self.vq._codebook.parameters())

    @property
    def current_step(self) -> int:
        return int(self.step)

    def forward(self, x: Tensor) -> QuantizerOutput:
        quantized, indices, loss = self.vq(x)
        counts = torch.bincount(indices.reshape(-1), minlength=self.codebook_size)
        if self.training:
            self.usage.update_train(counts)
            self.step.add_(1)
        else:
            self.usage.update_eval(counts)
        loss = loss.sum()
        p = counts.float() / counts.sum().clamp_min(1)
        ppl = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
        return QuantizerOutput(
            quantized=quantized,
            indices=indices,
            loss=loss,
            losses={"commitment": loss},
            used_codes=(counts > 0).sum(),
            perplexity=ppl,
        )

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        flat = x.movedim(1, -1)
        idx, _ = nearest(flat.reshape(-1, self.dim).float(), self.vq.codebook.float())
        return idx.view(flat.shape[:-1])

    def decode(self, indices: Tensor) -> Tensor:
        return self.vq.get_codes_from_indices(indices.long())

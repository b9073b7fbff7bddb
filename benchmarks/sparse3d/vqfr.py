"""The seed-001 quantizer as its author wrote it, for the comparison: a TRELLIS-style
``SparseVectorQuantizer`` with VQFR's re-estimation (seed 000, ``vqfr/archs/quantizer_arch.py``).

- codebook: ``nn.Embedding`` initialized uniform(-1/K, 1/K) and learned by gradients
  (``use_ema_update: false``, the seed's gradient mode); loss
  ``beta * |sg(q) - z|^2 + |q - sg(z)|^2`` with beta 0.25; straight-through gradients;
- ``use_kmeans_reinit``: every training forward adds its tokens to a reservoir of
  ``reservoir_size`` (16,384 in the seed) with the seed's ``NewReservoirSampler.add``: a slice
  while it fills, then one Python iteration per token; at every step that is a multiple of
  ``kmeans_interval`` the whole codebook is replaced by ``sklearn.cluster.k_means(reservoir, K,
  random_state=0)`` run on the CPU (skipped, with the seed's log line, while the reservoir
  holds fewer than K vectors), and the reservoir is emptied;
- under torch.distributed the tokens of every process are gathered to each (the seed's
  ``all_gather``) and k-means runs on rank 0, the codebook broadcast from there.

It is presented with the attributes vqkit's model, training module and callbacks read
(``usage``, ``codebook``, ``uses_ema``, ``replaced_mask``, ``encode``/``decode``), and it records
the wall time spent in scikit-learn (``kmeans_seconds``). With ``use_kmeans_reinit=False`` it is
the model's original quantizer: the "no maintenance" row.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vqkit.quantize import CodeUsage, QuantizerOutput
from vqkit.quantize.distance import nearest

log = logging.getLogger("vqkit.bench.vqfr")


class SeedReservoir(nn.Module):
    """``NewReservoirSampler`` of seed 000, as written (including its per-token loop)."""

    def __init__(self, num_samples: int) -> None:
        super().__init__()
        self.n = num_samples
        self.buffer: Tensor | None = None
        self.i = 0

    def reset(self) -> None:
        self.i = 0
        self.buffer = None

    def add(self, samples: Tensor) -> None:
        if self.buffer is None:
            self.buffer = torch.empty(self.n, samples.size(-1), device=samples.device)
        if self.i < self.n:
            slots = self.n - self.i
            add = samples[:slots]
            self.buffer[self.i : self.i + len(add)] = add
            self.i += len(add)
        else:
            positions = torch.randint(0, self.i, size=(len(samples),), device=samples.device)
            for s, pos in zip(samples, positions.tolist(), strict=True):
                self.i += 1
                if pos < len(self.buffer):
                    self.buffer[pos] = s

    def contents(self) -> Tensor:
        if self.buffer is None:
            return torch.empty(0, 0)
        return self.buffer[: min(self.i, self.n)]


class VQFRQuantizer(nn.Module):
    """The seed-001 quantizer (see the module docstring) on (N, D) token lists."""

    channel_first = False

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        beta: float = 0.25,
        use_kmeans_reinit: bool = True,
        kmeans_interval: int = 2000,
        reservoir_size: int = 16384,
    ) -> None:
        super().__init__()
        self.dim, self.codebook_size, self.codebook_dim = dim, codebook_size, dim
        self.beta = beta
        self.use_kmeans_reinit = use_kmeans_reinit
        self.kmeans_interval = kmeans_interval
        self.embedding = nn.Embedding(codebook_size, dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        self.reservoir = SeedReservoir(reservoir_size)
        self.usage = CodeUsage(codebook_size)
        self.maintenance = nn.ModuleList()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("replaced_mask", torch.zeros(codebook_size, dtype=torch.bool))
        self.kmeans_seconds = 0.0
        self.kmeans_calls = 0
        self.kmeans_skips = 0

    @property
    def codebook(self) -> Tensor:
        return self.embedding.weight

    @property
    def uses_ema(self) -> bool:
        return False

    @property
    def current_step(self) -> int:
        return int(self.step)

    def describe_schedule(self) -> list[str]:
        what = (
            f"scikit-learn k-means of the whole codebook every {self.kmeans_interval} steps "
            f"from a {self.reservoir.n}-vector reservoir"
            if self.use_kmeans_reinit
            else "no maintenance"
        )
        return [f"seed-001 quantizer: {self.codebook_size} codes, gradient mode; {what}"]

    def pop_events(self) -> list:
        return []

    @torch.no_grad()
    def reestimate(self) -> None:
        from sklearn import cluster

        encodings = self.reservoir.contents()
        if encodings.shape[0] < self.codebook_size:
            log.info("Skipping reestimation, too few samples")
            self.kmeans_skips += 1
            return
        log.info("begin reestimation")
        t0 = time.perf_counter()
        weight = self.embedding.weight
        if not dist.is_initialized() or dist.get_rank() == 0:
            clustered, *_ = cluster.k_means(
                encodings.cpu().numpy(), self.codebook_size, random_state=0
            )
            weight.data[...] = torch.tensor(clustered).to(weight.device, weight.dtype)
        if dist.is_initialized():
            dist.broadcast(weight.data, src=0)
        self.kmeans_seconds += time.perf_counter() - t0
        self.kmeans_calls += 1
        self.reservoir.reset()
        log.info("end reestimation")

    def forward(self, z: Tensor) -> QuantizerOutput:
        step = int(self.step)
        if self.training and self.use_kmeans_reinit:
            z_all = z.detach()
            if dist.is_initialized():
                parts = [torch.empty_like(z_all) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, z_all)  # the seed's gather (equal N per process)
                z_all = torch.cat(parts)
            self.reservoir.add(z_all.view(-1, z_all.size(-1)))
            if step % self.kmeans_interval == 0:
                self.reestimate()
        embedding = self.embedding.weight
        indices, _ = nearest(z.detach().float(), embedding.detach().float())
        z_q = self.embedding(indices)
        commitment = self.beta * F.mse_loss(z, z_q.detach())
        codebook = F.mse_loss(z_q, z.detach())
        quantized = z + (z_q - z).detach()
        counts = torch.bincount(indices, minlength=self.codebook_size)
        if self.training:
            self.usage.update_train(counts)
            self.step.add_(1)
        else:
            self.usage.update_eval(counts)
        p = counts.float() / counts.sum().clamp_min(1)
        ppl = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
        return QuantizerOutput(
            quantized=quantized,
            indices=indices,
            loss=commitment + codebook,
            losses={"commitment": commitment, "codebook": codebook},
            used_codes=(counts > 0).sum(),
            perplexity=ppl,
        )

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        return nearest(z.float(), self.embedding.weight.float())[0]

    def decode(self, indices: Tensor) -> Tensor:
        return self.embedding(indices.long())

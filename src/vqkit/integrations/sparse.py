"""A drop-in quantizer for sparse-voxel VQ-VAEs (TRELLIS-style ``SparseSDFVQVAE`` models).

Such models pass around a flat ``(N, D)`` feature tensor of active voxels with an ``(N,)``
batch index, or a sparse-tensor object holding both: ``.feats``, ``.coords`` (batch index in
column 0) and ``.replace(feats)`` (TRELLIS' and torchsparse's convention). Sparse tensors are
met by duck typing: vqkit imports no sparse-convolution library.

``SparseVectorQuantizer`` takes the argument names such a model's JSON config already uses
(``num_embeddings``, ``beta``, ``use_kmeans_reinit``, ...) and builds vqkit's
``VectorQuantizer`` and maintenance strategies from them, so the model changes one import and
keeps its config. It returns, besides the quantized input and the losses, usage figures for
the whole batch and for each sample, the latter computed from the batch index without a
Python loop over samples.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..configurable import Configurable
from ..quantize.maintenance import (
    DeadCodeRestart,
    EMAUpdate,
    KMeansInit,
    KMeansReestimate,
    Maintenance,
)
from ..quantize.quantizer import VectorQuantizer

log = logging.getLogger("vqkit.integrations.sparse")

# KMeansReestimate needs a last step; "never stop" is a step no run reaches.


@dataclass
class BatchUsage:
    """Code use of the whole batch. In training under DDP these count every process's tokens
    (like ``QuantizerOutput``); in eval, this process's."""

    tokens: Tensor  # () long
    used_codes: Tensor  # () long: distinct codes assigned
    perplexity: Tensor  # () float: exp of the entropy of the code distribution
    utilization: Tensor  # () float: used_codes / codebook_size

    def as_dict(self, prefix: str = "batch_") -> dict[str, float]:
        return {
            f"{prefix}tokens": float(self.tokens),
            f"{prefix}used_codes": float(self.used_codes),
            f"{prefix}perplexity": float(self.perplexity),
            f"{prefix}utilization": float(self.utilization),
        }


@dataclass
class SampleUsage:
    """Code use of each sample of this process's batch, tensors of length B.

    A sample with no tokens has 0 in every field (its perplexity is undefined, not 1).
    """

    tokens: Tensor  # (B,) long: active voxels of the sample
    used_codes: Tensor  # (B,) long: distinct codes among them
    perplexity: Tensor  # (B,) float: exp of the entropy of the sample's code distribution
    used_per_token: Tensor  # (B,) float: used_codes / tokens (1 when every voxel differs)

    def as_dict(self, prefix: str = "sample_") -> dict[str, float]:
        """Means over the samples that have tokens (what a training log wants per step)."""
        keep = self.tokens > 0
        n = int(keep.sum())
        out = {f"{prefix}count": float(n)}
        for name in ("used_codes", "perplexity", "used_per_token"):
            v = getattr(self, name)[keep].float()
            out[f"{prefix}{name}_mean"] = float(v.mean()) if n else 0.0
        return out


@dataclass
class SparseQuantizerOutput:
    """What ``SparseVectorQuantizer`` returns.

    ``quantized`` is of the input's kind: a tensor for a tensor, ``x.replace(q)`` for a sparse
    tensor. ``loss == sum(losses.values())``. ``batch`` describes the whole batch, ``per_sample``
    each sample of this process. ``passthrough`` is True on a k-means warm-up step (the input
    went through unquantized).
    """

    quantized: Any
    indices: Tensor  # (N,) long
    loss: Tensor
    losses: dict[str, Tensor]
    batch: BatchUsage
    per_sample: SampleUsage
    batch_index: Tensor  # (N,) long: the sample of each token, as used for per_sample
    passthrough: bool = False

    def as_dict(self) -> dict[str, float]:
        """Every loss and usage figure as a flat dict of floats, for a logger."""
        out = {name: float(v.detach()) for name, v in self.losses.items()}
        out.update(self.batch.as_dict())
        out.update(self.per_sample.as_dict())
        return out


def sample_usage(
    indices: Tensor, batch_index: Tensor, codebook_size: int, batch_size: int | None = None
) -> SampleUsage:
    """Per-sample code use of ``indices`` (N,) whose samples are ``batch_index`` (N,).

    Vectorized: the distinct (sample, code) pairs are found by one ``torch.unique`` over
    ``sample * codebook_size + code``, so the cost is O(N log N) whatever B and K are (a dense
    (B, K) count table would not fit for large codebooks). ``batch_size`` defaults to
    ``batch_index.max() + 1`` (0 for no tokens).
    """
    if indices.dim() != 1 or batch_index.shape != indices.shape:
        raise ValueError(
            f"indices and batch_index must both be (N,), got {tuple(indices.shape)} and "
            f"{tuple(batch_index.shape)}"
        )
    batch_size = _batch_size(batch_index, batch_size)
    return _sample_usage(indices, batch_index.long(), codebook_size, batch_size)


def _batch_size(batch_index: Tensor, batch_size: int | None) -> int:
    """Check ``batch_index`` and return B (``batch_size``, or the largest index + 1)."""
    if (
        batch_index.is_floating_point()
        or batch_index.is_complex()
        or batch_index.dtype == torch.bool
    ):
        raise TypeError(f"batch_index must be an integer tensor, got {batch_index.dtype}")
    if batch_index.numel():
        lo, hi = torch.stack(torch.aminmax(batch_index)).tolist()  # one sync for both bounds
        if lo < 0:
            raise ValueError(f"batch_index must be >= 0, got {lo}")
    else:
        hi = -1
    if batch_size is None:
        return hi + 1
    if batch_size < 0 or hi >= batch_size:
        raise ValueError(
            f"batch_index holds sample {hi}, so batch_size must be > {hi}, got {batch_size}"
        )
    return batch_size


def _sample_usage(indices: Tensor, bi: Tensor, codebook_size: int, batch_size: int) -> SampleUsage:
    bi = bi.to(indices.device)
    tokens = torch.bincount(bi, minlength=batch_size)
    pairs, counts = torch.unique(bi * codebook_size + indices.long(), return_counts=True)
    sample = torch.div(pairs, codebook_size, rounding_mode="floor")
    used = torch.bincount(sample, minlength=batch_size)
    p = counts.float() / tokens[sample].float()
    ent = torch.zeros(batch_size, device=bi.device).index_add_(0, sample, -p * torch.log(p))
    perplexity = torch.where(tokens > 0, torch.exp(ent), torch.zeros_like(ent))
    return SampleUsage(
        tokens=tokens,
        used_codes=used,
        perplexity=perplexity,
        used_per_token=used.float() / tokens.clamp_min(1).float(),
    )


class SparseVectorQuantizer(Configurable, nn.Module):
    """Vector quantizer for sparse-voxel VQ-VAEs, configured by their usual argument names.

    The first eight arguments are the names a ``SparseSDFVQVAE`` JSON config uses; the
    keyword-only ones are vqkit's additions (see ``docs/sparse3d.md`` for the mapping).

    Args:
        num_embeddings: codes K (``codebook_size``).
        embedding_dim: feature width D of the active voxels (``dim``).
        beta: commitment weight.
        use_ema_update: learn the codebook by moving averages (``EMAUpdate``) instead of
            gradients.
        decay: the EMA decay (used only with ``use_ema_update``).
        use_kmeans_reinit: re-estimate the codebook by k-means every ``kmeans_interval``
            training forwards (``KMeansReestimate``), from a reservoir of ``reservoir_size``
            encoder outputs gathered over all processes.
        kmeans_interval: steps between re-estimations.
        reservoir_size: vectors the reservoir keeps (>= ``num_embeddings``).
        kmeans_init: set the codebook to the k-means centers of the first batches
            (``KMeansInit``, same reservoir) instead of leaving it at random vectors, most of
            which no encoder output would ever pick.
        kmeans_mode: ``"full"`` replaces the whole codebook at each re-estimation (VQFR, the
            original behaviour); ``"dead"`` re-places only codes unused since the last one.
        kmeans_until: last step of re-estimation; None re-estimates for the whole run.
        dead_code_threshold: restart at an encoder output any code whose EMA usage falls below
            this share of the uniform rate, tokens per step / ``num_embeddings``
            (``DeadCodeRestart(relative=True)``; 0.25: a quarter as often as a uniform
            codebook's), so codes that die between two re-estimations (or without any) come
            back within a step; 0 turns it off.
        dead_code_floor: a lower bound on that threshold in tokens per step
            (``DeadCodeRestart(floor=...)``; 0: none). It matters only with more codes than
            about 16 x ``dead_code_threshold`` x tokens per step, where a quarter of the uniform
            rate is far below one use per usage window and codes the encoder has left look
            alive for a hundred steps; the image configs use 1/16.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        beta: float = 0.25,
        use_ema_update: bool = False,
        decay: float = 0.99,
        use_kmeans_reinit: bool = False,
        kmeans_interval: int = 2000,
        reservoir_size: int = 16384,
        *,
        kmeans_init: bool = True,
        kmeans_mode: str = "full",
        kmeans_until: int | None = None,
        dead_code_threshold: float = 0.25,
        dead_code_floor: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("use_ema_update", use_ema_update),
            ("use_kmeans_reinit", use_kmeans_reinit),
            ("kmeans_init", kmeans_init),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be true or false, got {value!r}")
        for name, value in (
            ("num_embeddings", num_embeddings),
            ("embedding_dim", embedding_dim),
            ("kmeans_interval", kmeans_interval),
            ("reservoir_size", reservoir_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        if kmeans_interval < 1:
            raise ValueError(f"kmeans_interval must be >= 1, got {kmeans_interval}")
        if (kmeans_init or use_kmeans_reinit) and reservoir_size < num_embeddings:
            raise ValueError(
                f"reservoir_size ({reservoir_size}) must be >= num_embeddings "
                f"({num_embeddings}), or k-means could never run"
            )
        if kmeans_mode not in ("full", "dead"):
            raise ValueError(f"kmeans_mode must be 'full' or 'dead', got {kmeans_mode!r}")
        if kmeans_until is not None and kmeans_until < 1:
            raise ValueError(f"kmeans_until must be >= 1 or None, got {kmeans_until}")
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {dead_code_threshold}")
        if not dead_code_floor >= 0:  # also rejects NaN
            raise ValueError(
                f"dead_code_floor must be >= 0 (tokens per step), got {dead_code_floor}"
            )
        if dead_code_floor > 0 and dead_code_threshold == 0:
            raise ValueError(
                "dead_code_floor bounds the dead-code restart's threshold, which "
                "dead_code_threshold=0 turns off; set dead_code_threshold > 0"
            )
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim

        maintenance: list[Maintenance] = []
        if kmeans_init:
            maintenance.append(KMeansInit(reservoir_size=reservoir_size))
        if use_kmeans_reinit:
            maintenance.append(
                KMeansReestimate(
                    every=kmeans_interval,
                    until=kmeans_until,
                    reservoir_size=reservoir_size,
                    mode=kmeans_mode,
                )
            )
        if dead_code_threshold > 0:
            maintenance.append(
                DeadCodeRestart(threshold=dead_code_threshold, relative=True, floor=dead_code_floor)
            )
        self.quantizer = VectorQuantizer(
            embedding_dim,
            num_embeddings,
            commitment_weight=beta,
            ema=EMAUpdate(decay=decay) if use_ema_update else None,
            maintenance=maintenance,
            channel_first=False,
        )
        self._step_noted = False

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], *, strict: bool = True
    ) -> SparseVectorQuantizer:
        """Build from a JSON config's ``args`` dict (the keys of this class's signature).

        An unknown key raises a ``ValueError`` naming it. ``strict=False`` ignores unknown keys
        with one warning instead, so a whole model's ``args`` (encoder and decoder keys
        included) can be handed over as it is.
        """
        params = inspect.signature(cls.__init__).parameters
        names = [n for n in params if n != "self"]
        unknown = sorted(set(config) - set(names))
        if unknown and strict:
            raise ValueError(
                f"unknown {cls.__name__} config keys {unknown}; valid keys are {names} "
                "(strict=False ignores the keys of the rest of a model's config)"
            )
        if unknown:
            log.warning("%s ignores config keys %s", cls.__name__, unknown)
        required = [n for n in names if params[n].default is inspect.Parameter.empty]
        missing = [n for n in required if n not in config]
        if missing:
            raise ValueError(f"{cls.__name__} config lacks the required keys {missing}")
        return cls(**{k: v for k, v in config.items() if k in params})

    def forward(
        self,
        x: Any,
        batch_index: Tensor | None = None,
        *,
        batch_size: int | None = None,
        current_step: int | None = None,
    ) -> SparseQuantizerOutput:
        """Quantize ``x``: an (N, D) tensor (its samples in ``batch_index``, else one sample),
        or a sparse tensor (samples in ``x.coords[:, 0]`` unless ``batch_index`` is given).

        ``batch_size`` fixes the length B of the per-sample figures (default: the largest
        sample index + 1). ``current_step`` is accepted for models that pass their trainer's
        step, and ignored: the quantizer counts its own training forwards.
        """
        if current_step is not None and not self._step_noted:
            log.info(
                "SparseVectorQuantizer ignores current_step: the quantizer counts its own "
                "training forwards (step %d now), so nothing needs to pass a step in",
                self.quantizer.current_step,
            )
            self._step_noted = True
        feats, batch_index, sparse = self._unpack(x, batch_index)
        # checked before the quantizer runs: a bad index must not leave a half-done step
        batch_size = _batch_size(batch_index, batch_size)
        out = self.quantizer(feats)
        per_sample = _sample_usage(out.indices, batch_index.long(), self.num_embeddings, batch_size)
        tokens = self.quantizer.last_tokens if self.training else feats.shape[0]
        used = out.used_codes
        batch = BatchUsage(
            tokens=torch.tensor(tokens, device=feats.device),
            used_codes=used,
            perplexity=out.perplexity,
            utilization=used.float() / self.num_embeddings,
        )
        return SparseQuantizerOutput(
            quantized=x.replace(out.quantized) if sparse else out.quantized,
            indices=out.indices,
            loss=out.loss,
            losses=out.losses,
            batch=batch,
            per_sample=per_sample,
            batch_index=batch_index.long(),
            passthrough=out.passthrough,
        )

    def _unpack(self, x: Any, batch_index: Tensor | None) -> tuple[Tensor, Tensor, bool]:
        """(features, batch index, whether x is a sparse tensor)."""
        if isinstance(x, Tensor):
            feats, sparse = x, False
        else:
            missing = [a for a in ("feats", "coords", "replace") if not hasattr(x, a)]
            if missing:
                raise TypeError(
                    "x must be an (N, D) tensor or a sparse tensor with .feats, .coords and "
                    f".replace(feats); got {type(x).__name__}, which lacks {missing}"
                )
            feats, sparse = x.feats, True
            if batch_index is None:
                batch_index = x.coords[:, 0]
        if feats.dim() != 2:
            raise ValueError(
                f"features must be (N, D) with D={self.embedding_dim}, got shape "
                f"{tuple(feats.shape)}"
            )
        if batch_index is None:
            batch_index = torch.zeros(feats.shape[0], dtype=torch.long, device=feats.device)
        if batch_index.shape != (feats.shape[0],):
            raise ValueError(
                f"batch_index must be ({feats.shape[0]},), one sample index per token, got "
                f"{tuple(batch_index.shape)}"
            )
        return feats, batch_index, sparse

    def describe_schedule(self) -> list[str]:
        """What keeps the codebook alive and when (``VectorQuantizer.describe_schedule``)."""
        return self.quantizer.describe_schedule()

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"

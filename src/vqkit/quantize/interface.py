"""The interface between the quantizer and the strategies bound to it (``EMAUpdate``,
``Maintenance``, ``Regularizer``): the view of the quantizer they may use, and the events they
report. Strategies import this module, never the quantizer's, so each can be read and tested
alone (with a ``VectorQuantizer`` or any object that has these members)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from .reservoir import ReservoirSampler
from .usage import CodeUsage


@dataclass
class MaintenanceEvent:
    """One thing a strategy did (or declined to do) to the codebook at one training step.

    Strategies append these to ``quantizer.events`` (drained by ``quantizer.pop_events()``; the
    training callback turns them into console lines and TensorBoard scalars) and log
    ``message()`` on the ``vqkit.quantize`` logger from the first process.
    """

    step: int
    strategy: str  # "k-means init", "k-means re-estimation", "dead-code restart"
    status: str  # "done" or "skipped"
    samples: int = 0  # reservoir vectors the k-means ran on (or had, when skipped)
    codes_replaced: int = 0
    inertia: float | None = None  # k-means mean squared distance, first process only
    ms: float = 0.0
    detail: str = ""  # why it was skipped, or what the replaced codes were
    usage_mean: float | None = None  # dead-code restart: EMA usage of the restarted codes
    usage_max: float | None = None

    def message(self) -> str:
        head = f"{self.strategy} at step {self.step}"
        if self.status == "skipped":
            return f"{head} skipped: {self.detail}"
        parts = []
        if self.samples:
            parts.append(f"{self.samples} samples")
        parts.append(f"{self.codes_replaced} codes replaced")
        if self.inertia is not None and self.inertia == self.inertia:  # not NaN
            parts.append(f"inertia {self.inertia:.4g}")
        if self.ms:
            parts.append(f"{self.ms:.0f} ms")
        tail = f" ({self.detail})" if self.detail else ""
        return f"{head}: " + ", ".join(parts) + tail


class CodebookOwner(Protocol):
    """What a strategy may read and call on the quantizer it is bound to;
    ``VectorQuantizer`` satisfies it."""

    codebook: Tensor  # (K, codebook_dim): a Parameter (gradient mode) or a buffer (EMA)
    codebook_size: int
    codebook_dim: int
    distance: str  # "l2" or "cosine"
    training: bool
    usage: CodeUsage
    events: deque[MaintenanceEvent]
    reservoirs: nn.ModuleDict

    @property
    def current_step(self) -> int:
        """Training forwards done so far."""
        ...

    @property
    def last_tokens(self) -> int:
        """Tokens of the last training forward, summed over processes."""
        ...

    @property
    def last_min_dist(self) -> Tensor | None:
        """Each token's squared distance to its code in the last training forward, when a
        strategy asked for it (``Maintenance.needs_min_distances``)."""
        ...

    def effective_codebook(self) -> Tensor: ...

    def distances(self, z: Tensor) -> Tensor: ...

    def replace_codes(self, mask: Tensor, new_codes: Tensor, new_counts: Tensor) -> int: ...

    def shared_reservoir(
        self, size: int, dtype: torch.dtype, device: str | None, seed: int
    ) -> ReservoirSampler: ...

    def pop_events(self) -> list[MaintenanceEvent]: ...

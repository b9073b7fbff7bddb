"""Code-usage statistics over clearly named horizons.

Seed 002's tool reported "100% utilization" from cumulative EMA statistics while every batch used
two codes. Here every figure says which horizon it counts over, and a figure derived from EMA
sizes is never called utilization:

- ``batch``:  the codes the last training forward assigned (summed over processes under DDP);
  warm-up forwards, whose input passes through unquantized, count in no horizon;
- ``window``: training assignments since the window was last reset (by ``reset_window()``, or
  automatically every ``window_steps`` forwards when that is set); a replaced code's count
  restarts at 0, the window goes on;
- ``eval``:   assignments made in eval mode only, as VQFR counts usage in validation;
- ``ema``:    an exponential moving average of per-batch counts (what dead-code restart reads).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from . import distributed as D

HORIZONS = ("batch", "window", "eval")


@dataclass(frozen=True)
class UsageStats:
    """Usage figures for one horizon. ``dead_codes`` counts codes used fewer than ``dead_below``."""

    horizon: str
    codebook_size: int
    tokens: int
    used_codes: int
    utilization: float
    perplexity: float
    normalized_entropy: float
    dead_codes: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        d = asdict(self)
        d.pop("horizon")
        return {f"{prefix}{k}": float(v) for k, v in d.items()}


@dataclass(frozen=True)
class EMAUsageStats:
    """Figures derived from EMA counts: smoothed history, not the use of any real set of tokens."""

    codebook_size: int
    codes_above_threshold: int
    ema_perplexity: float
    ema_normalized_entropy: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


def entropy(counts: Tensor) -> Tensor:
    """Shannon entropy (nats) of the distribution proportional to ``counts``; 0 for no counts."""
    c = counts.double()
    total = c.sum()
    if total <= 0:
        return torch.zeros((), dtype=torch.float64, device=counts.device)
    p = c / total
    return -(p * torch.log(p.clamp_min(1e-300))).sum()


def usage_stats(counts: Tensor, *, dead_below: float = 1, horizon: str = "custom") -> UsageStats:
    """Figures of a count vector (K,): used codes, utilization, exp(H), H / log K, dead codes."""
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D (codebook_size,), got shape {tuple(counts.shape)}")
    k = counts.numel()
    if k < 2:
        raise ValueError(f"codebook_size must be >= 2, got {k}")
    h = float(entropy(counts))
    used = int((counts > 0).sum())
    return UsageStats(
        horizon=horizon,
        codebook_size=k,
        tokens=int(counts.sum()),
        used_codes=used,
        utilization=used / k,
        perplexity=math.exp(h),
        normalized_entropy=h / math.log(k),
        dead_codes=int((counts < dead_below).sum()),
    )


class CodeUsage(nn.Module):
    """Counts code use for a quantizer. All state is in buffers, so it survives ``state_dict``."""

    def __init__(
        self,
        codebook_size: int,
        *,
        ema_decay: float = 0.99,
        dead_below: float = 1,
        window_steps: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if window_steps is not None and window_steps <= 0:
            raise ValueError(f"window_steps must be > 0 or None, got {window_steps}")
        self.codebook_size = codebook_size
        self.ema_decay = ema_decay
        self.dead_below = dead_below
        self.window_steps = window_steps
        self.register_buffer("batch_counts", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("window_counts", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("eval_counts", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("ema_counts", torch.zeros(codebook_size, dtype=torch.float32))
        self.register_buffer("window_forwards", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema_started", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update_train(self, counts: Tensor) -> None:
        """Record one training forward's global counts (already summed over processes)."""
        if self.window_steps is not None and int(self.window_forwards) >= self.window_steps:
            self.reset_window()
        self.batch_counts.copy_(counts)
        self.window_counts.add_(counts)
        self.window_forwards.add_(1)
        c = counts.to(self.ema_counts.dtype)
        if not bool(self.ema_started):
            # Start the average at the first batch instead of at zero, so early steps do not
            # read every code as dead.
            self.ema_counts.copy_(c)
            self.ema_started.fill_(True)
        else:
            self.ema_counts.mul_(self.ema_decay).add_(c, alpha=1.0 - self.ema_decay)

    @torch.no_grad()
    def update_eval(self, counts: Tensor) -> None:
        self.eval_counts.add_(counts)

    def reset_window(self) -> None:
        self.window_counts.zero_()
        self.window_forwards.zero_()

    def reset_eval(self) -> None:
        self.eval_counts.zero_()

    def counts(self, horizon: str, *, sync: bool = False) -> Tensor:
        """Counts of ``horizon``. Training horizons are already global; ``sync=True`` sums the
        eval counts over processes (each process only saw its shard of the validation set)."""
        if horizon not in HORIZONS:
            raise ValueError(f"horizon must be one of {HORIZONS}, got {horizon!r}")
        c = getattr(self, f"{horizon}_counts")
        if sync and horizon == "eval":
            c = D.all_reduce_sum_(c.clone())
        return c

    def stats(self, horizon: str, *, sync: bool = False) -> UsageStats:
        return usage_stats(
            self.counts(horizon, sync=sync), dead_below=self.dead_below, horizon=horizon
        )

    def ema_stats(self, threshold: float | None = None) -> EMAUsageStats:
        t = self.dead_below if threshold is None else threshold
        h = float(entropy(self.ema_counts))
        return EMAUsageStats(
            codebook_size=self.codebook_size,
            codes_above_threshold=int((self.ema_counts >= t).sum()),
            ema_perplexity=math.exp(h),
            ema_normalized_entropy=h / math.log(self.codebook_size),
        )

    @torch.no_grad()
    def on_codes_replaced(self, mask: Tensor, ema_counts: Tensor) -> None:
        """After a codebook reset: new EMA counts for the replaced codes, and their window counts
        zeroed (that use belonged to the old vectors). The window itself goes on, so frequent
        restarts cannot keep it from ever reaching its length."""
        self.ema_counts[mask] = ema_counts[mask].to(self.ema_counts.dtype)
        self.window_counts[mask] = 0
        if bool(mask.all()):
            # A whole new codebook (k-means init) comes with the usage k-means predicts: the
            # average starts there, not at the next batch's counts, which for a codebook larger
            # than a batch (8,192 codes, 5,800 tokens) are 0 for half the codes, every one of
            # which a dead-code restart would then throw away at once.
            self.ema_started.fill_(True)

"""Learning-rate schedules as multiplicative factors for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math


def warmup_cosine(
    step: int,
    *,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    start_lr: float,
    min_lr: float,
) -> float:
    """Linear warm-up from ``start_lr`` to ``base_lr``, then cosine decay to ``min_lr``.

    Returns the learning rate at ``step``; past ``total_steps`` it stays at ``min_lr``.
    """
    if step < warmup_steps:
        return start_lr + (base_lr - start_lr) * step / max(1, warmup_steps)
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t))

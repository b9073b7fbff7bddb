"""The few collectives the quantizer needs. Every function is a no-op on a single process.

Tensors may live on any device. NCCL only moves CUDA tensors, so a CPU tensor (a reservoir kept
on the host, say) is staged through the current CUDA device for the collective and copied back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _needs_staging(t: Tensor) -> bool:
    return t.device.type == "cpu" and dist.get_backend() == "nccl"


def _stage(t: Tensor) -> Tensor:
    return t.to(f"cuda:{torch.cuda.current_device()}") if _needs_staging(t) else t


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over all processes, in place."""
    if not is_distributed():
        return t
    s = _stage(t)
    dist.all_reduce(s, op=dist.ReduceOp.SUM)
    if s is not t:
        t.copy_(s)
    return t


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``t`` on every process with the value on ``src``, in place."""
    if not is_distributed():
        return t
    s = _stage(t)
    dist.broadcast(s, src=src)
    if s is not t:
        t.copy_(s)
    return t


def all_gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every process's ``n``, in rank order."""
    if not is_distributed():
        return [n]
    t = _stage(torch.tensor([n], dtype=torch.long, device=device))
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return [int(o.item()) for o in out]


def all_gather_variable(t: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate along dim 0 the tensors of all processes; first dims may differ (even be 0)."""
    if not is_distributed():
        return t
    if sizes is None:
        sizes = all_gather_sizes(t.shape[0], t.device)
    biggest = max(sizes)
    if biggest == 0:
        return t.new_empty((0, *t.shape[1:]))
    padded = t.new_zeros((biggest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    padded = _stage(padded)
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:n] for o, n in zip(out, sizes, strict=True)]).to(t.device)


def differentiable_all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over processes with gradients flowing back to every process's input."""
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t, op=dist.ReduceOp.SUM)

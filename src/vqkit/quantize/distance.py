"""Chunked squared-L2 distances and nearest-neighbour search, always in fp32.

``||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2``. For an argmin over codes the ``||x||^2`` term is a
per-row constant, so ``nearest`` computes ``||c||^2 - 2 x.c`` with one ``addmm`` per row chunk and
only adds ``||x||^2`` back to the winning entries. The chunking bounds the temporary M x K block
to ``max_block`` elements (default 2**24 floats = 64 MiB), whatever M is.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_MAX_BLOCK = 2**24


def _rows_per_chunk(k: int, chunk_size: int | None, max_block: int) -> int:
    if chunk_size is not None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        return chunk_size
    return max(1, max_block // max(k, 1))


def _sqnorm(x: Tensor) -> Tensor:
    # One reduction pass; x.pow(2).sum(1) would first write an (M, D) temporary.
    return torch.linalg.vector_norm(x, dim=1).square_()


def _fp32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def pairwise_sqdist(x: Tensor, c: Tensor) -> Tensor:
    """Full (M, K) squared distances in fp32. Differentiable; no chunking (use for small M*K)."""
    x, c = _fp32(x), _fp32(c)
    d = x.pow(2).sum(1, keepdim=True) - 2.0 * (x @ c.t()) + c.pow(2).sum(1)
    return d.clamp_min(0.0)


@torch.no_grad()
def nearest(
    x: Tensor,
    c: Tensor,
    *,
    chunk_size: int | None = None,
    max_block: int = DEFAULT_MAX_BLOCK,
    return_distances: bool = True,
    c_sqnorm: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Index of the nearest row of ``c`` for every row of ``x``, and its squared distance.

    x: (M, D), c: (K, D). Returns (indices (M,) long, sqdist (M,) fp32 or None).
    Autocast is disabled inside so the scores are fp32 whatever the caller's context.
    """
    if x.dim() != 2 or c.dim() != 2 or x.shape[1] != c.shape[1]:
        raise ValueError(
            f"nearest expects (M, D) and (K, D), got {tuple(x.shape)} and {tuple(c.shape)}"
        )
    m, k = x.shape[0], c.shape[0]
    rows = _rows_per_chunk(k, chunk_size, max_block)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, c = _fp32(x), _fp32(c)
        csq = c.pow(2).sum(1) if c_sqnorm is None else _fp32(c_sqnorm)
        ct = c.t()
        if m <= rows:  # one block: skip the copies into preallocated outputs
            scores = torch.addmm(csq, x, ct, beta=1.0, alpha=-2.0)
            if not return_distances:
                return scores.argmin(1), None
            best, arg = scores.min(1)
            return arg, (best + _sqnorm(x)).clamp_min_(0.0)
        idx = torch.empty(m, dtype=torch.long, device=x.device)
        dist = torch.empty(m, dtype=torch.float32, device=x.device) if return_distances else None
        for s in range(0, m, rows):
            xs = x[s : s + rows]
            scores = torch.addmm(csq, xs, ct, beta=1.0, alpha=-2.0)
            if return_distances:
                best, arg = scores.min(1)
                dist[s : s + rows] = (best + _sqnorm(xs)).clamp_min_(0.0)
            else:
                arg = scores.argmin(1)
            idx[s : s + rows] = arg
    return idx, dist


@torch.no_grad()
def sample_nearest(
    x: Tensor,
    c: Tensor,
    temperature: float,
    *,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    max_block: int = DEFAULT_MAX_BLOCK,
) -> Tensor:
    """Sample a code per row from softmax(-||x - c||^2 / temperature) with the Gumbel-max trick.

    softmax is shift-invariant per row, so ``||x||^2`` is dropped exactly as in ``nearest``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    m, k = x.shape[0], c.shape[0]
    rows = _rows_per_chunk(k, chunk_size, max_block)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, c = _fp32(x), _fp32(c)
        csq = c.pow(2).sum(1)
        ct = c.t()
        idx = torch.empty(m, dtype=torch.long, device=x.device)
        for s in range(0, m, rows):
            xs = x[s : s + rows]
            logits = torch.addmm(csq, xs, ct, beta=1.0, alpha=-2.0).mul_(-1.0 / temperature)
            u = torch.rand(logits.shape, device=x.device, generator=generator)
            gumbel = -torch.log(-torch.log(u.clamp_(1e-20, 1.0 - 1e-7)))
            idx[s : s + rows] = (logits + gumbel).argmax(1)
    return idx

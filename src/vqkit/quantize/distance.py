"""Chunked squared-L2 distances and nearest-neighbour search, always in fp32.

``||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2``. For an argmin over codes the ``||x||^2`` term is a
per-row constant, so ``nearest`` computes ``||c||^2 - 2 x.c`` with one ``addmm`` per block and
only adds ``||x||^2`` back to the winning entries. The blocks bound the temporary M x K scores
to ``max_block`` elements (default 2**24 floats = 64 MiB), whatever M and K are.

Past ``max_block / 1024`` codes (16,384 by default) the codebook is cut into column tiles too,
so that a block still spans 1,024 rows: with 256 rows against 65,536 codes, the matmul re-packs
the whole codebook for every 256 rows, which made ``nearest`` 1.2x slower than one unchunked
``addmm`` + ``argmin`` at D = 256. The per-tile minima are merged with ties going to the lower
index: the result is that of one ``argmin`` over all codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_MAX_BLOCK = 2**24
# Fewest rows per block before the codebook is cut into column tiles (see above).
_MIN_ROWS = 1024


def _rows_per_chunk(k: int, chunk_size: int | None, max_block: int) -> int:
    if chunk_size is not None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        return chunk_size
    return max(1, max_block // max(k, 1))


def _block_shape(k: int, chunk_size: int | None, max_block: int) -> tuple[int, int]:
    """(rows, codes) of the score blocks of ``nearest``: ``chunk_size`` rows against every code
    when given, else at most ``max_block`` elements, in column tiles once a block against every
    code would span fewer than ``_MIN_ROWS`` rows."""
    rows = _rows_per_chunk(k, chunk_size, max_block)
    cols = max_block // _MIN_ROWS
    if chunk_size is None and rows < _MIN_ROWS and k > cols >= _MIN_ROWS:
        return max_block // cols, cols
    return rows, k


def _tiled_min(xs: Tensor, ct: Tensor, csq: Tensor, cols: int) -> tuple[Tensor, Tensor]:
    """Row minima of ``||c||^2 - 2 x.c`` over all codes and their indices, one column tile at a
    time; a tie keeps the lower index, as one ``argmin`` over the whole row would."""
    best, arg = torch.addmm(csq[:cols], xs, ct[:, :cols], alpha=-2.0).min(1)
    for j in range(cols, ct.shape[1], cols):
        scores = torch.addmm(csq[j : j + cols], xs, ct[:, j : j + cols], alpha=-2.0)
        v, a = scores.min(1)
        del scores
        better = v < best
        best = torch.where(better, v, best)
        arg = torch.where(better, a.add_(j), arg)
    return best, arg


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
    rows, cols = _block_shape(k, chunk_size, max_block)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, c = _fp32(x), _fp32(c)
        csq = c.pow(2).sum(1) if c_sqnorm is None else _fp32(c_sqnorm)
        ct = c.t()
        if cols < k:  # column tiles: every row chunk merges the minima of its tiles
            idx = torch.empty(m, dtype=torch.long, device=x.device)
            dist = (
                torch.empty(m, dtype=torch.float32, device=x.device) if return_distances else None
            )
            for s in range(0, m, rows):
                xs = x[s : s + rows]
                best, arg = _tiled_min(xs, ct, csq, cols)
                idx[s : s + rows] = arg
                if return_distances:
                    dist[s : s + rows] = (best + _sqnorm(xs)).clamp_min_(0.0)
            return idx, dist
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
            # Free the block before the next addmm allocates its own: otherwise two are alive
            # at once and the peak is twice the bound.
            del scores
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
            # Gumbel noise -log(-log u), in place: two blocks alive, not four.
            gumbel = u.clamp_(1e-20, 1.0 - 1e-7).log_().neg_().log_().neg_()
            idx[s : s + rows] = logits.add_(gumbel).argmax(1)
            del logits, u, gumbel  # freed before the next block is allocated
    return idx

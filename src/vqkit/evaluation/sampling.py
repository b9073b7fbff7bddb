"""Code-space sampling and editing (seed 004, section 8.3): decode code grids drawn from the
codebook, and encode -> manipulate codes -> decode.

These are diagnostics of a tokenizer, not a generative model. Codes drawn independently per
position (uniformly, or as often as the validation set used each) ignore the spatial structure
that a prior over the token grid would learn, so random samples show what codes and their
neighbourhoods decode to, not plausible images. Edits of real images' codes show how local a
code's effect is and how gracefully the decoder handles codes it did not expect.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models import VQModel

SOURCES = ("usage", "uniform")


def code_distribution(model: VQModel, source: str = "usage") -> Tensor:
    """(K,) float64 probabilities to draw codes from.

    ``"usage"``: each code's share of the tokens of the last validation run recorded in the
    quantizer (``usage.eval_counts``, saved in every checkpoint; under DDP the checkpoint holds
    rank 0's share of the split). ``"uniform"``: 1/K each.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    k = model.quantizer.codebook_size
    if source == "uniform":
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    counts = model.quantizer.usage.eval_counts.detach().to("cpu", torch.float64)
    total = float(counts.sum())
    if total <= 0:
        raise ValueError(
            "the model holds no validation code counts (no validation ran before this "
            "checkpoint, or it was loaded from a save_pretrained / vqkit export folder, which "
            "keeps none); use source='uniform' (vqkit sample --source uniform) or a prior"
        )
    return counts / total


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _check_probs(probs: Tensor) -> Tensor:
    if probs.dim() != 1 or probs.numel() < 1:
        raise ValueError(f"probs must be a (K,) vector, got shape {tuple(probs.shape)}")
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()) or float(probs.sum()) <= 0:
        raise ValueError("probs must be finite, non-negative and not all zero")
    return probs.detach().to("cpu", torch.float64)


def sample_codes(
    probs: Tensor, num: int, grid: tuple[int, int], *, seed: int | None = None
) -> Tensor:
    """(num, h, w) int64 code grids, every position drawn independently from ``probs``
    (on the CPU, so a seed gives the same grids on any machine)."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"grid must be two positive sizes, got {tuple(grid)}")
    p = _check_probs(probs)
    draws = torch.multinomial(p, num * h * w, replacement=True, generator=_generator(seed))
    return draws.view(num, h, w)


def perturb_codes(
    indices: Tensor, fraction: float, probs: Tensor, *, seed: int | None = None
) -> tuple[Tensor, Tensor]:
    """Replace ``round(fraction * h * w)`` positions of each (h, w) grid, chosen at random, with
    codes drawn from ``probs``. Returns ``(edited, mask)``; ``mask`` is True where a position
    was redrawn (a redraw may pick the same code)."""
    if indices.dim() != 3:
        raise ValueError(f"indices must be (B, h, w), got shape {tuple(indices.shape)}")
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    p = _check_probs(probs)
    b, h, w = indices.shape
    m = round(fraction * h * w)
    g = _generator(seed)
    order = torch.rand(b, h * w, generator=g).argsort(dim=1)
    mask = torch.zeros(b, h * w, dtype=torch.bool)
    mask.scatter_(1, order[:, :m], True)
    new = torch.multinomial(p, b * h * w, replacement=True, generator=g).view(b, h * w)
    mask = mask.view(b, h, w).to(indices.device)
    edited = torch.where(mask, new.view(b, h, w).to(indices.device), indices)
    return edited, mask


def half_mask(grid: tuple[int, int], side: str = "right") -> Tensor:
    """(h, w) bool mask of one half of a grid: ``"right"``, ``"left"``, ``"top"`` or
    ``"bottom"`` (the larger half for odd sizes goes to the other side)."""
    h, w = grid
    mask = torch.zeros(h, w, dtype=torch.bool)
    if side == "right":
        mask[:, w - w // 2 :] = True
    elif side == "left":
        mask[:, : w // 2] = True
    elif side == "bottom":
        mask[h - h // 2 :, :] = True
    elif side == "top":
        mask[: h // 2, :] = True
    else:
        raise ValueError(f"side must be right, left, top or bottom, got {side!r}")
    return mask


def mix_codes(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Code grids that take ``b``'s codes where ``mask`` is True and ``a``'s elsewhere
    (``mask`` (h, w) or (B, h, w))."""
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(
            f"a and b must be code grids (B, h, w) of one shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    if mask.shape not in (a.shape, a.shape[1:]):
        raise ValueError(
            f"mask must be (h, w) or (B, h, w) of {tuple(a.shape)}, got {tuple(mask.shape)}"
        )
    return torch.where(mask.to(a.device, torch.bool), b, a)


@torch.no_grad()
def decode_codes(model: VQModel, indices: Tensor, batch_size: int = 64) -> Tensor:
    """Images (B, C, H, W) in [-1, 1] decoded from code grids (B, h, w), in batches on the
    model's device; the model is put in eval mode and left there. Out-of-range codes are an
    error that names them."""
    k = model.quantizer.codebook_size
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be integer codes, got dtype {indices.dtype}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= k):
        raise ValueError(
            f"codes must be in [0, {k}), got [{int(indices.min())}, {int(indices.max())}]"
        )
    model.eval()
    device = next(model.parameters()).device
    parts = [
        model.decode_indices(chunk.to(device, torch.long)).float().clamp(-1, 1)
        for chunk in indices.split(batch_size)
    ]
    return torch.cat(parts)

"""Pictures for people: image grids and code-usage plots (Pillow, matplotlib; no torchvision)."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import Tensor

from ..fileio import atomic_write_bytes


def image_grid(rows: list[Tensor], pad: int = 2) -> Tensor:
    """Stack equally sized batches (N, 3, H, W) in [-1, 1] as rows of one (3, H', W') image in
    [0, 1]: e.g. ``[inputs, reconstructions]`` puts each input above its reconstruction."""
    if not rows:
        raise ValueError("image_grid needs at least one row")
    n, c, h, w = rows[0].shape
    grid = torch.ones(c, len(rows) * (h + pad) + pad, n * (w + pad) + pad)
    for r, batch in enumerate(rows):
        if batch.shape != rows[0].shape:
            raise ValueError(
                f"all rows must have shape {tuple(rows[0].shape)}, got {tuple(batch.shape)}"
            )
        imgs = ((batch.detach().float().cpu() + 1) / 2).clamp(0, 1)
        for i in range(n):
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            grid[:, y : y + h, x : x + w] = imgs[i]
    return grid


def image_rows(images: Tensor, per_row: int = 8) -> list[Tensor]:
    """Split a batch (N, 3, H, W) in [-1, 1] into rows of ``per_row`` for ``image_grid``; the
    last row is padded with white."""
    if images.shape[0] < 1:
        raise ValueError("image_rows needs at least one image")
    n = min(per_row, images.shape[0])
    rows = list(images.split(n))
    if rows[-1].shape[0] < n:
        pad = images.new_ones(n - rows[-1].shape[0], *images.shape[1:])
        rows[-1] = torch.cat([rows[-1], pad])
    return rows


def save_png(image: Tensor, path: str | Path) -> Path:
    """Save a (3, H, W) tensor in [0, 1] as a PNG."""
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def save_usage_plot(counts: Tensor, path: str | Path, title: str = "code usage") -> Path:
    """Rank-frequency curve (log scale) and per-code counts of a (K,) count vector, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = counts.detach().cpu().double()
    k = c.numel()
    used = int((c > 0).sum())
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ranked = torch.sort(c, descending=True).values
    a1.plot(range(1, k + 1), ranked.clamp_min(0.5).numpy())
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("code rank")
    a1.set_ylabel("tokens")
    a1.set_title(f"rank-frequency ({used}/{k} codes used)")
    a2.bar(range(k), c.numpy(), width=1.0)
    a2.set_xlabel("code index")
    a2.set_ylabel("tokens")
    a2.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())

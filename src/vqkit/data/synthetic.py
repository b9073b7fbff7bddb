"""Synthetic image folders: a smoke test of a setup, a benchmark or a test without a data set."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(
    root: str | os.PathLike[str], n: int = 24, size: int = 40, seed: int = 0
) -> Path:
    """Write ``n`` ``size`` x ``size`` PNGs to ``root``: each a flat colour with a square of
    another colour at a random place (images a tiny tokenizer learns in a few steps)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.zeros((size, size, 3), np.uint8)
        a[:] = rng.integers(0, 255, 3)
        y, x = rng.integers(0, size // 2, 2)
        a[y : y + size // 2, x : x + size // 2] = rng.integers(0, 255, 3)
        Image.fromarray(a).save(root / f"img{i:03d}.png")
    return root

"""Pictures for people: labelled image grids and code-usage plots (Pillow, matplotlib; no
torchvision)."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..fileio import atomic_write_bytes

# Tiles of small images are blown up to at least this many pixels a side: a 32 px image at
# its own size is a thumbnail nobody can judge.
MIN_TILE = 128
# A grid shows at most this many images a row and rows; the rest is left out (and said so).
MAX_COLUMNS = 8
MAX_ROWS = 8
_INK = (20, 20, 20)
_MARGIN = 8


def upscale_factor(height: int, width: int, min_tile: int = MIN_TILE) -> int:
    """The integer factor that brings an image's shorter side to at least ``min_tile`` pixels
    (1 for images that are that big already: they are never shrunk). A very elongated image
    is blown up only until its longer side reaches ``8 * min_tile``."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    factor = max(1, math.ceil(min_tile / min(height, width)))
    if factor > 1 and max(height, width) * factor > 8 * min_tile:
        factor = max(1, 8 * min_tile // max(height, width))
    return factor


@functools.lru_cache(maxsize=8)
def _font(size: int):  # noqa: ANN202
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _text_size(font, text: str) -> tuple[int, int]:  # noqa: ANN001
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


@dataclass(frozen=True)
class GridLayout:
    """Where ``labelled_grid`` puts things: a title band on top, a label column on the left,
    then ``rows`` x ``columns`` tiles of ``tile_height`` x ``tile_width`` pixels (the images
    ``scale`` times enlarged), ``pad`` pixels apart."""

    rows: int
    columns: int
    tile_height: int
    tile_width: int
    scale: int
    label_width: int
    title_height: int
    pad: int
    width: int
    height: int
    font_size: int

    def tile_origin(self, row: int, column: int) -> tuple[int, int]:
        """(y, x) of the top-left pixel of a tile."""
        y = self.title_height + self.pad + row * (self.tile_height + self.pad)
        x = self.label_width + self.pad + column * (self.tile_width + self.pad)
        return y, x


def grid_layout(
    rows: int,
    columns: int,
    image_size: tuple[int, int],
    labels: Sequence[str] | None = None,
    title: str | None = None,
    *,
    min_tile: int = MIN_TILE,
    pad: int = 2,
) -> GridLayout:
    """The layout of a grid of ``rows`` x ``columns`` images of ``image_size`` (H, W)."""
    h, w = image_size
    scale = upscale_factor(h, w, min_tile)
    th, tw = h * scale, w * scale
    font_size = max(12, min(24, th // 8))
    font = _font(font_size)
    label_width = 0
    if labels is not None and any(labels):
        label_width = max(_text_size(font, s)[0] for s in labels) + 2 * _MARGIN
    title_height = title_width = 0
    if title:
        title_width = _text_size(font, title)[0] + 2 * _MARGIN
        # one line's height, whatever the letters: tiles sit at the same place under any title
        title_height = max(_text_size(font, "Ag|")[1], font_size) + 2 * _MARGIN
    width = max(label_width + pad + columns * (tw + pad), title_width)
    height = title_height + pad + rows * (th + pad)
    return GridLayout(
        rows, columns, th, tw, scale, label_width, title_height, pad, width, height, font_size
    )


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255] on the CPU, rounded to the nearest level."""
    return ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def labelled_grid(
    rows: Sequence[Tensor],
    labels: Sequence[str] | None = None,
    title: str | None = None,
    *,
    min_tile: int = MIN_TILE,
    max_columns: int = MAX_COLUMNS,
    max_rows: int = MAX_ROWS,
    pad: int = 2,
) -> Tensor:
    """Lay out rows of images as one picture: (3, H', W') uint8, CHW, for ``save_png`` and
    TensorBoard's ``add_image`` alike.

    ``rows``: batches (N, C, H, W) in [-1, 1] of one image size (C 1 or 3), e.g.
    ``[inputs, reconstructions]`` puts each input above its reconstruction; a shorter row
    leaves its last tiles white. Images smaller than ``min_tile`` pixels are enlarged by an
    integer factor with nearest-neighbour (each pixel becomes a square block), bigger ones are
    left as they are. ``labels`` names each row in a column on the left, ``title`` is a line
    above. At most ``max_columns`` images a row and ``max_rows`` rows are drawn; the title
    then says what was left out."""
    if not rows:
        raise ValueError("labelled_grid needs at least one row")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"got {len(labels)} labels for {len(rows)} rows")
    first = rows[0]
    for batch in rows:
        if batch.dim() != 4 or batch.shape[1:] != first.shape[1:] or batch.shape[1] not in (1, 3):
            raise ValueError(
                "rows must be batches (N, 1 or 3, H, W) of one image size, got shapes "
                f"{[tuple(b.shape) for b in rows]}"
            )
    if max_columns < 1 or max_rows < 1:
        raise ValueError(f"max_columns and max_rows must be >= 1, got {max_columns}, {max_rows}")
    widest = max(b.shape[0] for b in rows)
    left_out = []
    if len(rows) > max_rows:
        left_out.append(f"first {max_rows} of {len(rows)} rows")
    if widest > max_columns:
        left_out.append(f"first {max_columns} of {widest} columns")
    if left_out:
        title = ", ".join([title, *left_out] if title else left_out)
    rows = list(rows)[:max_rows]
    labels = list(labels)[:max_rows] if labels is not None else None
    columns = max(1, min(max_columns, widest))
    lay = grid_layout(
        len(rows), columns, tuple(first.shape[-2:]), labels, title, min_tile=min_tile, pad=pad
    )
    canvas = torch.full((lay.height, lay.width, 3), 255, dtype=torch.uint8)
    for r, batch in enumerate(rows):
        tiles = to_uint8(batch[:columns]).expand(-1, 3, -1, -1)
        if lay.scale > 1:
            tiles = tiles.repeat_interleave(lay.scale, 2).repeat_interleave(lay.scale, 3)
        for c, tile in enumerate(tiles):
            y, x = lay.tile_origin(r, c)
            canvas[y : y + lay.tile_height, x : x + lay.tile_width] = tile.permute(1, 2, 0)
    if labels or title:
        canvas = _draw_text(canvas, lay, labels, title)
    return canvas.permute(2, 0, 1).contiguous()


def _draw_text(
    canvas: Tensor, lay: GridLayout, labels: Sequence[str] | None, title: str | None
) -> Tensor:
    from PIL import Image, ImageDraw

    image = Image.fromarray(canvas.numpy())
    draw = ImageDraw.Draw(image)
    font = _font(lay.font_size)

    def left_middle(text: str, y_mid: int) -> None:
        # placed by its bounding box, not an anchor: Pillow's bitmap fallback font has none
        left, top, _, bottom = font.getbbox(text)
        draw.text((_MARGIN - left, y_mid - (top + bottom) // 2), text, fill=_INK, font=font)

    if title:
        left_middle(title, lay.title_height // 2)
    for r, label in enumerate(labels or ()):
        if label:
            left_middle(label, lay.tile_origin(r, 0)[0] + lay.tile_height // 2)
    return torch.from_numpy(np.asarray(image).copy())


def sample_grid(
    images: Tensor,
    title: str | None = None,
    *,
    per_row: int = MAX_COLUMNS,
    max_rows: int = MAX_ROWS,
    min_tile: int = MIN_TILE,
) -> Tensor:
    """``labelled_grid`` of a batch of samples (N, C, H, W) in [-1, 1], ``per_row`` a row,
    rows labelled "samples 1-8", "samples 9-16", ...; when more than fit, the title says
    how many are shown."""
    n = images.shape[0]
    if n < 1:
        raise ValueError("sample_grid needs at least one image")
    shown = min(n, per_row * max_rows)
    if shown < n:
        note = f"first {shown} of {n}"
        title = f"{title} ({note})" if title else note
    rows = list(images[:shown].split(per_row))
    labels = [_sample_label(i * per_row + 1, i * per_row + len(b)) for i, b in enumerate(rows)]
    return labelled_grid(
        rows, labels, title, min_tile=min_tile, max_columns=per_row, max_rows=max_rows
    )


def _sample_label(first: int, last: int) -> str:
    return f"sample {first}" if first == last else f"samples {first}-{last}"


def image_grid(rows: list[Tensor], pad: int = 2) -> Tensor:
    """Stack equally sized batches (N, 3, H, W) in [-1, 1] as rows of one (3, H', W') image in
    [0, 1], at the images' own size and without labels (``labelled_grid`` draws the pictures
    vqkit writes): e.g. ``[inputs, reconstructions]`` puts each input above its
    reconstruction."""
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
    last row is padded with white (``sample_grid`` leaves it short instead)."""
    if images.shape[0] < 1:
        raise ValueError("image_rows needs at least one image")
    n = min(per_row, images.shape[0])
    rows = list(images.split(n))
    if rows[-1].shape[0] < n:
        pad = images.new_ones(n - rows[-1].shape[0], *images.shape[1:])
        rows[-1] = torch.cat([rows[-1], pad])
    return rows


def save_png(image: Tensor, path: str | Path) -> Path:
    """Save a (3, H, W) image as a PNG: uint8 as it is (``labelled_grid``'s), floats as [0, 1]."""
    from PIL import Image

    if image.dtype != torch.uint8:
        image = (image.detach().float().cpu().clamp(0, 1) * 255).round().byte()
    arr = image.cpu().permute(1, 2, 0).numpy()
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

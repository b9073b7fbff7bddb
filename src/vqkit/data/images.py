"""Image files to tensors: discovery, decoding any PIL mode to RGB, and a folder data set.

Every image becomes a (3, H, W) float tensor in [-1, 1]. Transparent pixels are composited onto a
background (white by default) *before* resizing, so edges do not pick up the colour hidden under
alpha = 0. Broken files are found once, up front, by decoding them fully (``verify()`` misses
truncation), so a bad file costs a warning at start-up instead of a crash in epoch 7.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

log = logging.getLogger("vqkit.data")

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
SQUARE_MODES = ("crop", "pad")
Square = Literal["crop", "pad"]
RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)

# Modes whose pixels carry alpha; "P", "L" and "RGB" may also carry it via info["transparency"].
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# Integer / float modes wider than 8 bits; Pillow's convert("L") would clip them at 255.
_WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# Beyond this many failed substitutes in one __getitem__ something is systematically wrong.
_MAX_SUBSTITUTES = 16
_EXIF_ORIENTATION = 0x0112
# Larger images are refused before their pixels are decoded (a decompression bomb: a small file
# that expands to gigabytes). PIL's own default: it warns above this and refuses above twice it.
# Set vqkit.data.images.MAX_IMAGE_PIXELS (in every process that loads images) to change it.
MAX_IMAGE_PIXELS = 89_478_485


class UnreadableImageError(OSError):
    """A file with an image extension that cannot be decoded into an RGB image."""


class DataError(ValueError):
    """Data a run cannot train on (no usable image, fewer images than a batch): the ``vqkit``
    command reports it in one line before training starts."""


def find_images(root: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``root`` (recursive), sorted so every run sees the same order."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {str(root)!r} is a file, expected a directory")
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def check_square(square: str) -> None:
    if square not in SQUARE_MODES:
        raise ValueError(f"square must be one of {SQUARE_MODES}, got {square!r}")


def check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


CacheMode = Literal["none", "memory", "disk", "auto"]
CACHE_MODES: tuple[str, ...] = ("none", "memory", "disk", "auto")


def check_cache_mode(value: object, name: str = "cache_images") -> CacheMode:
    """``False``/``True`` (as before: no cache / memory) or a mode name -> the mode name."""
    if isinstance(value, bool):
        return "memory" if value else "none"
    if isinstance(value, str) and value in CACHE_MODES:
        return value  # type: ignore[return-value]
    raise ValueError(f"{name} must be one of False, True, {CACHE_MODES}, got {value!r}")


def check_augment_args(flip_p: float, jitter: float) -> None:
    if not 0.0 <= flip_p <= 1.0:
        raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
    if not 0.0 <= jitter < 1.0:
        raise ValueError(f"jitter must be in [0, 1) (0.1-0.2 is typical), got {jitter}")


def _wide_to_l(img: Image.Image) -> Image.Image:
    # 16-bit grey (PNG, TIFF) arrives as "I;16" or "I" with values up to 65535: rescale, don't clip.
    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (a.size and a.max() > 255):
        a = a / 257.0  # 65535 / 255: maps 16-bit full scale exactly onto 8-bit full scale
    elif img.mode == "F" and a.size and a.max() <= 1.0:
        a = a * 255.0  # float images in [0, 1]
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, background: RGB = WHITE) -> Image.Image:
    """Any PIL mode -> "RGB", compositing transparency onto ``background``."""
    if img.mode in _WIDE_MODES:
        img = _wide_to_l(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    # "L", "1", "P", "CMYK", "YCbCr" ... Pillow undoes Adobe's inverted CMYK when decoding JPEG.
    return img.convert("RGB") if img.mode != "RGB" else img


def _open_rgb(path: Path, background: RGB, draft_size: int | None = None) -> Image.Image:
    """Open, fully decode (so truncation fails here) and convert to RGB; errors name the file."""
    try:
        # vqkit decides below, from the header, before any pixel is decoded (PIL warns only
        # above its own limit, which MAX_IMAGE_PIXELS equals unless raised)
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                why = (
                    f"{w} x {h} = {w * h:,} pixels is more than MAX_IMAGE_PIXELS "
                    f"({MAX_IMAGE_PIXELS:,}; a decompression bomb?)"
                )
                raise UnreadableImageError(f"cannot read image {str(path)!r}: {why}") from (
                    ValueError(why)
                )
            if draft_size is not None and img.format == "JPEG":
                # Let libjpeg decode big photos at a reduced scale; both sides stay >= draft_size.
                img.draft(None, (draft_size, draft_size))
            img.load()  # GIF / animated WebP: the first frame, which open() selects
            oriented = img
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                oriented = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF
            rgb = to_rgb(oriented, background)
            # The opened image is destroyed when `with` closes it; hand back an independent one.
            return rgb.copy() if rgb is img else rgb
    except UnreadableImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"cannot read image {str(path)!r}: {err}") from err


def _square(img: Image.Image, image_size: int, square: Square, background: RGB) -> Image.Image:
    w, h = img.size
    if square == "pad" and w != h:
        # Shrink the long side to image_size first, then pad: padding first would build a
        # side x side canvas (100,000 x 100,000 pixels for a 100,000 x 10 strip).
        side = max(w, h)
        size = (max(1, round(w * image_size / side)), max(1, round(h * image_size / side)))
        if size != (w, h):
            img = img.resize(size, Image.LANCZOS, reducing_gap=3.0)
        canvas = Image.new("RGB", (image_size, image_size), background)
        canvas.paste(img, ((image_size - size[0]) // 2, (image_size - size[1]) // 2))
        return canvas
    side = min(w, h)
    if side == image_size and w == h:
        return img
    left, top = (w - side) // 2, (h - side) // 2
    # reducing_gap: box-reduce first for big shrink factors, then Lanczos; visually identical.
    return img.resize(
        (image_size, image_size),
        Image.LANCZOS,
        box=(left, top, left + side, top + side),
        reducing_gap=3.0,
    )


def pil_to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    # In numpy: torch's elementwise ops on the permuted (strided) view were 50x slower here.
    a = np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1), np.float32)
    a /= 127.5
    a -= 1.0
    return torch.from_numpy(a)


def load_image(
    path: str | os.PathLike[str],
    image_size: int,
    *,
    square: Square = "crop",
    background: RGB = WHITE,
) -> Tensor:
    """Decode ``path`` to a (3, image_size, image_size) float tensor in [-1, 1].

    ``square="crop"`` takes the centred square; ``"pad"`` keeps the whole image and fills the
    sides with ``background``. Raises :class:`UnreadableImageError` (an ``OSError``) if the file
    cannot be decoded.
    """
    check_image_size(image_size)
    check_square(square)
    img = _open_rgb(Path(path), background, draft_size=image_size)
    return pil_to_tensor(_square(img, image_size, square, background))


def load_image_uint8(
    path: str | os.PathLike[str],
    image_size: int,
    *,
    square: Square = "crop",
    background: RGB = WHITE,
) -> np.ndarray:
    """:func:`load_image`'s pixels as a (3, image_size, image_size) uint8 array, what the image
    caches hold (``x.float() / 127.5 - 1`` gives ``load_image``'s tensor bit for bit)."""
    check_image_size(image_size)
    check_square(square)
    img = _open_rgb(Path(path), background, draft_size=image_size)
    rgb = np.asarray(_square(img, image_size, square, background), dtype=np.uint8)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def _check_one(path: Path, background: RGB) -> str | None:
    try:
        _open_rgb(path, background)
    except UnreadableImageError as err:
        return str(err.__cause__ or err)
    return None


def scan_images(
    paths: Sequence[Path], *, background: RGB = WHITE, threads: int | None = None
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Decode every file once; return (readable paths, [(unreadable path, reason), ...]).

    Threads, not processes: Pillow releases the GIL while decoding, and threads are safe to use
    from inside a DataLoader worker or under DDP where forking again would not be.
    """
    threads = threads or min(8, os.cpu_count() or 1)
    paths = [Path(p) for p in paths]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        reasons = list(pool.map(lambda p: _check_one(p, background), paths))
    good = [p for p, r in zip(paths, reasons, strict=True) if r is None]
    bad = [(p, r) for p, r in zip(paths, reasons, strict=True) if r is not None]
    return good, bad


def warn_skipped(skipped: Sequence[tuple[Path, str]], total: int, shown: int = 5) -> None:
    """Log how many files were skipped and the first ``shown`` of them by name and reason (the
    training console writes the whole list to ``skipped_files.txt`` in the run folder)."""
    if not skipped:
        return
    examples = "".join(f"\n  {p}: {reason}" for p, reason in skipped[:shown])
    more = f"\n  ... and {len(skipped) - shown} more" if len(skipped) > shown else ""
    log.warning(
        "skipped %d of %d image files that could not be decoded:%s%s",
        len(skipped),
        total,
        examples,
        more,
    )


def color_jitter(x: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """Random brightness, contrast and saturation, each a factor in [1 - s, 1 + s].

    ``x`` is (3, H, W) in [-1, 1]; the result stays in [-1, 1]. Works in [0, 1] like torchvision's
    ColorJitter and clamps after every step as it does.
    """
    if strength <= 0:
        return x
    b, c, s = (1.0 + (torch.rand(3, generator=generator) * 2.0 - 1.0) * strength).tolist()
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(3, 1, 1)
    y = ((x + 1.0) * 0.5 * b).clamp_(0.0, 1.0)
    mean = (y * weights).sum(0).mean()
    y = ((y - mean) * c + mean).clamp_(0.0, 1.0)
    grey = (y * weights).sum(0, keepdim=True)
    y = ((y - grey) * s + grey).clamp_(0.0, 1.0)
    return y * 2.0 - 1.0


class ImageFolderDataset(Dataset[Tensor]):
    """Images from a folder (or an explicit list of paths) as (3, S, S) tensors in [-1, 1].

    Unreadable files are decoded-and-dropped at construction (see ``skipped``). Augmentation is a
    horizontal flip and a mild colour jitter, no rotations: emoji and faces have a canonical
    orientation. Its random stream is a ``torch.Generator`` per process seeded from
    ``torch.initial_seed()``, which the DataLoader sets per worker and per epoch from its own
    generator, so a seeded loader gives the same augmentations on every run.

    ``cache``: ``False`` / ``"none"`` decodes every item as it is read; ``True`` / ``"memory"``
    decodes all once into one uint8 tensor (S*S*3 bytes an image); ``"disk"`` decodes them once
    into a file under ``cache_dir`` (see :mod:`vqkit.data.diskcache`) that later runs reuse, and
    reads one image at a time from it; a :class:`~vqkit.data.diskcache.DiskImageCache` whose
    item ``i`` holds ``source[i]`` is used as it is. The pixels are the same in all three.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        image_size: int,
        *,
        augment: bool = False,
        square: Square = "crop",
        flip_p: float = 0.5,
        jitter: float = 0.1,
        background: RGB = WHITE,
        validate: bool = True,
        cache: bool | CacheMode | Any = False,  # Any: a diskcache.DiskImageCache (no import
        # of diskcache here: it imports this module)
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        from .diskcache import DiskImageCache, open_or_build

        check_image_size(image_size)
        check_square(square)
        check_augment_args(flip_p, jitter)
        mode = cache if isinstance(cache, DiskImageCache) else check_cache_mode(cache, "cache")
        if mode == "auto":
            raise ValueError("cache='auto' is for ImageDataModule; pick 'memory' or 'disk' here")
        if isinstance(source, (str, os.PathLike)):
            paths = find_images(source)
            where = f"folder {str(source)!r}"
        else:
            paths = [Path(p) for p in source]
            where = f"the {len(paths)} given paths"
        self.skipped: list[tuple[Path, str]] = []
        self._disk: Any = None  # a diskcache.DiskImageCache
        if isinstance(mode, DiskImageCache):
            # Built by the caller (ImageDataModule), whose build already decoded every file.
            if len(mode) != len(paths):
                raise ValueError(f"the disk cache holds {len(mode)} images for {len(paths)} paths")
            self._disk = mode
        elif mode == "disk":
            # Decoding into the cache is also the validity scan: one pass, skipped if a
            # complete cache of these very files exists (its sidecar lists the bad ones).
            found = open_or_build(
                paths, image_size, square=square, background=background, cache_dir=cache_dir
            )
            # validate=False saves nothing here: the build decodes every file anyway.
            self._disk, paths, self.skipped = found.cache, found.paths, found.skipped
            warn_skipped(self.skipped, len(paths) + len(self.skipped))
        elif validate:
            paths, self.skipped = scan_images(paths, background=background)
            warn_skipped(self.skipped, len(paths) + len(self.skipped))
        if not paths:
            raise ValueError(
                f"no usable image in {where} (extensions {sorted(IMAGE_EXTENSIONS)}; "
                f"{len(self.skipped)} files could not be decoded)"
            )
        self.paths = paths
        self.image_size = image_size
        self.augment = augment
        self.square: Square = square
        self.flip_p = flip_p
        self.jitter = jitter
        self.background = background
        self._gen: torch.Generator | None = None
        self._gen_seed: int | None = None
        # Decoding a 256 px WebP costs ~5 ms; on a CPU-bound run that is a large share of a step.
        # The cache holds every image once, decoded and resized, as uint8 (S*S*3 bytes each).
        self._cache: Tensor | None = self._decode_all() if mode == "memory" else None

    def _decode_all(self) -> Tensor:
        def one(path: Path) -> np.ndarray:
            return load_image_uint8(
                path, self.image_size, square=self.square, background=self.background
            )

        s = self.image_size
        out = np.empty((len(self.paths), 3, s, s), dtype=np.uint8)
        # Filled as decoded, not stacked from a list: the peak stays at one copy of the cache.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for i, pixels in enumerate(pool.map(one, self.paths)):
                out[i] = pixels
        return torch.from_numpy(out)

    @property
    def cached(self) -> bool:
        return self._cache is not None or self._disk is not None

    @property
    def cache_mode(self) -> Literal["none", "memory", "disk"]:
        """Where the decoded images are held: nowhere (decoded per item), memory or disk."""
        return "memory" if self._cache is not None else "disk" if self._disk is not None else "none"

    def __len__(self) -> int:
        return len(self.paths)

    def _generator(self) -> torch.Generator:
        # Re-seed whenever the process seed changed: a forked worker must not reuse the parent's
        # stream, or every worker would flip the same way.
        seed = torch.initial_seed()
        if self._gen is None or self._gen_seed != seed:
            self._gen = torch.Generator().manual_seed(seed)
            self._gen_seed = seed
        return self._gen

    def augment_tensor(self, x: Tensor, seed: int | None = None) -> Tensor:
        # A per-sample seed (from ResumableSampler) makes the augmentation a pure function of
        # (epoch, index): identical after a resume and whatever the number of workers.
        g = torch.Generator().manual_seed(seed) if seed is not None else self._generator()
        if self.flip_p > 0 and torch.rand((), generator=g).item() < self.flip_p:
            x = torch.flip(x, dims=(-1,))
        return color_jitter(x, self.jitter, g)

    def __getitem__(self, key: int | tuple[int, int]) -> Tensor:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if not -len(self.paths) <= index < len(self.paths):
            # Also ends iteration by the sequence protocol (`list(dataset)`), which a wrapped
            # index would turn into an endless loop.
            raise IndexError(f"index {index} out of range for {len(self.paths)} images")
        index %= len(self.paths)
        if self._cache is not None or self._disk is not None:
            u = self._cache[index] if self._cache is not None else self._disk.read(index)
            x = u.float() / 127.5 - 1.0
            return self.augment_tensor(x, seed) if self.augment else x
        return self._load(index, seed)

    def _load(self, index: int, seed: int | None) -> Tensor:
        # A file that passed the scan can still fail (replaced on disk, network share hiccup):
        # substitute the next image rather than kill a long run. Inside a DataLoader worker the
        # append lands in the worker's copy; the warning is what reaches the user.
        for attempt in range(_MAX_SUBSTITUTES):
            path = self.paths[(index + attempt) % len(self.paths)]
            try:
                x = load_image(
                    path, self.image_size, square=self.square, background=self.background
                )
            except UnreadableImageError as err:
                self.skipped.append((path, str(err.__cause__ or err)))
                log.warning("%s; using the next image instead", err)
                continue
            return self.augment_tensor(x, seed) if self.augment else x
        raise RuntimeError(
            f"{_MAX_SUBSTITUTES} consecutive images from index {index} failed to load; "
            f"last: {self.skipped[-1]}"
        )

"""LightningDataModule over an image folder, or the bundled Fluent Emoji 3D set by default.

Batches are plain (B, 3, S, S) float tensors in [-1, 1]. Configuration errors a user can make in
YAML (a missing folder, a bad fraction) raise in ``__init__``, so ``vqkit fit`` fails before it
spends time building the model; decoding and splitting happen in ``setup``.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..quantize import distributed as D
from .bundled import DATASETS, fetch
from .images import (
    DataError,
    ImageFolderDataset,
    check_augment_args,
    check_image_size,
    check_square,
    find_images,
    scan_images,
    warn_skipped,
)
from .sampler import ResumableLoader
from .split import split_by_group

log = logging.getLogger("vqkit.data")


def _existing_dir(path: str, arg: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        what = "is not a directory" if p.exists() else "does not exist"
        raise FileNotFoundError(f"{arg}={str(path)!r} {what}; pass a folder of images")
    return p


class ImageDataModule(L.LightningDataModule):
    """Images for tokenizer training.

    Args:
        root: folder of images (searched recursively). ``None``: the bundled ``dataset``,
            downloaded in ``prepare_data`` into ``cache_dir``.
        val_root: separate validation folder; otherwise ``val_fraction`` of ``root`` is held out
            by :func:`~vqkit.data.split.split_by_group` (skin-tone variants stay together).
        image_size: side of the square images fed to the model.
        square: "crop" takes the centred square, "pad" fills the short side with white.
        augment: horizontal flips (``flip_p``) and colour jitter (``jitter``) on train only.
        split_seed: seeds the train/val split and the ``max_images`` subset.
        shuffle_seed: seeds train shuffling and the workers' augmentation streams (with
            ``num_workers=0`` augmentation follows the global torch seed instead).
        max_images: use a random subset of this many images per folder (tiny runs).
        cache_images: decode every image once into memory as uint8 (``image_size**2 * 3`` bytes
            each): much faster epochs on CPU; 3,391 images at 64 px take 42 MB.
        pin_memory: ``None`` pins when CUDA is available.
        persistent_workers: keep loader workers between epochs (only with ``num_workers > 0``).
    """

    def __init__(
        self,
        root: str | None = None,
        val_root: str | None = None,
        val_fraction: float = 0.1,
        image_size: int = 64,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        square: Literal["crop", "pad"] = "crop",
        augment: bool = True,
        flip_p: float = 0.5,
        jitter: float = 0.1,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        max_images: int | None = None,
        persistent_workers: bool = True,
        dataset: str = "fluent-emoji-3d",
        cache_dir: str | None = None,
        cache_images: bool = False,
    ) -> None:
        super().__init__()
        self.root = _existing_dir(root, "root") if root is not None else None
        self.val_root = _existing_dir(val_root, "val_root") if val_root is not None else None
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        check_image_size(image_size)
        check_square(square)
        check_augment_args(flip_p, jitter)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
        if root is None and dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
        self.save_hyperparameters()
        self.val_fraction = val_fraction
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.square: Literal["crop", "pad"] = square
        self.augment = augment
        self.flip_p = flip_p
        self.jitter = jitter
        self.split_seed = split_seed
        self.shuffle_seed = shuffle_seed
        self.max_images = max_images
        self.persistent_workers = persistent_workers and num_workers > 0
        self.dataset = dataset
        self.cache_dir = cache_dir
        self.cache_images = cache_images
        self.skipped: list[tuple[Path, str]] = []
        self.train_dataset: ImageFolderDataset | None = None
        self.val_dataset: ImageFolderDataset | None = None

    @property
    def skipped_count(self) -> int:
        """Files with an image extension that could not be decoded (train and val)."""
        return len(self.skipped)

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node: the only place that may download.
        if self.root is None:
            fetch(self.dataset, self.cache_dir)

    def _images(self, folder: Path, *, verified: bool = False) -> list[Path]:
        paths = find_images(folder)
        if self.max_images is not None and len(paths) > self.max_images:
            paths = sorted(random.Random(self.split_seed).sample(paths, self.max_images))
        if verified:
            # The bundled set is sha256-checked and known to decode; scanning it costs ~5 s.
            return paths
        good, bad = scan_images(paths)
        warn_skipped(bad, len(paths))
        self.skipped.extend(bad)
        if not good:
            raise DataError(
                f"no usable image in {str(folder)!r}: found {len(paths)} image files, "
                f"{len(bad)} could not be decoded"
            )
        return good

    def _dataset(self, paths: list[Path], augment: bool) -> ImageFolderDataset:
        return ImageFolderDataset(
            paths,
            self.image_size,
            augment=augment,
            square=self.square,
            flip_p=self.flip_p,
            jitter=self.jitter,
            validate=False,  # _images() already decoded every file once
            cache=self.cache_images,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return  # Lightning may call setup once per stage
        # Every rank resolves the folder; after prepare_data the cache is complete, so no download.
        root = self.root if self.root is not None else fetch(self.dataset, self.cache_dir)
        self.skipped = []
        paths = self._images(root, verified=self.root is None)
        if self.val_root is not None:
            train, val = paths, self._images(self.val_root)
        else:
            train, val = split_by_group(paths, self.val_fraction, seed=self.split_seed)
        if len(train) < self.batch_size:
            raise DataError(
                f"batch_size={self.batch_size} is larger than the {len(train)} training images; "
                "the train loader drops incomplete batches, so it would yield nothing. "
                "Lower batch_size or add images"
            )
        self.train_dataset = self._dataset(train, augment=self.augment)
        self.val_dataset = self._dataset(val, augment=False) if val else None
        log.info(
            "data: %d train, %d val images from %s (%d skipped)",
            len(train),
            len(val),
            root,
            self.skipped_count,
        )

    def _loader(self, dataset: ImageFolderDataset, train: bool) -> DataLoader:
        common = dict(
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )
        if train:
            # Resumes mid-epoch with the same batches and augmentations; shards itself under
            # DDP (so the trainer runs with use_distributed_sampler=False).
            return ResumableLoader(
                dataset, batch_size=self.batch_size, seed=self.shuffle_seed, **common
            )
        # Validation in order; under DDP each process takes its shard (torch's sampler pads
        # with a few repeats so every process runs the same number of batches).
        sampler = None
        if D.is_distributed():
            sampler = DistributedSampler(dataset, shuffle=False, drop_last=False)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, **common)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("call setup() before train_dataloader()")
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.train_dataset is None:
            raise RuntimeError("call setup() before val_dataloader()")
        if self.val_dataset is None:
            return []  # val_fraction=0 and no val_root: Lightning skips validation
        return self._loader(self.val_dataset, train=False)

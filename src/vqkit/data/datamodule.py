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
from .avatars import AVATARS, DEFAULT_NUM, DEFAULT_NUM_VAL, AvatarSet, fetch_avatars
from .bundled import DATASETS, fetch
from .diskcache import DiskImageCache, open_or_build
from .images import (
    DataError,
    ImageFolderDataset,
    check_augment_args,
    check_cache_mode,
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
            downloaded in ``prepare_data`` into ``cache_dir``: ``"fluent-emoji-3d"``, or
            ``"avatars"``, the avatar set drawn offline from fixed seeds
            (:mod:`vqkit.data.avatars`; its own validation split, ``val_fraction`` unused).
        dataset_size: the avatar set's training images (default 20,000; drawn once, then
            reused; a larger number draws only the new ones). Unused with ``root``.
        val_size: the avatar set's validation images (default 2,000). Unused with ``root``.
        val_root: separate validation folder; otherwise ``val_fraction`` of ``root`` is held out
            by :func:`~vqkit.data.split.split_by_group` (skin-tone variants stay together).
        image_size: side of the square images fed to the model.
        square: "crop" takes the centred square, "pad" fills the short side with white.
        augment: horizontal flips (``flip_p``) and colour jitter (``jitter``) on train only.
        split_seed: seeds the train/val split and the ``max_images`` subset.
        shuffle_seed: seeds train shuffling and the workers' augmentation streams (with
            ``num_workers=0`` augmentation follows the global torch seed instead).
        max_images: use a random subset of this many images per folder (tiny runs; the avatar
            set: the first this many of each split).
        cache_images: where the decoded images are kept (``image_size**2 * 3`` bytes each as
            uint8; 3,391 images at 64 px take 42 MB, 60,000 at 256 px 11.8 GB).
            ``False`` / ``"none"``: decoded as they are read (use loader workers).
            ``True`` / ``"memory"``: decoded once into memory: much faster epochs on CPU.
            ``"disk"``: decoded once into a file under ``<cache_dir>/image-cache`` (the user
            cache folder by default) that later runs with the same files reuse, read one image
            at a time, so resident memory stays small; the build is also the check for
            unreadable files, which a reused cache skips. Under DDP one process builds it and
            the others wait (a file lock; on a shared file system without locks, run once on
            one machine first). ``"auto"``: memory if the images fit in
            ``memory_cache_limit_gb``, else disk. The pixels are identical in all modes.
        memory_cache_limit_gb: the largest decoded size (GB, 1e9 bytes) that ``"auto"`` keeps
            in memory.
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
        dataset_size: int | None = None,
        val_size: int | None = None,
        cache_dir: str | None = None,
        cache_images: bool | Literal["none", "memory", "disk", "auto"] = False,
        memory_cache_limit_gb: float = 2.0,
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
        if root is None and dataset not in DATASETS and dataset != AVATARS:
            known = sorted([*DATASETS, AVATARS])
            raise ValueError(f"unknown dataset {dataset!r}; known: {known}")
        # dataset_size / val_size size the avatar set; with --data.root they are unused, so
        # that a config for the avatar set also trains on a user's folder
        for name, value in (("dataset_size", dataset_size), ("val_size", val_size)):
            least = int(name == "dataset_size")
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < least
            ):
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        cache_mode = check_cache_mode(cache_images)
        if not memory_cache_limit_gb >= 0:
            raise ValueError(f"memory_cache_limit_gb must be >= 0, got {memory_cache_limit_gb}")
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
        self.dataset_size = DEFAULT_NUM if dataset_size is None else dataset_size
        self.val_size = DEFAULT_NUM_VAL if val_size is None else val_size
        self.cache_dir = cache_dir
        self.cache_images = cache_images
        self.cache_mode = cache_mode
        self.memory_cache_limit_gb = memory_cache_limit_gb
        # "none", "memory" or "disk": cache_mode with "auto" decided by setup()
        self.cache_resolved: str | None = None if cache_mode == "auto" else cache_mode
        self.skipped: list[tuple[Path, str]] = []
        self.train_dataset: ImageFolderDataset | None = None
        self.val_dataset: ImageFolderDataset | None = None

    @property
    def skipped_count(self) -> int:
        """Files with an image extension that could not be decoded (train and val)."""
        return len(self.skipped)

    @property
    def _is_avatars(self) -> bool:
        return self.root is None and self.dataset == AVATARS

    def _avatars(self) -> AvatarSet:
        return fetch_avatars(self.dataset_size, self.val_size, self.cache_dir)

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node: the only place that may download.
        if self._is_avatars:
            self._avatars()
        elif self.root is None:
            fetch(self.dataset, self.cache_dir)

    def _candidates(self, folder: Path) -> list[Path]:
        paths = find_images(folder)
        if self.max_images is not None and len(paths) > self.max_images:
            paths = sorted(random.Random(self.split_seed).sample(paths, self.max_images))
        return paths

    def _auto_cache(self, num_images: int) -> str:
        decoded = num_images * 3 * self.image_size**2
        return "memory" if decoded <= self.memory_cache_limit_gb * 1e9 else "disk"

    def images_in_memory(self) -> bool:
        """Whether the decoded images are (or, before ``setup``, will be) held in memory, where
        loader workers would only copy them. ``"auto"`` before ``setup`` counts the files."""
        mode = self.cache_resolved
        if mode is None:
            if self._is_avatars:
                n = self.dataset_size + self.val_size
            elif self.root is None:
                n = DATASETS[self.dataset].num_images
                n = min(n, self.max_images) if self.max_images is not None else n
            else:
                n = sum(len(self._candidates(f)) for f in (self.root, self.val_root) if f)
            mode = self._auto_cache(n)
        return mode == "memory"

    def _images(
        self, folder: Path, *, verified: bool = False, paths: list[Path] | None = None
    ) -> tuple[list[Path], DiskImageCache | None]:
        paths = self._candidates(folder) if paths is None else paths
        if self.cache_resolved == "disk":
            # Decoding into the cache is the validity scan (one pass); a complete cache of
            # these very files skips both and gives back the unreadable ones from its sidecar.
            found = open_or_build(
                paths, self.image_size, square=self.square, cache_dir=self._image_cache_dir()
            )
            good, bad, cache = found.paths, found.skipped, found.cache
        elif verified:
            # The bundled set is sha256-checked and known to decode; scanning it costs ~5 s.
            return paths, None
        else:
            (good, bad), cache = scan_images(paths), None
        warn_skipped(bad, len(paths))
        self.skipped.extend(bad)
        if not good:
            raise DataError(
                f"no usable image in {str(folder)!r}: found {len(paths)} image files, "
                f"{len(bad)} could not be decoded"
            )
        return good, cache

    def _image_cache_dir(self) -> Path | None:
        return Path(self.cache_dir).expanduser() / "image-cache" if self.cache_dir else None

    def _dataset(
        self,
        paths: list[Path],
        augment: bool,
        cache: DiskImageCache | None = None,
        all_paths: list[Path] | None = None,
    ) -> ImageFolderDataset:
        if cache is not None and all_paths is not None:
            # The split took a subset of the folder's readable files: the same rows of its cache.
            row = {p: i for i, p in enumerate(all_paths)}
            cache = cache.select([row[p] for p in paths])
        return ImageFolderDataset(
            paths,
            self.image_size,
            augment=augment,
            square=self.square,
            flip_p=self.flip_p,
            jitter=self.jitter,
            validate=False,  # _images() already decoded every file once
            cache=cache if cache is not None else self.cache_resolved == "memory",
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return  # Lightning may call setup once per stage
        # Every rank resolves the folder; after prepare_data the cache is complete, so no download.
        self.skipped = []
        if self._is_avatars:  # drawn and sha256-listed: no scan, and its own validation split
            built = self._avatars()
            root, val_root = built.root / "train", built.root / "val"
            candidates, val_candidates = built.train, built.val
            if self.max_images is not None:
                candidates = candidates[: self.max_images]
                val_candidates = val_candidates[: self.max_images]
        else:
            root = self.root if self.root is not None else fetch(self.dataset, self.cache_dir)
            val_root = self.val_root
            candidates = self._candidates(root)
            val_candidates = self._candidates(val_root) if val_root is not None else []
        if self.cache_mode == "auto":
            self.cache_resolved = self._auto_cache(len(candidates) + len(val_candidates))
            log.info("cache_images='auto': %s", self.cache_resolved)
        paths, cache = self._images(root, verified=self.root is None, paths=candidates)
        val_cache = None
        if val_root is not None:
            train, val, val_all = paths, [], []
            if val_candidates:
                val, val_cache = self._images(
                    val_root, verified=self._is_avatars, paths=val_candidates
                )
                val_all = val
        else:
            train, val = split_by_group(paths, self.val_fraction, seed=self.split_seed)
            val_cache, val_all = cache, paths
        if len(train) < self.batch_size:
            raise DataError(
                f"batch_size={self.batch_size} is larger than the {len(train)} training images; "
                "the train loader drops incomplete batches, so it would yield nothing. "
                "Lower batch_size or add images"
            )
        self.train_dataset = self._dataset(train, self.augment, cache, paths)
        self.val_dataset = self._dataset(val, False, val_cache, val_all) if val else None
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

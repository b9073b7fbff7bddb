"""The data module of the sparse SDF example: shapes as lists of active SDF patches.

Training shapes are procedural CSG shapes with seeds ``0 .. train_shapes - 1``, validation
shapes have seeds from 1,000,000 on (never the same shape), and the held-out shapes are real
meshes from npm packages (the Stanford bunny, the Utah teapot, ...), which no training step
sees. All are built once into the vqkit cache (``vqkit.data.shapes``) and held in memory as
uint8 patches (about 40 kB per shape).

A batch is a dict, the token list a sparse-voxel model passes around:

- ``values`` (N, patch^3) float32: the normalized truncated SDF of every active patch;
- ``coords`` (N, 4) long: (sample in the batch, x, y, z) on the patch grid;
- ``index`` (B,) long: each sample's shape in its set; ``batch_size``: B;
- validation batches also carry ``inside`` (B, G, G, G) bool: which inactive patches lie inside
  (to rebuild dense grids for IoU and meshes).

Training shapes are augmented by the 48 rotations and reflections of the cube, a pure function
of the sampler's per-item seed, so a resumed run sees the very same batches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..quantize import distributed as D
from .sampler import ResumableLoader
from .shapes import VAL_START

log = logging.getLogger("vqkit.data")


def cube_symmetry(seed: int) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """One of the 48 symmetries of the cube from ``seed``: an axis order and three flips."""
    code = seed % 48
    perms = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    perm = perms[code % 6]
    flips = code // 6
    return perm, (bool(flips & 1), bool(flips & 2), bool(flips & 4))


def transform_patches(
    coords: np.ndarray,
    values: np.ndarray,
    patch: int,
    grid: int,
    perm: tuple[int, int, int],
    flips: tuple[bool, bool, bool],
) -> tuple[np.ndarray, np.ndarray]:
    """Apply an axis order and flips to patch coordinates (n, 3) and values (n, patch^3)."""
    c = coords[:, list(perm)].astype(np.int64)
    v = values.reshape(-1, patch, patch, patch).transpose(0, *(1 + p for p in perm))
    for axis, flip in enumerate(flips):
        if flip:
            c[:, axis] = grid - 1 - c[:, axis]
            v = np.flip(v, axis=1 + axis)
    return c, np.ascontiguousarray(v).reshape(-1, patch**3)


class ShapeDataset(Dataset):
    """The shapes of a ``ShapeSet``; items are dicts (``collate_shapes`` batches them).

    With ``augment``, items are requested as ``(index, seed)`` (``ResumableSampler``) and each
    gets the cube symmetry of its seed; else as plain indices, unchanged.
    """

    def __init__(self, shapes: Any, *, augment: bool = False, with_inside: bool = False) -> None:
        self.shapes = shapes
        self.augment = augment
        self.with_inside = with_inside

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        coords, values = self.shapes.patches(index)
        grid = self.shapes.resolution // self.shapes.patch
        out: dict[str, Any] = {"index": int(index)}
        if self.augment and seed is not None:
            perm, flips = cube_symmetry(seed)
            coords, values = transform_patches(coords, values, self.shapes.patch, grid, perm, flips)
        out["coords"] = torch.from_numpy(np.asarray(coords, dtype=np.int64))
        out["values"] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        if self.with_inside:
            out["inside"] = torch.from_numpy(self.shapes.inside_grid(index).copy())
        return out


def collate_shapes(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One token list for a batch of shapes: the sample index becomes column 0 of coords."""
    coords = [
        torch.cat([torch.full((it["coords"].shape[0], 1), b), it["coords"]], dim=1)
        for b, it in enumerate(items)
    ]
    batch: dict[str, Any] = {
        "coords": torch.cat(coords) if coords else torch.empty(0, 4, dtype=torch.long),
        "values": torch.cat([it["values"] for it in items]),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "batch_size": len(items),
    }
    if items and "inside" in items[0]:
        batch["inside"] = torch.stack([it["inside"] for it in items])
    return batch


class ShapeDataModule(L.LightningDataModule):
    """Procedural training and validation shapes, and real held-out meshes.

    Args:
        train_shapes: procedural training shapes (seeds 0 .. train_shapes - 1).
        val_shapes: procedural validation shapes (seeds from 1,000,000).
        held_out: names of the held-out meshes (``vqkit.data.shapes.HELD_OUT_MESHES``; None:
            all of them; []: none). Fetched with npm once (``vqkit data fetch meshes``);
            evaluated at the end of ``fit``, never trained on.
        resolution: voxels per grid side.
        patch: voxels per patch side.
        batch_size: shapes per batch (per process).
        augment: the cube's 48 symmetries on training shapes.
        num_workers: loader worker processes (the shapes are in memory: 0 is usually best).
        shuffle_seed: the training order's seed.
        cache_dir: where built shape sets are kept (default: ``$VQKIT_DATA`` or the user cache).
        build_workers: processes that build the shape sets the first time (default: all CPUs).
    """

    def __init__(
        self,
        train_shapes: int = 2000,
        val_shapes: int = 200,
        held_out: list[str] | None = None,
        *,
        resolution: int = 64,
        patch: int = 4,
        batch_size: int = 8,
        augment: bool = True,
        num_workers: int = 0,
        shuffle_seed: int = 0,
        cache_dir: str | None = None,
        build_workers: int | None = None,
    ) -> None:
        super().__init__()
        if train_shapes < 1:
            raise ValueError(f"train_shapes must be >= 1, got {train_shapes}")
        if val_shapes < 0:
            raise ValueError(f"val_shapes must be >= 0, got {val_shapes}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if patch < 1 or resolution % patch:
            raise ValueError(f"resolution ({resolution}) must be a multiple of patch ({patch})")
        if held_out is not None:
            from .shapes import HELD_OUT_MESHES

            unknown = sorted(set(held_out) - set(HELD_OUT_MESHES))
            if unknown:
                raise ValueError(
                    f"unknown held-out meshes {unknown}; known: {sorted(HELD_OUT_MESHES)}"
                )
        self.train_shapes, self.val_shapes = train_shapes, val_shapes
        self.held_out = held_out
        self.resolution, self.patch = resolution, patch
        self.batch_size, self.augment = batch_size, augment
        self.num_workers, self.shuffle_seed = num_workers, shuffle_seed
        self.cache_dir, self.build_workers = cache_dir, build_workers
        self.train_set = self.val_set = self.held_out_set = None

    @property
    def grid(self) -> int:
        return self.resolution // self.patch

    def _sets(self) -> tuple[Any, Any, Any]:
        from .shapes import HELD_OUT_MESHES, mesh_shape_set, procedural_shape_set

        common = {"resolution": self.resolution, "patch": self.patch, "cache_dir": self.cache_dir}
        train = procedural_shape_set(self.train_shapes, workers=self.build_workers, **common)
        val = None
        if self.val_shapes:
            val = procedural_shape_set(
                self.val_shapes, start=VAL_START, workers=self.build_workers, **common
            )
        names = sorted(HELD_OUT_MESHES) if self.held_out is None else list(self.held_out)
        held = mesh_shape_set(names, **common) if names else None
        return train, val, held

    def prepare_data(self) -> None:
        # once per node, before the other processes load: builds (or finds) the cached sets
        self._sets()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set, self.val_set, self.held_out_set = self._sets()
        held = len(self.held_out_set) if self.held_out_set is not None else 0
        val = len(self.val_set) if self.val_set is not None else 0
        log.info(
            "data: %d training shapes (%d patches), %d validation shapes, %d held-out meshes; "
            "%d^3 grid in %d^3 patches",
            len(self.train_set),
            self.train_set.tokens(),
            val,
            held,
            self.resolution,
            self.patch,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("call setup() before train_dataloader()")
        dataset = ShapeDataset(self.train_set, augment=self.augment)
        return ResumableLoader(
            dataset,
            batch_size=self.batch_size,
            seed=self.shuffle_seed,
            collate_fn=collate_shapes,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.train_set is None:
            raise RuntimeError("call setup() before val_dataloader()")
        if self.val_set is None:
            return []
        dataset = ShapeDataset(self.val_set, with_inside=True)
        sampler = None
        if D.is_distributed():
            sampler = DistributedSampler(dataset, shuffle=False, drop_last=False)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate_shapes,
            num_workers=self.num_workers,
        )

    def held_out_batches(self, batch_size: int | None = None) -> list[dict[str, Tensor]]:
        """The held-out meshes as validation-style batches (empty without any)."""
        if self.held_out_set is None:
            return []
        dataset = ShapeDataset(self.held_out_set, with_inside=True)
        bs = batch_size or self.batch_size
        idx = list(range(len(dataset)))
        return [
            collate_shapes([dataset[i] for i in idx[s : s + bs]]) for s in range(0, len(idx), bs)
        ]

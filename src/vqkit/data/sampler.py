"""A shuffling sampler and loader that resume mid-epoch exactly.

Lightning saves the state of a training loader that has ``state_dict``/``load_state_dict``; a
run resumed from a mid-epoch checkpoint then continues with the very batches it would have
seen. Each item is yielded as ``(index, seed)`` so augmentation is a pure function of the epoch
and index, not of a process's random stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from ..quantize import distributed as D


class ResumableSampler(Sampler[tuple[int, int]]):
    """Permutation of ``range(n)`` drawn from ``seed + epoch``; under torch.distributed each
    process takes every ``world``-th item of the same permutation (its shard)."""

    def __init__(
        self,
        n: int,
        seed: int = 0,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = True,
    ) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        self.seed = seed
        self.rank = D.rank() if rank is None else rank
        self.world = D.world_size() if world_size is None else world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0  # items of this process's shard already consumed in this epoch

    def _shard(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        per = self.n // self.world if self.drop_last else -(-self.n // self.world)
        perm = (perm * 2)[: per * self.world]  # pad by wrapping when not dropping
        return perm[self.rank :: self.world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        shard, start = self._shard(), self.start
        self.start = 0
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003
        for i in shard[start:]:
            yield i, base + i

    def __len__(self) -> int:
        # The full shard, also when resuming: Lightning sizes the epoch from this and counts the
        # batches already done itself.
        return len(self._shard()) if self.world > 1 else self.n


class ResumableLoader(DataLoader):
    """A DataLoader over a ``ResumableSampler`` that tracks (epoch, batches yielded)."""

    def __init__(self, dataset, *, batch_size: int, seed: int = 0, **kwargs: Any) -> None:  # noqa: ANN001
        sampler = ResumableSampler(len(dataset), seed)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
        self._epoch = -1  # the epoch being iterated; the next fresh iteration takes _epoch + 1
        self._batches = 0
        self._resume = False

    def __iter__(self):  # noqa: ANN204
        sampler: ResumableSampler = self.sampler
        if self._resume:
            self._resume = False  # position already set by load_state_dict
        else:
            # A new epoch starts at every fresh iteration: Lightning may stop consuming an
            # epoch before the iterator is exhausted, so the count cannot wait for the end.
            self._epoch += 1
            self._batches = 0
            sampler.epoch, sampler.start = self._epoch, 0
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        world = self.sampler.world
        return {"epoch": max(self._epoch, 0), "batches": self._batches, "world": world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        world = int(state.get("world", self.sampler.world))
        if world != self.sampler.world:
            # Resumed on another number of processes: the shards are drawn anew for it, and
            # the epoch goes on after as many images as all processes had taken of it.
            batches = batches * world // self.sampler.world
        if batches >= len(self):
            # Saved at the end of an epoch: the next iteration is a fresh epoch.
            self._epoch, self._batches, self._resume = epoch, 0, False
            return
        self._epoch, self._batches, self._resume = epoch, batches, True
        sampler: ResumableSampler = self.sampler
        sampler.epoch = epoch
        sampler.start = batches * self.batch_size

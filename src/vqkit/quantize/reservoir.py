"""A fixed-size uniform sample of a stream of vectors (Algorithm R), vectorized and replicated.

``ReservoirSampler.add`` processes a whole batch at once: the random slot choices for every item
are drawn in one call from a CPU ``torch.Generator``, collisions inside the batch are resolved as
the sequential algorithm would (the later item wins), and only the accepted rows are copied. On
one process, with the reservoir on the inputs' device, nothing is read back from the device, so
``add`` does not synchronize CUDA (the collectives of the distributed case do).

Under ``torch.distributed`` every process holds the same reservoir: a uniform sample of the
global stream, i.e. the concatenation in rank order of each step's per-rank batches. Since the
generator is seeded identically everywhere and the number of draws depends only on the global
batch size, all ranks agree on which global items are accepted into which slots without
communicating; each rank then ships only its own accepted rows (a handful per step once the
reservoir is full) and every rank writes the same rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed as D

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STATE = ("buffer", "seen", "rng_state")


def _to(t: Tensor, device: torch.device) -> Tensor:
    # Host-to-device copies of pageable memory are staged before returning, so non_blocking is
    # safe there and spares a stream synchronization per step; device-to-host ones are not.
    if t.device == device:
        return t
    return t.to(device, non_blocking=device.type != "cpu")


class ReservoirSampler(nn.Module):
    """Uniform sample without replacement of at most ``size`` rows from everything ``add`` saw.

    Args:
        size: capacity in rows (>= 1).
        dim: row width (>= 1).
        dtype: storage dtype, one of float32, float16, bfloat16. Rows are cast on insertion.
        device: storage device. ``None`` (default) or any device other than ``"cpu"`` makes the
            reservoir follow the parent module through ``.to()``/``.cuda()``/``.half()`` like any
            buffer. ``device="cpu"`` pins it: ``_apply`` leaves all three buffers alone, so the
            reservoir stays on the host, in its dtype, whatever the parent module is moved to (to
            keep a large reservoir out of GPU memory). Only the accepted rows cross to the host.
        seed: seed of the CPU generator that draws the slot choices. Must be the same on every
            process under ``torch.distributed``.

    Buffers (all persistent, so ``state_dict()`` resumes a run exactly): ``buffer`` (size, dim);
    ``seen``, a long scalar counting the stream items so far; ``rng_state``, the uint8 state of
    the generator after the last ``add``. ``seen`` is also a read-only ``int`` property (the
    tensor is in ``self._buffers["seen"]`` and in the state dict under ``"seen"``).

    Distributed: every process must call ``add`` at every step (with 0 rows if it has none), as
    it runs collectives; a ``ValueError`` for a bad shape is raised before any collective, so a
    shape mismatch on one rank only would hang the others. The buffers end up bitwise identical
    on all ranks, which makes DDP's ``broadcast_buffers=True`` harmless for correctness (it
    copies rank 0's identical values every forward). That broadcast still costs
    ``memory_bytes()`` of traffic per step, so ``broadcast_buffers=False`` is cheaper, and it is
    required with a pinned CPU reservoir under a NCCL-only process group (NCCL cannot move CPU
    tensors; a ``"cpu:gloo,cuda:nccl"`` process group also works).
    """

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
        self.size = size
        self.dim = dim
        self.seed = seed
        self.pinned = device is not None and torch.device(device).type == "cpu"
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        self.register_buffer("buffer", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("rng_state", gen.get_state().to(device))
        # Host mirrors of ``seen`` and ``rng_state``: reading the buffers back from a GPU would
        # synchronize the device on every step. They are re-read only after a state-dict load.
        self._gen = gen
        self._seen = 0
        self._mirrors_valid = True
        self._owner: np.ndarray | None = None  # scratch for _choose, one int64 per slot

    # ``seen`` is both a buffer (in ``_buffers``) and this property. nn.Module.register_buffer
    # probes ``hasattr(self, "seen")`` first, so the getter must raise AttributeError until the
    # buffer exists.
    @property
    def seen(self) -> int:
        """Number of stream items added so far (over all processes)."""
        if "seen" not in self._buffers:
            raise AttributeError("seen")
        self._sync_mirrors()
        return self._seen

    @property
    def filled(self) -> int:
        """Number of valid rows: ``min(seen, size)``."""
        return min(self.seen, self.size)

    def memory_bytes(self) -> int:
        return self.size * self.dim * self.buffer.element_size()

    def contents(self) -> Tensor:
        """The valid rows, (filled, dim). A view: later ``add`` calls overwrite it in place."""
        return self.buffer[: self.filled]

    def reset(self) -> None:
        """Empty the reservoir. The generator keeps going, so a refill draws fresh choices."""
        self._sync_mirrors()
        self._seen = 0
        self._buffers["seen"].zero_()

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """Offer the rows of ``x`` (n, dim), any device and float dtype, n possibly 0."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"ReservoirSampler.add expects x of shape (n, {self.dim}), got {tuple(x.shape)}"
            )
        self._sync_mirrors()
        n = x.shape[0]
        sizes = D.all_gather_sizes(n, x.device)
        total = sum(sizes)
        if total == 0:
            return
        rank = D.rank()
        offset = sum(sizes[:rank])

        items, slots = self._choose(total)
        if len(items):
            if D.is_distributed():
                # ``items`` is ascending and the ranks own contiguous ranges of it in rank
                # order, so concatenating each rank's accepted rows in rank order lines them up
                # with ``slots`` -- and every rank can count the others' contributions itself.
                cuts = np.searchsorted(items, [0, *itertools.accumulate(sizes)]).tolist()
                counts = [b - a for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
                local = items[cuts[rank] : cuts[rank + 1]] - offset
            else:
                local, counts = items, None
            rows = x.detach().index_select(0, _to(torch.from_numpy(local), x.device))
            if rows.dtype != self.buffer.dtype:
                rows = rows.to(self.buffer.dtype)
            if counts is not None:
                rows = D.all_gather_variable(rows, counts)
            buf = self.buffer
            buf.index_copy_(0, _to(torch.from_numpy(slots), buf.device), _to(rows, buf.device))

        self._seen += total
        self._buffers["seen"].fill_(self._seen)
        rng_state = self._buffers["rng_state"]
        rng_state.copy_(self._gen.get_state(), non_blocking=rng_state.device.type != "cpu")

    def _choose(self, total: int) -> tuple[np.ndarray, np.ndarray]:
        """Which of the next ``total`` global items end up in which slot.

        Returns int64 arrays (items, slots): ascending item indices within the global batch and
        their distinct slots. Draws exactly ``max(0, total - free slots)`` numbers from the
        generator, identically on every rank. The bookkeeping is in NumPy because these arrays
        are small and torch's per-op overhead would dominate.
        """
        s, size = self._seen, self.size
        n_fill = min(max(size - s, 0), total)
        if n_fill == total:
            items = np.arange(total, dtype=np.int64)
            return items, items + s
        # Item at stream position i (0-based) replaces slot j ~ U{0..i} when j < size. Float64
        # uniforms scaled by i + 1 are unbiased to ~i / 2**53; the rare rounding up to j = i + 1
        # is harmless because i >= size, so that item is rejected just as j = i would be.
        # floor(v) < size iff v < size, so only the accepted few are converted to integers.
        u = torch.rand(total - n_fill, dtype=torch.float64, generator=self._gen).numpy()
        v = u * np.arange(s + n_fill + 1, s + total + 1, dtype=np.float64)
        hit = np.flatnonzero(v < size)
        rest_slots = v[hit].astype(np.int64)
        if n_fill:
            fill_items = np.arange(n_fill, dtype=np.int64)
            items = np.concatenate([fill_items, hit + n_fill])
            slots = np.concatenate([fill_items + s, rest_slots])
        else:
            items, slots = hit, rest_slots
        if len(hit) == 0 or len(items) == 1:  # the fill slots alone never collide
            return items, slots
        # Sequential Algorithm R lets the last writer of a slot win: mark each slot with its
        # highest item (unbuffered ``maximum.at``, O(m), no sort) and keep the items that won.
        if self._owner is None:
            self._owner = np.full(size, -1, dtype=np.int64)
        np.maximum.at(self._owner, slots, items)
        keep = self._owner[slots] == items
        self._owner[slots] = -1
        if keep.all():
            return items, slots
        return items[keep], slots[keep]

    def _sync_mirrors(self) -> None:
        if self._mirrors_valid:
            return
        self._seen = int(self._buffers["seen"])
        self._gen.set_state(self._buffers["rng_state"].detach().to("cpu", torch.uint8))
        self._mirrors_valid = True

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._fed_step = None  # a loaded state was not fed at any step of this object's run
        self._mirrors_valid = False
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> ReservoirSampler:
        if not self.pinned:
            return super()._apply(fn, recurse)
        # nn.Module._apply skips None buffers; blanking the entries (rather than popping them)
        # keeps their order, hence the state-dict key order.
        saved = {k: self._buffers[k] for k in _STATE}
        for k in _STATE:
            self._buffers[k] = None
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(saved)
        return self

    def extra_repr(self) -> str:
        where = ", pinned to cpu" if self.pinned else ""
        return f"size={self.size}, dim={self.dim}, dtype={self.buffer.dtype}{where}"

"""Decoded images on disk, for image sets larger than memory (``cache_images="disk"``).

One flat file of uint8 rows, each a (3, S, S) image in C order, for one list of image files
at one size, square mode and background; a JSON sidecar beside it records what it holds (the
number of rows, the size, the files that could not be decoded and why) and a ``complete``
flag. Both are named by a sha256 key over those settings and every file's path, size and
mtime_ns, so a changed, added or removed file makes a new cache instead of serving stale pixels.

Building decodes every file once, which is also the validity check the data module otherwise
runs before training: a later run with the same files skips both, and reads the list of
unreadable files back from the sidecar. Rows are written as they are decoded (memory stays
bounded), to a temporary file that is fsynced and renamed into place only when whole; the
sidecar is written last. An interrupted build therefore leaves nothing that a later run takes
for a complete cache. Under DDP every rank calls ``setup()``: an exclusive ``flock`` on
``<key>.lock`` lets one process build while the others wait and then read what it wrote. On a
shared file system without working locks (some NFS setups), run ``vqkit`` once on one machine
to build the cache before starting the others.

Rows are read with ``os.preadv`` into a fresh buffer rather than through ``mmap``: mapped pages
count toward the resident memory of every process that touched them, while pages read with
``pread`` sit in the OS page cache, which the kernel frees under pressure. Each process (every
DataLoader worker) opens its own descriptor on first use, and pickling leaves it behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import images as _images
from .images import RGB, WHITE, Square, check_image_size, check_square

try:
    import fcntl
except ImportError:  # Windows: no flock; one process builds, as on a lock-less file system
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("vqkit.data")

# Bump when the bytes a key stands for change (decoding, resizing, layout).
FORMAT_VERSION = 1
LAYOUT = "rows of (3, S, S) uint8, C order, row i at byte i * 3 * S * S"
SUBDIR = "image-cache"
_PROGRESS_EVERY_S = 30.0


def default_image_cache_dir() -> Path:
    """``<default_cache_dir()>/image-cache``: ``$VQKIT_DATA``, else the user cache folder."""
    from .bundled import default_cache_dir

    return default_cache_dir() / SUBDIR


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1  # gone: the build records it as unreadable
    return st.st_size, st.st_mtime_ns


def cache_inputs(
    paths: Sequence[str | os.PathLike[str]],
    image_size: int,
    square: Square,
    background: RGB,
) -> dict:
    """What a cache's bytes depend on: the settings and every file's (path, size, mtime_ns), in
    the given order (row order follows it)."""
    files = []
    for p in paths:
        size, mtime = _stat(Path(p))
        files.append([os.path.abspath(p), size, mtime])
    return {
        "version": FORMAT_VERSION,
        "image_size": image_size,
        "square": square,
        "background": list(background),
        "files": files,
    }


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


class DiskImageCache:
    """Rows of a complete cache file, read one image at a time.

    ``rows`` selects (and orders) the file's rows this view serves: item ``i`` is file row
    ``rows[i]``. Picklable; the file descriptor is opened lazily in each process.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        image_size: int,
        num_rows: int,
        rows: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        check_image_size(image_size)
        self.path = Path(path)
        self.image_size = image_size
        self.num_rows = num_rows
        self.row_bytes = 3 * image_size * image_size
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        if (
            self.rows is not None
            and len(self.rows)
            and not (self.rows.min() >= 0 and self.rows.max() < num_rows)
        ):
            raise IndexError(f"rows must lie in [0, {num_rows}) for {self.path}")
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.num_rows if self.rows is None else len(self.rows)

    def select(self, rows: Sequence[int]) -> DiskImageCache:
        """A view of items ``rows`` of this one (train / val subsets of a folder's cache)."""
        rows = np.asarray(rows, dtype=np.int64)
        file_rows = rows if self.rows is None else self.rows[rows]
        return DiskImageCache(self.path, self.image_size, self.num_rows, file_rows)

    def _file(self) -> int:
        # A forked DataLoader worker inherits the parent's descriptor; it opens its own so no
        # two processes share one (pread needs no shared offset, but close() would be shared).
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._pid = pid
        return self._fd

    def read(self, index: int) -> Tensor:
        """Item ``index`` as a (3, S, S) uint8 tensor (a fresh buffer the caller owns)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cached images")
        row = int(index if self.rows is None else self.rows[index])
        buf = np.empty(self.row_bytes, dtype=np.uint8)
        fd, offset, done = self._file(), row * self.row_bytes, 0
        while done < self.row_bytes:
            if hasattr(os, "preadv"):
                n = os.preadv(fd, [memoryview(buf)[done:]], offset + done)
            else:  # no preadv (older macOS): one extra copy
                chunk = os.pread(fd, self.row_bytes - done, offset + done)
                n = len(chunk)
                buf[done : done + n] = np.frombuffer(chunk, dtype=np.uint8)
            if n == 0:
                raise OSError(f"image cache {self.path} ends before row {row}: truncated?")
            done += n
        s = self.image_size
        return torch.from_numpy(buf).view(3, s, s)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = state["_pid"] = None  # a descriptor means nothing in another process
        return state

    def __repr__(self) -> str:
        where = str(self.path)
        return f"DiskImageCache({where!r}, image_size={self.image_size}, items={len(self)})"


@dataclass
class CacheResult:
    """What :func:`open_or_build` found: the readable ``paths`` (in the given order) with
    ``cache`` item ``i`` holding ``paths[i]``, the unreadable files with their reasons, and
    whether this call built the cache (``False``: it was complete already)."""

    cache: DiskImageCache
    paths: list[Path]
    skipped: list[tuple[Path, str]]
    built: bool
    sidecar: Path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish the image cache (%s)", path)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_sidecar(sidecar: Path, data: Path, key: str, n_files: int) -> dict | None:
    """The sidecar's record if it describes a complete cache of ``key``, else ``None``."""
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    try:
        ok = (
            meta.get("complete") is True
            and meta.get("key") == key
            and meta.get("version") == FORMAT_VERSION
            and meta["num_files"] == n_files
            and data.stat().st_size == meta["num_images"] * meta["row_bytes"]
        )
    except (OSError, KeyError, TypeError):
        return None
    return meta if ok else None


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _decode(path: Path, image_size: int, square: Square, background: RGB) -> np.ndarray | str:
    try:
        return _images.load_image_uint8(path, image_size, square=square, background=background)
    except _images.UnreadableImageError as err:
        return str(err.__cause__ or err)  # the same reason the scan gives


def _build(
    paths: Sequence[Path],
    data: Path,
    image_size: int,
    square: Square,
    background: RGB,
    threads: int,
) -> tuple[list[int], list[tuple[int, str]]]:
    """Decode every file (threads) and write the readable ones as rows of ``data``; returns
    (indices of the rows' files, [(index of an unreadable file, reason), ...])."""
    row_bytes = 3 * image_size * image_size
    need = len(paths) * row_bytes
    free = shutil.disk_usage(data.parent).free
    if need > free:
        raise OSError(
            f"the image cache needs {need / 1e9:.2f} GB for {len(paths):,} images at "
            f"{image_size} px and {data.parent} has {free / 1e9:.2f} GB free; pass a "
            "cache_dir on a larger disk or use cache_images='none'"
        )
    log.info(
        "building the image cache of %d files at %d px (at most %.2f GB) in %s",
        len(paths),
        image_size,
        need / 1e9,
        data,
    )
    tmp = data.with_name(f"{data.name}.tmp-{os.getpid()}")
    good: list[int] = []
    bad: list[tuple[int, str]] = []
    ahead = 4 * threads  # decoded images waiting to be written: memory stays bounded
    start = last = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vqkit-cache")
    try:
        with open(tmp, "wb") as f:
            window: deque[tuple[int, Future]] = deque()

            def write_one() -> None:
                nonlocal last
                i, fut = window.popleft()
                out = fut.result()
                if isinstance(out, str):
                    bad.append((i, out))
                else:
                    f.write(out.tobytes())
                    good.append(i)
                now = time.monotonic()
                if now - last > _PROGRESS_EVERY_S:
                    last = now
                    done = len(good) + len(bad)
                    log.info(
                        "image cache: %d / %d files (%.0f / s)",
                        done,
                        len(paths),
                        done / (now - start),
                    )

            for i, p in enumerate(paths):
                window.append((i, pool.submit(_decode, p, image_size, square, background)))
                if len(window) >= ahead:
                    write_one()
            while window:
                write_one()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, data)
        _fsync_dir(data.parent)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        tmp.unlink(missing_ok=True)  # only still there when the build failed
    return good, bad


def open_or_build(
    paths: Sequence[str | os.PathLike[str]],
    image_size: int,
    *,
    square: Square = "crop",
    background: RGB = WHITE,
    cache_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
) -> CacheResult:
    """The complete disk cache of ``paths``, built first if there is none.

    ``cache_dir`` defaults to :func:`default_image_cache_dir`. Files that cannot be decoded are
    left out (returned in ``skipped`` with the reason, as :func:`~vqkit.data.images.scan_images`
    gives them); the others keep their order.
    """
    check_image_size(image_size)
    check_square(square)
    paths = [Path(p) for p in paths]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_image_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    inputs = cache_inputs(paths, image_size, square, background)
    key = cache_key(inputs)
    data, sidecar = folder / f"{key}.u8", folder / f"{key}.json"
    built = False
    with _locked(folder / f"{key}.lock"):
        meta = _read_sidecar(sidecar, data, key, len(paths))
        if meta is None:
            # Temporary files of a build that was killed (we hold the lock: none is running).
            for stale in folder.glob(f"{key}.*.tmp-*"):
                stale.unlink(missing_ok=True)
            t0 = time.monotonic()
            threads = threads or min(8, os.cpu_count() or 1)
            good, bad = _build(paths, data, image_size, square, background, threads)
            seconds = time.monotonic() - t0
            meta = {
                "format": "vqkit image cache",
                "version": FORMAT_VERSION,
                "key": key,
                "layout": LAYOUT,
                "dtype": "uint8",
                "num_images": len(good),
                "num_files": len(paths),
                "image_size": image_size,
                "row_bytes": 3 * image_size * image_size,
                "skipped": [[i, str(paths[i]), why] for i, why in bad],
                "build_seconds": round(seconds, 3),
                "inputs": inputs,
                "complete": True,
            }
            _write_json(sidecar, meta)  # last: its `complete` is what makes the cache valid
            _fsync_dir(folder)
            built = True
            log.info(
                "image cache built: %d images (%d unreadable) in %.1f s (%.0f / s), %.2f GB",
                len(good),
                len(bad),
                seconds,
                len(paths) / max(seconds, 1e-9),
                data.stat().st_size / 1e9,
            )
        else:
            log.info(
                "image cache: %d images from %s (%d unreadable files, listed in its sidecar)",
                meta["num_images"],
                data,
                len(meta["skipped"]),
            )
    skipped_at = {int(i): why for i, _, why in meta["skipped"]}
    skipped = [(paths[i], why) for i, why in skipped_at.items()]
    readable = [p for i, p in enumerate(paths) if i not in skipped_at]
    cache = DiskImageCache(data, image_size, meta["num_images"])
    if len(readable) != len(cache):
        raise RuntimeError(f"image cache {sidecar} is inconsistent: delete it and rerun")
    return CacheResult(cache, readable, skipped, built, sidecar)

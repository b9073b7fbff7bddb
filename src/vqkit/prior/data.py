"""Token grids for training a prior: a trained tokenizer encodes its own training and validation
images once, and the codes are cached on disk; or the prior reads the shards ``vqkit encode``
wrote (``tokens=``), and nothing is encoded.

The split is the tokenizer's own (its checkpoint records its data module's settings), so the
prior is validated on images the tokenizer never trained on either. ``flip`` adds the codes of
the horizontally flipped training images (tokens of a flipped image are not the flipped tokens,
so it must be encoded); nothing else is augmented.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ..data.datamodule import ImageDataModule
from ..data.images import ImageFolderDataset
from ..models import VQModel
from ..tokens import TokensError, code_dtype, read_tokens, token_folders, tokenizer_split
from ..training.checkpoint import CheckpointError
from .tokenizer import (
    checkpoint_model_state,
    read_tokenizer,
    tokenizer_digest,
    tokenizer_image_size,
    tokenizer_model,
)

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: keyed by the tokenizer's sha256, not its file's path and mtime


@torch.no_grad()
def encode_dataset(
    model: VQModel,
    dataset: ImageFolderDataset,
    *,
    batch_size: int = 64,
    flip: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """(N, h, w) int16/int32 codes of every image of ``dataset`` (in order), on the CPU; with
    ``flip`` the codes of the mirrored images follow as N more rows."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    out: list[Tensor] = []
    mirrored: list[Tensor] = []
    for x in loader:
        x = x.to(device)
        out.append(model.encode(x).cpu())
        if flip:
            mirrored.append(model.encode(x.flip(-1)).cpu())
    codes = torch.cat(out + mirrored)
    return codes.to(getattr(torch, code_dtype(model.quantizer.codebook_size).name))


class TokenDataModule(L.LightningDataModule):
    """Code grids of a tokenizer's train and validation images, for ``PriorModule``.

    Args:
        tokenizer: checkpoint written by ``vqkit fit`` (in the CLI, linked from
            ``model.tokenizer``).
        root, val_root: other images than the tokenizer's own (its data module's settings are
            the default; the bundled set for the quickstart).
        batch_size: grids per training batch.
        flip: add the codes of horizontally flipped training images.
        encode_batch_size: images per batch while encoding.
        cache_dir: where the codes are cached (default ``~/.cache/vqkit/tokens``), keyed by the
            tokenizer's weights (their sha256, not the file's path or time stamp) and the image
            files; ``None`` values of the key reuse nothing stale.
        num_workers: training loader workers (the grids are in memory: 0 is usually right).
        tokens: a ``vqkit encode`` output to read instead of encoding: a folder with
            ``train/`` and ``val/`` (the tokenizer's split), or one token folder (training
            only, no validation). Its codes must be the tokenizer's (the manifest's sha256);
            ``flip`` takes the mirrored codes when it holds some (``vqkit encode --flip``);
            ``root``, ``val_root``, ``encode_batch_size`` and ``cache_dir`` are unused.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        root: str | None = None,
        val_root: str | None = None,
        batch_size: int = 64,
        flip: bool = True,
        encode_batch_size: int = 64,
        cache_dir: str | None = None,
        num_workers: int = 0,
        tokens: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or encode_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {encode_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.tokenizer = tokenizer
        self.root = root
        self.val_root = val_root
        self.batch_size = batch_size
        self.flip = flip
        self.encode_batch_size = encode_batch_size
        self.cache_dir = cache_dir
        self.num_workers = num_workers
        self.tokens = tokens
        self.train_codes: Tensor | None = None
        self.val_codes: Tensor | None = None
        self._ckpt: dict | None = None  # the tokenizer checkpoint, read once, kept until setup

    def _checkpoint(self) -> dict:
        if self.tokenizer is None:
            raise ValueError("TokenDataModule needs tokenizer= (a `vqkit fit` checkpoint)")
        if self._ckpt is None:
            self._ckpt = read_tokenizer(self.tokenizer)
        return self._ckpt

    # ------------------------------------------------------------------------------ images
    def _image_data(self, ckpt: dict) -> ImageDataModule:
        hp = ckpt.get("datamodule_hyper_parameters") or {}
        return tokenizer_split(
            hp,
            tokenizer_image_size(ckpt),
            hp.get("square", "crop"),
            root=self.root,
            val_root=self.val_root,
            hint="pass --data.root DIR",
        )

    def prepare_data(self) -> None:
        if self.tokens is None:
            self._image_data(self._checkpoint()).prepare_data()  # fetches the bundled set, once

    def _cache_file(self, ckpt: dict, dm: ImageDataModule) -> Path:
        from ..data.bundled import default_cache_dir
        from ..evaluation.fid import data_fingerprint

        parts = {
            "version": CACHE_VERSION,
            # the weights themselves: a moved tokenizer keeps its codes, and another one written
            # over the same file (whatever its size and time stamp) never reads stale ones
            "tokenizer": tokenizer_digest(checkpoint_model_state(ckpt)),
            "flip": self.flip,
            "train": data_fingerprint(dm.train_dataset.paths, size=dm.image_size, sq=dm.square),
            "val": data_fingerprint(dm.val_dataset.paths, size=dm.image_size, sq=dm.square)
            if dm.val_dataset is not None
            else None,
        }
        key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
        folder = Path(self.cache_dir) if self.cache_dir else default_cache_dir() / "tokens"
        return folder / f"{key}.pt"

    def setup(self, stage: str | None = None) -> None:
        if self.train_codes is not None:
            return
        if self.tokens is not None:
            self._read_tokens()
            return
        ckpt = self._checkpoint()
        self._ckpt = None  # not needed past setup: do not hold the tokenizer's weights twice
        path = Path(self.tokenizer)
        dm = self._image_data(ckpt)
        dm.setup("fit")
        cache = self._cache_file(ckpt, dm)
        if cache.is_file():
            data = torch.load(cache, weights_only=True)
            self.train_codes, self.val_codes = data["train"], data.get("val")
            log.info("prior data: codes read from %s", cache)
            return
        model = tokenizer_model(path, ckpt)
        device = self._device()
        kw = {"batch_size": self.encode_batch_size, "device": device}
        self.train_codes = encode_dataset(model, dm.train_dataset, flip=self.flip, **kw)
        self.val_codes = (
            encode_dataset(model, dm.val_dataset, **kw) if dm.val_dataset is not None else None
        )
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"train": self.train_codes, "val": self.val_codes}, tmp)
        os.replace(tmp, cache)  # every DDP process may write it: whole files only
        log.info("prior data: codes written to %s", cache)

    def _prior(self) -> L.LightningModule | None:
        trainer = getattr(self, "trainer", None)
        return getattr(trainer, "lightning_module", None) if trainer is not None else None

    def _tokenizer_sha256(self) -> tuple[str | None, str]:
        """(sha256, name) of the prior's tokenizer: the module's in a trainer, else the
        checkpoint's; no sha256 without either."""
        name = self.tokenizer or "the prior's tokenizer"
        sha = getattr(self._prior(), "tokenizer_sha256", None)
        if sha is None and self.tokenizer is not None:
            ckpt = self._checkpoint()
            self._ckpt = None
            sha = tokenizer_digest(checkpoint_model_state(ckpt))
        return sha, name

    def _read_tokens(self) -> None:
        """``train_codes`` / ``val_codes`` from the ``vqkit encode`` output ``tokens``."""
        sha, name = self._tokenizer_sha256()
        try:
            folders = token_folders(self.tokens)
            train = read_tokens(folders["train"], sha256=sha, tokenizer=name, flipped=self.flip)
            val = None
            if "val" in folders:
                val = read_tokens(folders["val"], sha256=sha, tokenizer=name, flipped=False)
        except TokensError as e:
            # one line from `vqkit prior fit`, as for a tokenizer that does not fit
            raise CheckpointError(f"--data.tokens: {e}") from None
        grid = getattr(getattr(self._prior(), "transformer", None), "grid", None)
        if grid is not None and tuple(train.codes.shape[1:]) != tuple(grid):
            raise CheckpointError(
                f"--data.tokens: {train.folder} holds {tuple(train.codes.shape[1:])} grids; the "
                f"prior models {tuple(grid)} grids"
            )
        self.train_codes = train.codes
        if self.flip:
            if train.flipped is not None:
                self.train_codes = torch.cat([train.codes, train.flipped])
            else:
                log.warning(
                    "prior data: %s holds no mirrored codes (encode with --flip); training on "
                    "the originals only",
                    train.folder,
                )
        self.val_codes = val.codes if val is not None else None
        log.info(
            "prior data: %d training and %d validation grids read from %s",
            len(self.train_codes),
            0 if self.val_codes is None else len(self.val_codes),
            self.tokens,
        )

    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # ----------------------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        if self.train_codes is None:
            raise RuntimeError("call setup() before train_dataloader()")
        if len(self.train_codes) < self.batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the {len(self.train_codes)} "
                "training grids"
            )
        return DataLoader(
            TensorDataset(self.train_codes),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_codes is None:
            return []
        return DataLoader(
            TensorDataset(self.val_codes), batch_size=self.batch_size, num_workers=self.num_workers
        )

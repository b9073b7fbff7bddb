"""Load a trained tokenizer back from a Lightning checkpoint.

A checkpoint written by ``vqkit fit`` carries its own config (see ``_save_config`` in
``module.py``), so ``load_tokenizer(path)`` rebuilds the exact model with no config file. A
checkpoint of a module built in Python needs its model passed back: ``load_tokenizer(path,
model=...)``.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..models import VQModel


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not a vqkit tokenizer."""


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load`` with errors that name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def load_tokenizer(
    path: str | Path,
    *,
    model: VQModel | None = None,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
    checkpoint: dict | None = None,
) -> nn.Module:
    """The training module (``VQTokenizerModule`` or a subclass) of a checkpoint, in eval mode.

    ``checkpoint``: the already-read checkpoint dict of ``path`` (saves reading it twice).
    ``model``: the ``VQModel`` to load the weights into, for checkpoints written outside
    ``vqkit fit``; when given it must have the checkpoint's shapes (codebook size included).
    """
    from lightning.pytorch.core.saving import _load_state

    from .module import VQTokenizerModule

    ckpt = checkpoint if checkpoint is not None else read_checkpoint(path, map_location)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    if model is None and "model" not in hparams:
        raise CheckpointError(
            f"{path} does not record its model config (it was not written by `vqkit fit`); "
            "pass the model: load_tokenizer(path, model=...)"
        )
    cls = VQTokenizerModule
    class_path = hparams.get("_class_path")
    if class_path:
        import importlib

        mod, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(mod), name)
    # Training-only arguments (a perceptual network with its own weight files) are not needed
    # to load the tokenizer, and are not in the checkpoint's state dict.
    skipped = [k for k in getattr(cls, "inference_skips_args", ()) if k in hparams]
    if skipped:
        hparams = {k: v for k, v in hparams.items() if k not in skipped}
        ckpt = {**ckpt, "hyper_parameters": hparams}
    kwargs = {"model": model} if model is not None else {}
    if model is not None:
        # The module's plain hyperparameters only: the model (and any other configured object)
        # comes from the caller, so nothing is instantiated from the config.
        hparams = {
            k: v
            for k, v in hparams.items()
            if not k.startswith("_")
            and k != "model"
            and not (isinstance(v, dict) and "class_path" in v)
        }
        ckpt = {**ckpt, "hyper_parameters": hparams}
    try:
        module = _load_state(cls, ckpt, strict=strict, **kwargs)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the model: {e}") from e
    return module.eval()


def load_model(path: str | Path, **kwargs) -> VQModel:  # noqa: ANN003
    """The ``VQModel`` (encoder, quantizer, decoder) of a checkpoint, in eval mode."""
    return load_tokenizer(path, **kwargs).model.eval()


def find_last_checkpoint(trainer) -> Path | None:  # noqa: ANN001
    """The newest ``last*.ckpt`` an earlier run with this trainer's settings wrote, or None.

    Lightning's own ``ckpt_path="last"`` only looks in this run's checkpoint folder. With a
    logger that folder is ``<save_dir>/<name>/version_<N>/checkpoints`` and every run gets a
    new N, so it finds nothing there and starts from scratch. This looks in
    every ``ModelCheckpoint``'s explicit ``dirpath``, in ``version_*/checkpoints`` under the
    logger's root folder, and in ``<default_root_dir>/checkpoints`` (the layout without a
    logger), and takes the most recently written file.
    """
    folders: list[Path] = []
    for cb in getattr(trainer, "checkpoint_callbacks", []):
        if getattr(cb, "dirpath", None):
            folders.append(Path(cb.dirpath))
    logger = getattr(trainer, "logger", None)
    root = getattr(logger, "root_dir", None) if logger is not None else None
    if root:
        folders += sorted(Path(root).glob("version_*/checkpoints"))
    folders.append(Path(trainer.default_root_dir) / "checkpoints")
    found = [p for f in folders if f.is_dir() for p in f.glob("last*.ckpt") if p.is_file()]
    return max(found, key=lambda p: (p.stat().st_mtime_ns, str(p)), default=None)

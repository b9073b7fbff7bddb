"""Load a trained tokenizer back from a Lightning checkpoint.

A checkpoint written by ``vqkit fit`` carries its own config (see ``_save_config`` in
``module.py``), so ``load_tokenizer(path)`` rebuilds the exact model with no config file. A
checkpoint of a module built in Python needs its model passed back: ``load_tokenizer(path,
model=...)``.
"""

from __future__ import annotations

import copy
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from ..fileio import _atomic_write
from ..models import VQModel

log = logging.getLogger("vqkit.training")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not a vqkit tokenizer."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` that a kill cannot leave half-written under the real name (see
    :func:`atomic_write_bytes`)."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (full disk, read-only or vanished folder): the
    checkpoints written before it are whole (writes are atomic)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with :func:`atomic_save` for local paths (remote URLs go
    to Lightning's own writer). ``vqkit fit`` installs it; with a plain Trainer pass
    ``plugins=[AtomicCheckpointIO()]``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            atomic_save(checkpoint, path)
        except OSError as e:
            raise CheckpointWriteError(
                f"cannot write checkpoint {path}: {e.strerror or e}; the checkpoints written "
                "before it are whole (resume with --ckpt_path last once there is room)",
            ) from e
        return None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be a checkpoint to resume from (None if it looks whole): checked by
    reading its zip structure and the CRC of every member, without unpickling anything."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            if bad is not None:
                return f"corrupt member {bad}"
            if not any(n.endswith("data.pkl") for n in z.namelist()):
                return "not a PyTorch checkpoint (no data.pkl)"
    except zipfile.BadZipFile as e:
        return f"truncated or not a checkpoint ({e})"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return None


def read_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, trust: bool = False
) -> dict:
    """``torch.load`` with errors that name the file and the problem.

    By default the file is read with ``weights_only=True``: tensors, numbers, strings and plain
    containers only, which is all a vqkit checkpoint holds, so a shared checkpoint cannot run
    code. ``trust=True`` (the command's ``--trust-checkpoint``) allows arbitrary pickles, for a
    checkpoint from a source you trust that holds other objects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if trust or refused is None:
            detail = re.search(r"Unsupported operand \d+|invalid load key[^.\n]*", str(e))
            why = detail.group(0) if detail else "not a pickle torch can read"
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({why})") from e
        raise CheckpointError(
            f"{path} holds Python objects a safe load refuses ({refused.group(1)}); a pickle "
            "can run any code when it is read, so load it only if you trust its source: "
            "--trust-checkpoint (or trust=True)"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({e})") from e
    except Exception as e:  # noqa: BLE001  (the weights-only reader fails in many ways)
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({e!r})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def check_checkpoint_kind(path: str | Path, *, prior: bool = False) -> dict:
    """The checkpoint at ``path``, memory-mapped and read without unpickling code, or a
    one-line :class:`CheckpointError` if it is truncated, not a PyTorch file, not a Lightning
    checkpoint or a prior's (``vqkit fit --ckpt_path`` checks this before Lightning reads it)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = (
            f"holds Python objects a safe load refuses ({refused.group(1)})"
            if refused
            else ("is not a readable PyTorch checkpoint")
        )
        raise CheckpointError(f"{path} {what}") from e
    except Exception as e:  # noqa: BLE001  (the weights-only reader fails in many ways)
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({e!r})") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    hp = ckpt.get("hyper_parameters") or {}
    if "tokenizer" in hp and "model" not in hp and not prior:
        raise CheckpointError(
            f"{path} is a prior checkpoint (vqkit prior), not a tokenizer's; pass it to "
            "vqkit sample --prior"
        )
    return ckpt


def check_checkpoint_fits(path: str | Path, module: nn.Module) -> None:
    """Raise :class:`CheckpointError` in one line if ``path`` is not a checkpoint of
    ``module`` (other tensor shapes, a VQ-GAN's for a VQ-VAE, a prior's), before Lightning's
    restore fails with a traceback mid-setup. Reads the file memory-mapped, without unpickling
    code."""
    prior = "tokenizer" in getattr(module, "hparams", {})
    sd = check_checkpoint_kind(path, prior=prior)["state_dict"]
    own = module.state_dict()
    legacy = ".reservoir"  # older reservoir keys are migrated on load

    def _sample(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    missing = [k for k in own if k not in sd and legacy not in k]
    extra = [k for k in sd if k not in own and legacy not in k]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(v.shape)
    ]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} tensors of other shapes ({_sample(shapes)})")
    if missing:
        problems.append(f"{len(missing)} of the model's tensors missing ({_sample(missing)})")
    if extra:
        problems.append(f"{len(extra)} tensors the model does not have ({_sample(extra)})")
    if problems:
        raise CheckpointError(f"{path} is not a checkpoint of this model: " + "; ".join(problems))


def refuse_prior(ckpt: dict, path: str | Path) -> None:
    """Raise if ``ckpt`` is a prior's checkpoint (``vqkit prior fit``) where a tokenizer's is
    expected."""
    hparams = ckpt.get("hyper_parameters") or {}
    if "tokenizer" in hparams and "model" not in hparams:
        raise CheckpointError(
            f"{path} is a prior checkpoint (vqkit prior), not a tokenizer's; pass it to "
            "vqkit sample --prior"
        )


def load_tokenizer(
    path: str | Path,
    *,
    model: VQModel | None = None,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
    checkpoint: dict | None = None,
    trust: bool = False,
) -> nn.Module:
    """The training module (``VQTokenizerModule`` or a subclass) of a checkpoint, in eval mode.

    ``checkpoint``: the already-read checkpoint dict of ``path`` (saves reading it twice).
    ``trust``: allow arbitrary pickles (see :func:`read_checkpoint`).
    ``model``: the ``VQModel`` to load the weights into, for checkpoints written outside
    ``vqkit fit``; when given it must have the checkpoint's shapes (codebook size included).
    """
    from lightning.pytorch.core.saving import _load_state

    from .module import VQTokenizerModule

    ckpt = (
        checkpoint if checkpoint is not None else read_checkpoint(path, map_location, trust=trust)
    )
    # Lightning's instantiation turns the config's dicts into Namespaces in place: a copy, so
    # the caller's checkpoint dict stays plain (and saveable with weights_only readers)
    ckpt = {**ckpt, "hyper_parameters": copy.deepcopy(ckpt.get("hyper_parameters") or {})}
    refuse_prior(ckpt, path)
    hparams = dict(ckpt["hyper_parameters"])
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


def _checkpoint_folders(trainer) -> list[Path]:  # noqa: ANN001
    folders: list[Path] = []
    for cb in getattr(trainer, "checkpoint_callbacks", []):
        if getattr(cb, "dirpath", None):
            folders.append(Path(cb.dirpath))
    logger = getattr(trainer, "logger", None)
    root = getattr(logger, "root_dir", None) if logger is not None else None
    if root:
        folders += sorted(Path(root).glob("version_*/checkpoints"))
    folders.append(Path(trainer.default_root_dir) / "checkpoints")
    return [f for f in dict.fromkeys(folders) if f.is_dir()]


def _tier(path: Path) -> int:
    """Resume order: ``last`` and periodic files (any name but ``best*``), then ``best``."""
    return 1 if path.name.lower().startswith("best") else 0


def resume_candidates(trainer) -> list[Path]:  # noqa: ANN001
    """Every checkpoint an earlier run with this trainer's settings wrote, in the order
    ``--ckpt_path last`` tries them: ``last*`` and periodic checkpoints newest first (a kill
    between writing ``periodic-step=N`` and ``last.ckpt`` resumes from step N), then ``best*``
    newest first."""
    found = {p for f in _checkpoint_folders(trainer) for p in f.glob("*.ckpt") if p.is_file()}
    return sorted(found, key=lambda p: (_tier(p), -p.stat().st_mtime_ns, str(p)))


def find_last_checkpoint(trainer, report=None) -> Path | None:  # noqa: ANN001
    """The newest checkpoint an earlier run with this trainer's settings wrote that is whole,
    or None: the newest ``last*`` or periodic one, else the newest ``best*``.

    Lightning's own ``ckpt_path="last"`` only looks in this run's checkpoint folder. With a
    logger that folder is ``<save_dir>/<name>/version_<N>/checkpoints`` and every run gets a
    new N, so it finds nothing there and starts from scratch. This looks in every
    ``ModelCheckpoint``'s explicit ``dirpath``, in ``version_*/checkpoints`` under the logger's
    root folder, and in ``<default_root_dir>/checkpoints`` (the layout without a logger). A
    truncated or corrupt file (a kill during a write that was not atomic, a full disk) is
    skipped for the next, and ``report(message)`` (default: a warning on the ``vqkit`` logger)
    says which file and why. Leftover temporary files of interrupted atomic writes are removed.
    """
    report = report or log.warning
    for folder in _checkpoint_folders(trainer):
        for tmp in folder.glob(".*.ckpt.tmp-*"):
            tmp.unlink(missing_ok=True)
            report(f"removed {tmp}, a checkpoint write that was interrupted")
    for path in resume_candidates(trainer):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        report(f"skipping {path}: {problem}")
    return None

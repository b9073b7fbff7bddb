"""Options, loading and the one-line error wrapper that the tool commands (analyze,
evaluate, sample, export, encode, decode) share."""

from __future__ import annotations

import argparse
import sys


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="read the checkpoint with full pickle (it can run code): only for a checkpoint "
        "from a source you trust that a safe load refuses",
    )


def _add_input_args(p: argparse.ArgumentParser) -> None:
    """The checkpoint, data and device options `analyze` and `evaluate` share."""
    # the second spellings are seed 002's `codebook_utilization_check.py` options
    p.add_argument(
        "--ckpt",
        "--model_path",
        required=True,
        help="the tokenizer: a `vqkit fit` checkpoint, a `vqkit export` folder or a Hub id",
    )
    p.add_argument(
        "--data",
        "--data_dir",
        default=None,
        help="folder of images (searched recursively); default: the validation split the "
        "checkpoint was trained with (the bundled set's for the quickstart)",
    )
    p.add_argument(
        "--image-size", "--image_size", type=int, default=None, help="default: the training size"
    )
    p.add_argument("--batch-size", "--batch_size", type=int, default=32)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    _add_trust_arg(p)
    p.add_argument("--max-images", type=int, default=None, help="only the first N images")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers")


def _load_inputs(args: argparse.Namespace):  # noqa: ANN202
    """Check the shared options, then (device, model, datamodule hparams, image size) of the
    checkpoint, read once."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    return _load_checkpoint(args)


def _load_checkpoint(args: argparse.Namespace):  # noqa: ANN202
    """(device, model on the CPU, datamodule hparams, image size) from ``args.ckpt`` (a
    ``vqkit fit`` checkpoint, a ``vqkit export`` folder or a Hub id), ``args.device`` and
    ``args.image_size``, the tokenizer read once."""
    from ..prior.tokenizer import read_tokenizer, tokenizer_model

    device = _analysis_device(args.device)
    ckpt = read_tokenizer(args.ckpt, trust=getattr(args, "trust_checkpoint", False))
    model = tokenizer_model(args.ckpt, ckpt)
    dm_hparams = dict(ckpt.get("datamodule_hyper_parameters") or {})
    model_args = (ckpt.get("hyper_parameters") or {}).get("model") or {}
    size = args.image_size or dm_hparams.get("image_size")
    size = size or (model_args.get("init_args") or {}).get("resolution")
    if size is None:
        raise ValueError(f"{args.ckpt} does not record its image size; pass --image-size")
    model.token_grid(int(size))  # a size the model cannot tokenize fails here, named
    return device, model, dm_hparams, int(size)


def _source(path: str) -> str:
    """What ``--ckpt`` named, for the records: a file or folder as an absolute path, a Hub id
    as given."""
    from pathlib import Path

    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def _analysis_device(name: str | None):  # noqa: ANN202
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    valid = "use cpu, cuda or cuda:N"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; {valid}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; {valid}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name} requested but CUDA is not available (torch {torch.__version__}"
                "); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA devices are visible"
            )
    return dev


def _analysis_data(args: argparse.Namespace, dm_hparams: dict, image_size: int):  # noqa: ANN202
    """(dataset, image names, description) of the images to analyze."""
    from pathlib import Path

    from ..data.datamodule import ImageDataModule
    from ..data.images import ImageFolderDataset

    square = dm_hparams.get("square", "crop")
    if args.data is not None:
        root = Path(args.data).expanduser()
        ds = ImageFolderDataset(root, image_size, square=square)
        return ds, [p.relative_to(root).as_posix() for p in ds.paths], f"folder {root}"
    keys = ("root", "val_root", "val_fraction", "split_seed", "max_images", "dataset", "cache_dir")
    kwargs = {k: dm_hparams[k] for k in keys if k in dm_hparams}
    if kwargs.get("root") is None:
        kwargs.pop("root", None)
        kwargs["dataset"] = kwargs.get("dataset") or "fluent-emoji-3d"
    try:
        dm = ImageDataModule(
            **kwargs, image_size=image_size, batch_size=1, num_workers=0, augment=False
        )
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"the checkpoint's training data is not here ({e}); pass --data DIR"
        ) from e
    dm.prepare_data()
    dm.setup("validate")
    if dm.val_dataset is None:
        raise ValueError("the checkpoint's data has no validation split; pass --data DIR")
    where = str(dm.root) if dm.root is not None else f"the bundled {dm.dataset} set"
    base = dm.val_root or dm.root
    names = [p.relative_to(base).as_posix() if base else p.name for p in dm.val_dataset.paths]
    return dm.val_dataset, names, f"validation split of {where}"


def _guarded(prog: str, run, args: argparse.Namespace, *errors: type[Exception]) -> int:  # noqa: ANN001
    """Run a subcommand; the errors bad input causes end in one line and exit status 1."""
    from ..training.checkpoint import CheckpointError

    try:
        if getattr(args, "output_dir", None):
            # a read-only, full or impossible output folder: said before any work is done
            from pathlib import Path

            _check_writable(Path(args.output_dir).expanduser())
        return run(args)
    except (CheckpointError, OSError, ValueError, *errors) as e:
        # OSError: a file or folder that is missing, unreadable or not writable, a full disk
        print(f"vqkit {prog}: error: {e}", file=sys.stderr)
        return 1


class RunFolderError(OSError):
    """An output folder that cannot be created or written (read-only, a file in the way)."""


def _check_writable(folder) -> None:  # noqa: ANN001
    """Create ``folder`` and write, fsync and remove a small file in it: a read-only, full or
    impossible output folder is a one-line error before training, not a traceback at the first
    checkpoint."""
    import os

    probe = folder / f".vqkit-write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"vqkit")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise RunFolderError(
            f"cannot write to the output folder {str(folder)!r}: {e.strerror or e}"
        ) from e


def _check_counts(args: argparse.Namespace, *names: str) -> None:
    """``--batch-size`` and friends: >= 1 (``--num-workers`` >= 0; ``--max-images`` if set)."""
    for name in names:
        value = getattr(args, name)
        least = 0 if name == "num_workers" else 1
        if value is not None and value < least:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be >= {least}, got {value}")

"""``vqkit fit|validate|test`` and ``vqkit prior``: Lightning's CLI over typed signatures,
with vqkit's checks before a run and one-line errors."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .common import _check_writable

_STRUCTURE = (
    "Parser key",
    "Does not validate",
    "Subtypes:",
    "Errors:",
    "Given value",
    "Expected a <class 'NoneType'>",
    "Problem with given class_path",
)


def condense_parser_error(message: str) -> str:
    """jsonargparse's nested report of a bad config value ("Parser key ... Does not validate
    against any of the Union subtypes ... Given value: NestedArg(...)", 10-20 lines) as one
    line: the full key and the innermost reason."""
    lines = [line.strip().removeprefix("- ").strip() for line in message.splitlines()]
    lines = [line for line in lines if line]
    if len(lines) <= 1:
        return lines[0] if lines else message
    import re

    leaf = next((line for line in lines if not line.startswith(_STRUCTURE)), None)
    if leaf is None:  # the reason sits after "Problem with given class_path '...':"
        tails = [line.split("':", 1)[1].strip() for line in lines if "':" in line]
        leaf = next((t for t in tails if t), lines[-1])
    top = re.match(r'Parser key "([^"]+)"', lines[0])
    nested = re.findall(r"NestedArg\(key='([^']+)'", message)  # the outermost one is last
    key = ".".join(k for k in (top and top.group(1), nested and nested[-1]) if k)
    if not key:
        key = ".".join(re.findall(r'Parser key "([^"]+)"', message))
    return f"--{key}: {leaf}" if key else leaf


def _parser_class():  # noqa: ANN202
    from lightning.pytorch.cli import LightningArgumentParser

    class VQKitArgumentParser(LightningArgumentParser):
        """Config errors in one line, ``vqkit <command>: error: --key: reason``, exit 2."""

        def error(self, message: str, ex: Exception | None = None):  # noqa: ANN201
            if not self.exit_on_error:
                return super().error(message, ex)
            parser = getattr(ex, "subcommand_parser", None) or self
            prog = parser.prog.replace(" [options]", "")
            print(
                f"{prog}: error: {condense_parser_error(str(message))} ({prog} --help lists "
                "the options)",
                file=sys.stderr,
            )
            sys.exit(2)

    return VQKitArgumentParser


def _lost_process(err: BaseException) -> str | None:
    """The first line of a collective that failed because another process of the run died or
    stopped answering (gloo: connection reset or closed; NCCL: a watchdog timeout), else None."""
    import re

    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", ())
    text = str(err)
    peer = re.search(
        r"Connection (reset|closed) by peer|Broken pipe|timed out|Timeout|NCCL error|"
        r"ProcessGroup\w* .*(abort|terminat)",
        text,
    )
    distributed = dist.is_available() and dist.is_initialized()
    if not (isinstance(err, dist_error) or (peer and distributed)):
        return None
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
    line = re.sub(r"^\[[^\]]*\] ", "", line)  # gloo's source location
    return line.split(". This is typically")[0]


def _innermost(err: BaseException) -> BaseException:
    """The exception a config error started from (jsonargparse wraps a class's own ValueError
    in its Union report)."""
    seen = set()
    while err.__cause__ is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    return err


def _say(message: str) -> None:
    """One line on stderr from the first process only (every DDP process runs the CLI)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        print(message, file=sys.stderr)


_CONFIGURED = False


def _before_run(cli, prog: str = "vqkit") -> None:  # noqa: ANN001
    """Install the atomic checkpoint writer; ``--ckpt_path last`` means the newest whole
    checkpoint of earlier runs (last* or periodic, else best; Lightning's own "last" only
    searches this run's new version_N folder and silently starts over)."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    from ..training.callbacks import SaveOnSigterm
    from ..training.checkpoint import AtomicCheckpointIO, find_last_checkpoint
    from ..training.console import quiet_worker_hint

    global _CONFIGURED
    _CONFIGURED = True  # every class is built: errors from here on are not config errors

    if _data_in_memory(cli.datamodule):
        quiet_worker_hint()  # loader workers would only copy tensors already in memory

    if cli.subcommand == "fit" and not any(
        isinstance(cb, SaveOnSigterm) for cb in cli.trainer.callbacks
    ):
        cli.trainer.callbacks.append(SaveOnSigterm())
    strategy = cli.trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        # every checkpoint is written whole or not at all (temporary file, fsync, rename)
        strategy.checkpoint_io = AtomicCheckpointIO()
    cfg = cli.config_init[cli.subcommand]
    for folder in _output_folders(cli.trainer):
        _check_writable(folder)
    if cfg.get("ckpt_path") not in (None, "last"):
        _check_resume(cli, prog, cfg["ckpt_path"])
    if cfg.get("ckpt_path") != "last":
        return
    found = find_last_checkpoint(
        cli.trainer, lambda m: _say(f"{prog} {cli.subcommand}: --ckpt_path last: {m}")
    )
    root = cli.trainer.default_root_dir
    if found is None:
        if cli.subcommand != "fit":
            cli.parser.error(
                f"--ckpt_path last: no whole checkpoint from a run under {root}; pass a "
                "checkpoint path"
            )
        _say(
            f"{prog} fit: --ckpt_path last: no whole checkpoint from an earlier run under "
            f"{root}; starting from scratch"
        )
        cfg["ckpt_path"] = None
    else:
        what = "resuming" if cli.subcommand == "fit" else "using"
        _say(f"{prog} {cli.subcommand}: {what} {found}")
        cfg["ckpt_path"] = str(found)
        _check_resume(cli, prog, found)


def _data_in_memory(datamodule) -> bool:  # noqa: ANN001
    """Whether the data module serves tensors held in memory: the prior's code grids, or images
    decoded once into memory (``cache_images`` true or "memory", or "auto" that chose memory).
    Images read from the disk cache ("disk") are not: workers overlap reading and augmenting."""
    from ..data.sparse3d import ShapeDataModule
    from ..prior.data import TokenDataModule

    if isinstance(datamodule, (TokenDataModule, ShapeDataModule)):
        return True
    in_memory = getattr(datamodule, "images_in_memory", None)
    if callable(in_memory):
        return bool(in_memory())
    return getattr(datamodule, "cache_images", False) in (True, "memory")


def _output_folders(trainer) -> list:  # noqa: ANN001
    """The folders a run writes: its root, the logger's and every explicit checkpoint dirpath
    (only rank 0 writes them; the others check nothing)."""
    from pathlib import Path

    if getattr(trainer, "global_rank", 0) != 0:
        return []
    folders = [trainer.default_root_dir]
    logger = getattr(trainer, "logger", None)
    if logger is not None and getattr(logger, "save_dir", None):
        folders.append(logger.save_dir)
    folders += [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    return list(dict.fromkeys(Path(f).expanduser() for f in folders if f and "://" not in str(f)))


def _check_resume(cli, prog: str, path) -> None:  # noqa: ANN001
    from ..training.checkpoint import CheckpointError, check_checkpoint_fits

    try:
        check_checkpoint_fits(path, cli.model)
    except CheckpointError as e:
        raise CheckpointError(f"--ckpt_path: {e}") from e


def _data_class_given(argv: Sequence[str]) -> bool:
    """Whether the command line or a ``--config`` file names the data module's class
    (``data: {class_path: ...}``, ``--data.class_path``, ``--data Class``). Without one the
    data module is ``ImageDataModule`` and ``data:`` holds its arguments directly."""
    from pathlib import Path

    import yaml

    args = list(argv)
    for i, arg in enumerate(args):
        if arg in ("--data", "--data.class_path") or arg.startswith(
            ("--data=", "--data.class_path=")
        ):
            return True
        if arg == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        try:
            cfg = yaml.safe_load(Path(path).expanduser().read_text())
        except (OSError, yaml.YAMLError):
            continue  # the parser reports an unreadable config
        data = cfg.get("data") if isinstance(cfg, dict) else None
        if isinstance(data, dict) and "class_path" in data:
            return True
    return False


def build_cli(argv: Sequence[str] | None, *, run: bool = True):  # noqa: ANN201
    """The LightningCLI over ``VQTokenizerModule`` (or a subclass) and ``ImageDataModule``
    (tests use ``run=False`` to parse and instantiate a config without training).

    ``model:`` is the module's arguments, which train a VQ-VAE; a config that gives
    ``model: {class_path: vqkit.training.VQGANModule, init_args: {...}}`` trains a VQ-GAN.
    ``data:`` is ``ImageDataModule``'s arguments, unless it names a class of its own
    (``data: {class_path: vqkit.data.ShapeDataModule, ...}`` for the sparse 3D example).
    """
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    from ..data.datamodule import ImageDataModule
    from ..training import ConsoleLog, TrainingSummary, VQTokenizerModule

    class VQKitCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
            # Always on: every fit tells the codebook's story as it goes (console, vqkit.log,
            # TensorBoard) and ends with the summary table and files.
            parser.add_lightning_class_args(ConsoleLog, "console")
            parser.add_lightning_class_args(TrainingSummary, "summary")

        def _before_run(self) -> None:
            _before_run(self)

        def _parse_ckpt_path(self) -> None:
            # Lightning reads the checkpoint's hyperparameters here, with a traceback for a
            # file that is not a checkpoint: one line instead, naming the file and why
            from ..training.checkpoint import CheckpointError, check_checkpoint_kind

            sub = self.config.get("subcommand")
            path = self.config[sub].get("ckpt_path") if sub else None
            if path and path not in ("last", "best", "hpc", "registry"):
                try:
                    check_checkpoint_kind(path)
                except CheckpointError as e:
                    raise CheckpointError(f"--ckpt_path: {e}") from e
            super()._parse_ckpt_path()

        before_fit = before_validate = before_test = before_predict = _before_run

    named = _data_class_given(sys.argv[1:] if argv is None else argv)
    return VQKitCLI(
        VQTokenizerModule,
        L.LightningDataModule if named else ImageDataModule,
        args=None if argv is None else list(argv),
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "vqkit", "default_env": False},
        parser_class=_parser_class(),
        auto_configure_optimizers=False,
        # Any VQTokenizerModule subclass by class_path; without one, the plain VQ-VAE module
        # (so `model: {model: ..., lr: ...}` configs and `--model.lr` keys keep working).
        subclass_mode_model=True,
        subclass_mode_data=named,
    )


def build_prior_cli(argv: Sequence[str], *, run: bool = True):  # noqa: ANN201
    """``vqkit prior``: the LightningCLI over ``PriorModule`` and ``TokenDataModule``; the
    tokenizer named by ``--model.tokenizer`` is also the data module's."""
    import warnings

    from lightning.pytorch.cli import LightningCLI

    from ..prior import PriorModule, TokenDataModule
    from ..prior.callbacks import PriorSummary
    from ..training import ConsoleLog

    class PriorCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
            parser.link_arguments("model.tokenizer", "data.tokenizer")
            # Always on, as for `vqkit fit`: the run's log, and the summary table and files
            parser.add_lightning_class_args(ConsoleLog, "console")
            parser.add_lightning_class_args(PriorSummary, "summary")

        def _before_run(self) -> None:
            _before_run(self, "vqkit prior")

        before_fit = before_validate = before_test = before_predict = _before_run

    with warnings.catch_warnings():
        # `vqkit prior ...` hands LightningCLI the arguments after "prior" while sys.argv holds
        # them all (a DDP launcher re-runs sys.argv, so it must stay whole).
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return PriorCLI(
            PriorModule,
            TokenDataModule,
            args=list(argv),
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "vqkit prior", "default_env": False},
            auto_configure_optimizers=False,
        )

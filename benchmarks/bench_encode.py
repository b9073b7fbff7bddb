"""Throughput of ``vqkit encode`` (``vqkit.tokens.encode_folder``): image files to token shards
on disk, against the prior's in-memory path (``vqkit.prior.data.encode_dataset``: the same
images and batches, codes kept in memory, no image scan, no files written).

    python benchmarks/bench_encode.py [--tokenizer CKPT] [--batch-sizes 64 256] [--repeat 3]
                                      [--threads N] [--max-images N] [--no-write]

The tokenizer is the quickstart's (``runs/quickstart/.../last.ckpt`` when ``vqkit fit --config
configs/quickstart.yaml`` has run, else the same model untrained: speed does not depend on the
weights). The images are the bundled Fluent Emoji 3D set (3,391 256 px WebP, resized to the
tokenizer's 32 px) when it has been fetched, else synthetic PNGs. Both sides decode every image
from its file; ``vqkit encode`` also decodes each file once before (the scan that drops
unreadable files, so that row ``i`` of the shards is line ``i`` of images.txt) and writes the
shards, images.txt and the manifest. Medians of ``--repeat`` rounds, the two sides interleaved;
"same codes" checks that both give the same codes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from benchmarks.common import machine_info, print_json, update_benchmarks_md, write_json
except ImportError:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import machine_info, print_json, update_benchmarks_md, write_json

from vqkit.data.images import ImageFolderDataset
from vqkit.models import VQModel
from vqkit.pretrained import tokenizer_digest
from vqkit.prior.data import encode_dataset
from vqkit.tokens import encode_folder, image_list, read_tokens

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_CKPT = ROOT / "runs" / "quickstart" / "tensorboard" / "version_0" / "checkpoints"


def tokenizer(path: str | None) -> tuple[VQModel, int, str]:
    """(model, image size, what it is for the table)."""
    from vqkit.training.export import load_any_tokenizer

    ckpt = Path(path) if path else QUICKSTART_CKPT / "last.ckpt"
    if ckpt.exists():
        tok = load_any_tokenizer(ckpt)
        return tok.model, tok.image_size, f"`{ckpt.relative_to(ROOT) if not path else ckpt}`"
    from vqkit.cli import build_cli

    with tempfile.TemporaryDirectory() as tmp:
        cli = build_cli(
            ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--data.root", tmp],
            run=False,
        )
    return cli.model.model.eval(), 32, "the quickstart model, untrained"


def images(max_images: int | None, tmp: Path) -> tuple[Path, str]:
    from vqkit.data.bundled import fetch

    try:
        folder = fetch("fluent-emoji-3d")
        what = "the bundled Fluent Emoji 3D set (256 px WebP)"
    except (OSError, RuntimeError, ValueError) as e:
        from vqkit.data.synthetic import make_image_folder

        print(f"bundled set unavailable ({e}); synthetic images instead", file=sys.stderr)
        folder = make_image_folder(tmp / "synthetic", n=max_images or 2048, size=64)
        what = "synthetic 64 px PNGs"
    return folder, what


def run(
    model: VQModel, folder: Path, size: int, batch: int, repeat: int, limit: int | None
) -> dict:
    sha = tokenizer_digest(model)
    paths, _ = image_list(folder, scan=False, max_images=limit)
    n = len(paths)
    reference = ImageFolderDataset(paths, size, validate=False)
    times: dict[str, list[float]] = {"encode": [], "scan": [], "shards": [], "memory": []}
    same = True
    rerun = []
    for r in range(repeat):
        order = ("encode", "memory") if r % 2 == 0 else ("memory", "encode")
        for side in order:
            if side == "memory":
                t0 = time.perf_counter()
                codes = encode_dataset(model, reference, batch_size=batch, device="cpu")
                times["memory"].append(time.perf_counter() - t0)
                continue
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "tokens"
                t0 = time.perf_counter()
                result = encode_folder(
                    model, folder, out, image_size=size, batch_size=batch, max_images=limit,
                    device="cpu", sha256=sha,
                )  # fmt: skip
                times["encode"].append(time.perf_counter() - t0)
                times["shards"].append(result.seconds)
                times["scan"].append(times["encode"][-1] - result.seconds)
                written = read_tokens(out).codes
                t0 = time.perf_counter()  # a rerun: every shard is there
                again = encode_folder(
                    model, folder, out, image_size=size, batch_size=batch, max_images=limit,
                    device="cpu", sha256=sha,
                )  # fmt: skip
                rerun.append(time.perf_counter() - t0)
                assert again.shards_encoded == 0
        same = same and torch.equal(written, codes)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch_size": batch,
        "images": n,
        "encode_s": med["encode"],
        "scan_s": med["scan"],
        "encode_write_s": med["shards"],
        "encode_images_per_s": n / med["encode"],
        "memory_s": med["memory"],
        "memory_images_per_s": n / med["memory"],
        "ratio": med["encode"] / med["memory"],
        "rerun_s": statistics.median(rerun),
        "same_codes": same,
    }


def markdown(rows: list[dict], info: dict, model_what: str, data_what: str, repeat: int) -> str:
    lines = [
        f"`vqkit encode` (`vqkit.tokens.encode_folder`) with {model_what} (32 px -> 8x8 codes of "
        f"1,024) over {data_what}, CPU, {info['torch_threads']} thread(s), torch "
        f"{info['torch']}, 1 process, no loader workers; median of {repeat} rounds. "
        "In memory is `vqkit.prior.data.encode_dataset` over the same files and batches (what "
        "`vqkit prior fit` did before reading shards): no scan, no files. `vqkit encode` first "
        "decodes every file once (the scan that drops unreadable ones, so shard rows match "
        "images.txt; skipped for the sha256-checked bundled set when encoding a tokenizer's "
        "own split), then encodes and writes the shards. A rerun finds every shard whole and "
        "encodes nothing. `python benchmarks/bench_encode.py`.",
        "",
        "| batch | images | `vqkit encode` images/s | scan + setup (s) | encode + write (s) "
        "| in memory images/s | time ratio | rerun (s) | same codes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['images']} | {r['encode_images_per_s']:.0f} | "
            f"{r['scan_s']:.2f} | {r['encode_write_s']:.2f} | {r['memory_images_per_s']:.0f} | "
            f"{r['ratio']:.2f}x | {r['rerun_s']:.2f} | {r['same_codes']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default=None, help="default: the quickstart's last.ckpt")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-images", type=int, default=None, help="only the first N images")
    p.add_argument("--json-out", default=None)
    p.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, size, model_what = tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        folder, data_what = images(args.max_images, Path(tmp))
        rows = [run(model, folder, size, b, args.repeat, args.max_images) for b in args.batch_sizes]
    info = machine_info()
    result = {"benchmark": "encode", "machine": info, "data": data_what, "rows": rows}
    print_json(result)
    md = markdown(rows, info, model_what, data_what, args.repeat)
    print(md)
    if args.json_out:
        write_json(result, args.json_out)
    if not args.no_write:
        update_benchmarks_md("encode", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

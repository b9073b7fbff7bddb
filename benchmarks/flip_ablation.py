"""Horizontal flips on the avatar set at a large codebook: what they cost the validation figures.

    python benchmarks/flip_ablation.py                 # K=16,384, 300 steps, 2,000 val avatars
    python benchmarks/flip_ablation.py --rows default peer --val-images 2000

DiceBear draws every avatar with one handedness (hair parting, a face turned one way), so a
horizontally flipped avatar is an image the validation split never shows. A codebook of 16,384
codes learns both hands and spends codes on the flipped one. This script trains the study's rows
(``benchmarks/utilization``: the quickstart model, the same batches and schedule) twice, with
flips of probability 0.5 (the data module's default) and 0, and counts each codebook's codes on

- the clean validation avatars (what the study reports), and
- as many tokens of augmented training avatars (the distribution the codebook was fitted to),

so a gap between the two is the shift that the flips make. Results go to
``benchmarks/results/large_k_flip.json``; ``docs/large_k_study.md`` quotes them ("Why no flips")
when the study's page is next written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

try:
    from benchmarks.common import REPO_ROOT, machine_info, print_json, write_json
except ImportError:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import REPO_ROOT, machine_info, print_json, write_json

from benchmarks.utilization import runner
from benchmarks.utilization.rows import load_quickstart, schedule_scale

JSON_REL = Path("benchmarks/results/large_k_flip.json")


def training_usage(model: torch.nn.Module, data: runner.Data, n_images: int, k: int) -> float:
    """Share of the codes hit by ``n_images`` augmented training images (seeded draws),
    counted by the study's own ``evaluate``."""
    g = torch.Generator().manual_seed(1)
    pick = torch.randperm(len(data.train), generator=g)[:n_images]
    images = torch.stack([data.train[int(j)] for j in pick])
    return runner.evaluate(model, images, k, full=False)["utilization"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", nargs="+", default=["default"])
    p.add_argument("--codebook-size", type=int, default=16384)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--train-images", type=int, default=60_000)
    p.add_argument("--val-images", type=int, default=2_000)
    p.add_argument("--flips", nargs="+", type=float, default=[0.5, 0.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO_ROOT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    quickstart = load_quickstart()
    data = runner.load_data(
        quickstart,
        max_images=None,
        val_images=args.val_images,
        data="avatars",
        train_images=args.train_images,
    )
    scale = schedule_scale(args.steps, quickstart["schedule_reach"])
    n_val = int(data.val.shape[0])
    runs = []
    for flip in args.flips:
        data.train.flip_p = flip
        for row in args.rows:
            t0 = time.perf_counter()
            r = runner.run_one(
                row,
                args.codebook_size,
                args.seed,
                args.steps,
                data,
                quickstart,
                args.steps,
                scale,
                extra_eval=lambda m: {
                    "train_utilization": training_usage(m, data, n_val, args.codebook_size)
                },
            )
            runs.append(
                {
                    "row": row,
                    "flip_p": flip,
                    "utilization": r["utilization"],
                    "train_utilization": r["train_utilization"],
                    "normalized_entropy": r["normalized_entropy"],
                    "psnr": r["psnr"],
                    "train_seconds": r["train_seconds"],
                }
            )
            print(
                f"flip {flip:g} {row}: val {r['utilization']:.3f} / augmented training "
                f"{r['train_utilization']:.3f}, PSNR {r['psnr']:.2f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    result = {
        "benchmark": "large_k_flip",
        "command": "python benchmarks/flip_ablation.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "settings": {
            "codebook_size": args.codebook_size,
            "steps": args.steps,
            "seed": args.seed,
            "threads": args.threads,
            "train_images": len(data.train),
            "val_images": int(data.val.shape[0]),
            "val_tokens": int(data.val.shape[0])
            * (data.val.shape[-1] // 2 ** (len(quickstart["model"]["channel_mult"]) - 1)) ** 2,
        },
        "runs": runs,
    }
    print_json(result)
    print("| row | flips | codes used: validation | codes used: augmented training | PSNR |")
    print("|---|---:|---:|---:|---:|")
    for r in runs:
        print(
            f"| {r['row']} | {r['flip_p']:g} | {100 * r['utilization']:.1f}% | "
            f"{100 * r['train_utilization']:.1f}% | {r['psnr']:.2f} |"
        )
    (args.out / JSON_REL).parent.mkdir(parents=True, exist_ok=True)
    write_json(result, args.out / JSON_REL)
    return result


if __name__ == "__main__":
    main()

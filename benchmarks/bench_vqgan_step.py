"""Training-step time of VQ-GAN against VQ-VAE on the quickstart model (32 px, batch 32).

    python benchmarks/bench_vqgan_step.py [--steps 12] [--rounds 3] [--threads 1 2] [--no-write]

Both modules are built from their configs (``configs/quickstart.yaml`` and
``configs/vqgan_quickstart.yaml``, codebook maintenance removed so only the adversarial cost
differs) and trained by a real Lightning ``Trainer`` on random 32 px images: a step is one
batch as ``vqkit fit`` runs it (forward, losses, backward(s), clipping, optimizer step(s),
logging). Variants run round-robin, one short fit each per round, so a neighbour's load spreads
over all of them; the table gives the median step over all rounds (the first 2 steps of each
fit are dropped).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

try:
    from benchmarks.common import machine_info, print_json, update_benchmarks_md
except ImportError:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import machine_info, print_json, update_benchmarks_md

from vqkit.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
# name -> (config, extra CLI overrides, what it measures)
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "vqvae": ("quickstart.yaml", [], "VQTokenizerModule, automatic optimization"),
    "vqgan-before-disc_start": (
        "vqgan_quickstart.yaml",
        ["--model.adversarial.init_args.disc_start=1000000"],
        "VQGANModule before disc_start: manual optimization, no discriminator",
    ),
    "vqgan": (
        "vqgan_quickstart.yaml",
        [
            "--model.adversarial.init_args.disc_start=0",
            "--model.adversarial.init_args.adaptive_weight=false",
        ],
        "VQGANModule, adversarial phase (fixed lambda_gan)",
    ),
    "vqgan-d64": (
        "vqgan_quickstart.yaml",
        [
            "--model.adversarial.init_args.disc_start=0",
            "--model.adversarial.init_args.discriminator.init_args.base_channels=64",
            "--model.adversarial.init_args.adaptive_weight=false",
        ],
        "adversarial phase with taming's discriminator width (64 base channels)",
    ),
    "vqgan+adaptive": (
        "vqgan_quickstart.yaml",
        [
            "--model.adversarial.init_args.disc_start=0",
            "--model.adversarial.init_args.adaptive_weight=true",
        ],
        "+ taming's adaptive weight (two autograd.grad at the last layer; as the config)",
    ),
    "vqgan+lecam+r1": (
        "vqgan_quickstart.yaml",
        [
            "--model.adversarial.init_args.disc_start=0",
            "--model.adversarial.init_args.lecam_weight=0.001",
            "--model.adversarial.init_args.r1_weight=1.0",
            "--model.adversarial.init_args.r1_every=4",
            "--model.adversarial.init_args.adaptive_weight=false",
        ],
        "+ LeCAM and lazy R1 every 4 discriminator steps",
    ),
}


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, *args) -> None:  # noqa: ANN002
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:  # noqa: ANN002
        self.seconds.append(time.perf_counter() - self._t0)


def fit_once(name: str, steps: int, data: torch.Tensor, batch: int) -> list[float]:
    config, extra, _ = VARIANTS[name]
    torch.manual_seed(0)
    cli = build_cli(
        ["--config", str(ROOT / "configs" / config), "--data.root", str(ROOT), *extra], run=False
    )
    module = cli.model
    module.model.quantizer.maintenance = torch.nn.ModuleList()
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=None if module.automatic_optimization is False else 1.0,
        callbacks=[timer],
    )
    loader = DataLoader(TensorDataset(data), batch_size=batch, shuffle=True, drop_last=True)
    trainer.fit(module, loader)
    return timer.seconds[2:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=12, help="steps per fit (the first 2 untimed)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.steps < 3:
        raise SystemExit(f"--steps must be >= 3 (the first 2 are not timed), got {args.steps}")
    g = torch.Generator().manual_seed(0)
    data = torch.rand(args.batch * 8, 3, 32, 32, generator=g) * 2 - 1
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {v: [] for v in args.variants}
        for _ in range(args.rounds):
            for v in args.variants:
                times[v] += fit_once(v, args.steps, data, args.batch)
        base = statistics.median(times["vqvae"]) if "vqvae" in times else None
        for v in args.variants:
            med = statistics.median(times[v])
            rows.append(
                {
                    "variant": v,
                    "threads": threads,
                    "what": VARIANTS[v][2],
                    "steps_timed": len(times[v]),
                    "median_step_ms": 1000 * med,
                    "images_per_second": args.batch / med,
                    "vs_vqvae": med / base if base else None,
                }
            )
    print_json(
        {
            "benchmark": "vqgan_step",
            "machine": machine_info(),
            "batch": args.batch,
            "image_size": 32,
            "rounds": args.rounds,
            "steps_per_fit": args.steps,
            "results": rows,
        }
    )
    lines = [
        f"Training-step time of the quickstart model (32 px, batch {args.batch}, CPU, "
        "codebook maintenance off) under a Lightning "
        f"`Trainer`, {args.rounds} round-robin rounds of {args.steps}-step fits, median step. "
        "VQ-GAN: `configs/vqgan_quickstart.yaml`'s PatchGAN (32 base channels, 2 strided "
        "layers, batch norm, hinge). The 2 cores were shared with other jobs: compare rows, "
        "not runs. `python benchmarks/bench_vqgan_step.py`.",
        "",
        "| variant | threads | what | median step (ms) | images/s | x VQ-VAE |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['vs_vqvae']:.2f}" if r["vs_vqvae"] else "-"
        lines.append(
            f"| {r['variant']} | {r['threads']} | {r['what']} | {r['median_step_ms']:.0f} | "
            f"{r['images_per_second']:.0f} | {ratio} |"
        )
    if not args.no_write:
        update_benchmarks_md("vqgan_step", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

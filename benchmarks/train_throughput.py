"""Training throughput of the quickstart configuration, with and without codebook maintenance.

    python benchmarks/train_throughput.py [--steps 400] [--synthetic]

Builds the model exactly as ``configs/quickstart.yaml`` does, then times full training steps
(forward, loss, backward, clipping, AdamW) on the bundled set's cached 32 px images: once with
the config's maintenance (k-means init, dead-mode re-estimation, dead-code restart) and once
with none, over the same steps, so the amortized cost of keeping the codebook alive (including
the k-means runs that fall inside the window) is a measured share of training time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from benchmarks.common import machine_info, print_json, update_benchmarks_md
except ImportError:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import machine_info, print_json, update_benchmarks_md

from vqkit.cli import build_cli

NOTE = (
    "Read with care: the maintenance run skips quantization during its 100 warm-up steps (VQFR'"
    "s pass-through) and the cores were shared, so a negative cost means the maintenance cost i"
    "s below what this run can resolve, not that maintenance speeds training up."
)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def images(n: int, synthetic: bool) -> torch.Tensor:
    if synthetic:
        return torch.rand(n, 3, 32, 32) * 2 - 1
    from vqkit.data import ImageFolderDataset, fetch

    ds = ImageFolderDataset(fetch("fluent-emoji-3d"), 32, cache=True, validate=False)
    return torch.stack([ds[i] for i in range(min(n, len(ds)))])


def run(steps: int, maintenance: bool, data: torch.Tensor, batch: int) -> dict:
    torch.manual_seed(0)
    cli = build_cli(["--config", str(CONFIG), "--data.root", str(Path.cwd())], run=False)
    module = cli.model
    q = module.model.quantizer
    if not maintenance:
        q.maintenance = torch.nn.ModuleList()
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=2e-4, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(0)
    seconds = []
    for _ in range(steps):
        x = data[torch.randint(len(data), (batch,), generator=g)]
        t0 = time.perf_counter()
        out = module.model(x)
        loss, _ = module.loss(x, out.reconstructions, out.vq_losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        seconds.append(time.perf_counter() - t0)
    skip = min(5, steps // 10)  # first steps pay one-off allocation costs in both variants
    total = sum(seconds[skip:])
    with torch.no_grad():
        module.eval()
        q.usage.reset_eval()
        for i in range(0, min(len(data), 1024), 256):
            module.model(data[i : i + 256])
        util = q.usage.stats("eval").utilization
        l1 = F.l1_loss(module.model(data[:256]).reconstructions, data[:256]).item()
    return {
        "maintenance": maintenance,
        "steps_timed": steps - skip,
        "seconds": total,
        "images_per_second": (steps - skip) * batch / total,
        "replacements": int(q.num_replacements),
        "utilization_after": util,
        "l1_after": l1,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--synthetic", action="store_true", help="random images instead of the set")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    data = images(4096, args.synthetic)
    rows = [run(args.steps, m, data, args.batch) for m in (False, True)]
    share = 1 - rows[1]["images_per_second"] / rows[0]["images_per_second"]
    print_json(
        {
            "benchmark": "train_throughput",
            "machine": machine_info(),
            "rows": rows,
            "maintenance_share": share,
        }
    )
    md = [
        f"Quickstart model (`configs/quickstart.yaml`, 32 px, batch {args.batch}, codebook 1024), "
        f"{args.steps} training steps from scratch (fwd + bwd + clip + AdamW), fp32 CPU, "
        f"{torch.get_num_threads()} threads. The maintenance run includes k-means init at step "
        "100 and dead-mode re-estimation at steps 200 and 400 when inside the window.",
        "",
        "| maintenance | images/s | replacements | eval utilization after | L1 after |",
        "|---|---:|---:|---:|---:|",
    ]
    md += [
        f"| {'config (init + re-estimate + restart)' if r['maintenance'] else 'none'} | "
        f"{r['images_per_second']:.1f} | {r['replacements']} | {r['utilization_after']:.3f} | "
        f"{r['l1_after']:.4f} |"
        for r in rows
    ]
    md += [
        "",
        f"Cost of maintenance: {100 * share:.1f}% of training throughput. " + NOTE,
    ]
    table = "\n".join(md)
    print(table)
    if not args.no_write:
        update_benchmarks_md("train_throughput", table)


if __name__ == "__main__":
    main()

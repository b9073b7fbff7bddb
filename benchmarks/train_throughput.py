"""Training throughput of the quickstart configuration, with and without codebook maintenance.

    python benchmarks/train_throughput.py [--steps 400] [--synthetic]

Builds the model exactly as ``configs/quickstart.yaml`` does, then times full training steps
(forward, loss, backward, clipping, AdamW) on the bundled set's cached 32 px images: once with
the config's maintenance (k-means init, k-means re-estimation, dead-code restart) and once
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

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def images(n: int, synthetic: bool) -> torch.Tensor:
    if synthetic:
        return torch.rand(n, 3, 32, 32) * 2 - 1
    from vqkit.data import ImageFolderDataset, fetch

    ds = ImageFolderDataset(fetch("fluent-emoji-3d"), 32, cache=True, validate=False)
    return torch.stack([ds[i] for i in range(min(n, len(ds)))])


def _time_hooks(q: torch.nn.Module, clock: dict[str, float]) -> None:
    """Wrap every maintenance strategy's hooks so the time spent in them is added to ``clock``
    (keyed by strategy). The quantizer's other work (assignment, EMA, losses) is not counted."""
    for m in q.maintenance:
        name = type(m).__name__
        clock.setdefault(name, 0.0)
        for hook in ("before_quantize", "after_assign"):
            fn = getattr(m, hook)

            def timed(*a, _fn=fn, _name=name, **k):  # noqa: ANN002, ANN003, ANN202
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    clock[_name] += time.perf_counter() - t0

            object.__setattr__(m, hook, timed)


def run(steps: int, maintenance: bool, data: torch.Tensor, batch: int) -> dict:
    torch.manual_seed(0)
    cli = build_cli(["--config", str(CONFIG), "--data.root", str(Path.cwd())], run=False)
    module = cli.model
    q = module.model.quantizer
    warmup = max((getattr(m, "warmup_steps", 0) for m in q.maintenance), default=0)
    if not maintenance:
        q.maintenance = torch.nn.ModuleList()
    clock: dict[str, float] = {}
    _time_hooks(q, clock)
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=2e-4, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(0)
    seconds, hook_seconds = [], []
    for _ in range(steps):
        x = data[torch.randint(len(data), (batch,), generator=g)]
        before = sum(clock.values())
        t0 = time.perf_counter()
        out = module.model(x)
        loss, _ = module.loss(x, out.reconstructions, out.vq_losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        seconds.append(time.perf_counter() - t0)
        hook_seconds.append(sum(clock.values()) - before)
    # Steps before the warm-up ends skip quantization in the maintenance run (VQFR's
    # pass-through), so both runs are timed from the end of the warm-up on.
    skip = max(warmup, min(5, steps // 10))
    if steps <= skip:
        raise SystemExit(f"--steps must exceed the warm-up ({warmup} steps), got {steps}")
    total = sum(seconds[skip:])
    hooks = sum(hook_seconds[skip:])
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
        "first_timed_step": skip,
        "seconds": total,
        "images_per_second": (steps - skip) * batch / total,
        "maintenance_seconds": hooks,
        "maintenance_share_of_step_time": hooks / total,
        "per_strategy_seconds_whole_run": {k: round(v, 3) for k, v in clock.items()},
        "replacements": int(q.num_replacements),
        "utilization_after": util,
        "l1_after": l1,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=1500, help="default: the quickstart's max_steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--synthetic", action="store_true", help="random images instead of the set")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
    m = rows[1]
    md = [
        f"Quickstart model (`configs/quickstart.yaml`, 32 px, batch {args.batch}, codebook 1024), "
        f"{args.steps} training steps from scratch (fwd + bwd + clip + AdamW), fp32 CPU, "
        f"{torch.get_num_threads()} threads. With the config's maintenance the run holds the "
        "k-means init at the end of the warm-up, every k-means re-estimation of the schedule "
        "and the per-step reservoir and restart checks. Both runs are timed from the end of the "
        f"warm-up (step {m['first_timed_step']}): before it the maintenance run passes the "
        "encoder output through unquantized, which is cheaper than quantizing.",
        "",
        "| maintenance | images/s | time in maintenance hooks | replacements "
        "| eval utilization after | L1 after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    md += [
        f"| {'config (init + re-estimate + restart)' if r['maintenance'] else 'none'} | "
        f"{r['images_per_second']:.1f} | {100 * r['maintenance_share_of_step_time']:.2f}% | "
        f"{r['replacements']} | {r['utilization_after']:.3f} | {r['l1_after']:.4f} |"
        for r in rows
    ]
    per = ", ".join(f"{k} {v:.2f} s" for k, v in m["per_strategy_seconds_whole_run"].items())
    md += [
        "",
        f"**Maintenance cost: {100 * m['maintenance_share_of_step_time']:.2f}% of training "
        f"step time**, measured inside the run (time in the strategies' hooks / step time; per "
        f"strategy over the whole run: {per}). The throughput ratio of the two runs, "
        f"{100 * share:.1f}%, also reflects that the two codebooks end in different states "
        "(a collapsed codebook is cheaper to train against) and the cores were shared.",
    ]
    table = "\n".join(md)
    print(table)
    if not args.no_write:
        update_benchmarks_md("train_throughput", table)


if __name__ == "__main__":
    main()

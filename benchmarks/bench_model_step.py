"""Training-step throughput of small VQModels on CPU: images/s of forward + backward + AdamW.

Variants of the same model side by side: eager fp32 (contiguous), channels_last, no GroupNorm,
torch.compile of the encoder and decoder (the quantizer stays eager: it syncs for its
statistics), and one thread instead of two. Variants are timed round-robin, one chunk of steps
each per round, so a neighbour's load spreads over all of them instead of skewing one; the
table reports the median round.

    python -m benchmarks.bench_model_step [--configs q32 q64f4 q64f8] [--batch 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vqkit import VectorQuantizer
from vqkit.models import ResNetVQModel

# name -> (resolution, ResNetVQModel kwargs). q32 is the recommended quickstart model.
CONFIGS: dict[str, tuple[int, dict]] = {
    "q32": (32, {"base_channels": 32, "channel_mult": (1, 2, 2), "num_res_blocks": 1}),
    "q64f4": (64, {"base_channels": 32, "channel_mult": (1, 2, 2), "num_res_blocks": 1}),
    "q64f8": (64, {"base_channels": 32, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 1}),
}
# name -> (norm_type, channels_last, compile, threads)
VARIANTS: dict[str, tuple[str, bool, bool, int]] = {
    "eager": ("group", False, False, 2),
    "eager-1thread": ("group", False, False, 1),
    "channels_last": ("group", True, False, 2),
    "channels_last-1thread": ("group", True, False, 1),
    "norm=none": ("none", False, False, 2),
    "norm=none+channels_last": ("none", True, False, 2),
    "compiled+channels_last": ("group", True, True, 2),
    "compiled+channels_last-1thread": ("group", True, True, 1),
    "compiled+norm=none+channels_last": ("none", True, True, 2),
}
# The 64px models are 4x the work per image: fewer steps per chunk and only the variants that
# decide the recommendation, so the whole script stays near 10 minutes on 2 busy cores.
STEPS = {"q32": 5, "q64f4": 2, "q64f8": 2}
DEFAULT_VARIANTS = {
    "q32": list(VARIANTS),
    "q64f4": [
        "eager",
        "channels_last",
        "channels_last-1thread",
        "norm=none+channels_last",
        "compiled+channels_last",
    ],
    "q64f8": [
        "eager",
        "channels_last",
        "channels_last-1thread",
        "norm=none+channels_last",
        "compiled+channels_last",
    ],
}


def build(config: str, norm_type: str, codebook_size: int, dim: int) -> tuple[ResNetVQModel, int]:
    resolution, kwargs = CONFIGS[config]
    torch.manual_seed(0)
    vq = VectorQuantizer(dim, codebook_size, channel_first=True)
    model = ResNetVQModel(vq, resolution=resolution, z_channels=dim, norm_type=norm_type, **kwargs)
    return model, resolution


def make_step(model: ResNetVQModel, images: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(images)
        (F.mse_loss(out.reconstructions, images) + out.vq_loss).backward()
        opt.step()

    return step


def run_config(config: str, args: argparse.Namespace) -> list[dict]:
    variants = {}
    steps = args.steps or STEPS[config]
    for name in args.variants or DEFAULT_VARIANTS[config]:
        norm_type, channels_last, compiled, threads = VARIANTS[name]
        model, res = build(config, norm_type, args.codebook_size, args.dim)
        images = torch.rand(args.batch, 3, res, res) * 2 - 1
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        if compiled:
            model.encoder.compile()
            model.decoder.compile()
        torch.set_num_threads(threads)
        step = make_step(model, images)
        t0 = time.perf_counter()
        step()  # compiles, for the compiled variants
        first = time.perf_counter() - t0
        step()
        t0 = time.perf_counter()
        step()
        steady = time.perf_counter() - t0
        n_params = sum(p.numel() for p in model.parameters())
        variants[name] = {
            "step": step,
            "threads": threads,
            "params": n_params,
            "res": res,
            "compile_s": round(first - steady, 1) if compiled else None,
            "ips": [],
        }
    for _ in range(args.rounds):
        for v in variants.values():
            torch.set_num_threads(v["threads"])
            t0 = time.perf_counter()
            for _ in range(steps):
                v["step"]()
            v["ips"].append(args.batch * steps / (time.perf_counter() - t0))
    torch.set_num_threads(args.threads)
    rows = []
    for name, v in variants.items():
        res = v["res"]
        f = 2 ** (len(CONFIGS[config][1]["channel_mult"]) - 1)
        rows.append(
            {
                "config": config,
                "variant": name,
                "params": v["params"],
                "resolution": res,
                "tokens": f"{res // f}x{res // f}",
                "batch": args.batch,
                "steps_per_round": steps,
                "threads": v["threads"],
                "images_per_s": round(statistics.median(v["ips"]), 1),
                "min": round(min(v["ips"]), 1),
                "max": round(max(v["ips"]), 1),
                "compile_s": v["compile_s"],
            }
        )
        # Progress on stderr: a long run that gets killed still leaves its numbers.
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def to_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    steps = "/".join(str(n) for n in sorted({r["steps_per_round"] for r in rows}))
    lines = [
        f"Train step (fwd + bwd + AdamW), fp32 on CPU ({platform.processor() or 'cpu'}, "
        f"torch {torch.__version__}), batch {args.batch}, codebook {args.codebook_size} x "
        f"{args.dim}; median of {args.rounds} rounds of {steps} steps, range in brackets. "
        "Other processes shared the cores: compare variants within a config, not across runs.",
        "",
        "| config | params | image -> tokens | variant | images/s | compile s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        compile_s = "" if r["compile_s"] is None else f"{r['compile_s']:.0f}"
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:.2f}M | {r['resolution']}px -> {r['tokens']} "
            f"| {r['variant']} | {r['images_per_s']:.1f} ({r['min']:.0f}-{r['max']:.0f}) "
            f"| {compile_s} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: per config")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, help="steps per round; default: per config")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--codebook-size", type=int, default=1024)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    rows = [r for c in args.configs for r in run_config(c, args)]
    md = to_markdown(rows, args)
    try:
        from benchmarks.common import machine_info, print_json, update_benchmarks_md
    except ImportError:  # run outside the repo root, or before the shared helpers exist
        print(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    else:
        print_json({"machine": machine_info(), "args": vars(args), "rows": rows})
        update_benchmarks_md("model_step", md)
    print(md)


if __name__ == "__main__":
    main()

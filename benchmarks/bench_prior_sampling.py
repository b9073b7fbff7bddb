"""Sampling speed of the code-grid prior: vqkit's key/value-cached ``CodeTransformer.generate``
against recomputing the whole prefix at every step, which is what nanoGPT's / minGPT's
``generate`` (and taming-transformers' ``sample``) do.

    python benchmarks/bench_prior_sampling.py [--threads 2] [--repeat 3] [--device cpu]
                                              [--configs quickstart seed004] [--no-write]

Both sides are the same module with the same weights and draw the same codes from the same
seed (checked), so the only difference is the work per step: one new position through every
layer against the whole sequence so far. Configs:

- ``quickstart``: ``configs/prior/quickstart.yaml``'s model (4 layers, width 128) over 8x8 grids
  of 1,024 codes, 16 grids;
- ``seed004``: seed 004's prior size (8 layers, width 512) over 16x16 grids of 1,024 codes,
  4 grids.

Codes/s counts generated positions over all grids; medians of ``--repeat`` rounds, the two
sides interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from benchmarks.common import machine_info, print_json, update_benchmarks_md, write_json
except ImportError:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import machine_info, print_json, update_benchmarks_md, write_json

from vqkit.prior import CodeTransformer

CONFIGS = {
    "quickstart": {"grid": (8, 8), "n_layer": 4, "n_head": 4, "n_embd": 128, "num": 16},
    "seed004": {"grid": (16, 16), "n_layer": 8, "n_head": 8, "n_embd": 512, "num": 4},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(name: str, device: torch.device, repeat: int) -> dict:
    c = CONFIGS[name]
    torch.manual_seed(0)
    model = CodeTransformer(
        1024, c["grid"], n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"]
    )
    model = model.to(device).eval()

    def sample(use_cache: bool) -> tuple[torch.Tensor, float]:
        g = torch.Generator(device=device).manual_seed(0)
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(c["num"], generator=g, use_cache=use_cache)
        _sync(device)
        return out, time.perf_counter() - t0

    sample(True)  # warm-up (allocator, kernels)
    times = {True: [], False: []}
    same = True
    for r in range(repeat):
        order = (True, False) if r % 2 == 0 else (False, True)
        outs = {}
        for use_cache in order:
            outs[use_cache], t = sample(use_cache)
            times[use_cache].append(t)
        same = same and torch.equal(outs[True], outs[False])
    codes = c["num"] * c["grid"][0] * c["grid"][1]
    cached, full = statistics.median(times[True]), statistics.median(times[False])
    return {
        "config": name,
        "grid": list(c["grid"]),
        "layers": c["n_layer"],
        "width": c["n_embd"],
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "grids": c["num"],
        "cached_s": cached,
        "recompute_s": full,
        "cached_codes_per_s": codes / cached,
        "recompute_codes_per_s": codes / full,
        "speedup": full / cached,
        "same_codes": same,
    }


def markdown(rows: list[dict], info: dict, device: str, repeat: int) -> str:
    lines = [
        f"Sampling code grids from a `CodeTransformer` (K = 1,024 codes) on {device}, "
        f"{info['torch_threads']} thread(s), torch {info['torch']}; median of {repeat} "
        "interleaved rounds. Recompute is what nanoGPT's / minGPT's `generate` and "
        "taming-transformers' `sample` do (taming's `sample_with_past` keeps a cache too): the "
        "whole prefix through the network at every step. "
        "Both sides draw the same codes from the same seed. "
        "`python benchmarks/bench_prior_sampling.py`.",
        "",
        "| config | grid | layers x width | params (M) | grids | cached (s) | recompute (s) "
        "| cached codes/s | speed-up | same codes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['grid'][0]}x{r['grid'][1]} | {r['layers']} x {r['width']} | "
            f"{r['params_m']:.2f} | {r['grids']} | {r['cached_s']:.2f} | {r['recompute_s']:.2f} "
            f"| {r['cached_codes_per_s']:.0f} | {r['speedup']:.2f}x | {r['same_codes']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--json-out", default=None)
    p.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [run(name, device, args.repeat) for name in args.configs]
    info = machine_info()
    result = {"benchmark": "prior_sampling", "machine": info, "rows": rows}
    print_json(result)
    md = markdown(rows, info, args.device, args.repeat)
    print(md)
    if args.json_out:
        write_json(result, args.json_out)
    if not args.no_write:
        update_benchmarks_md("prior_sampling", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

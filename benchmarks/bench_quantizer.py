"""Quantizer forward + backward: vqkit (gradient and EMA modes) against vector-quantize-pytorch
and against the floor (one x @ C^T matmul plus argmin), side by side in one run.

    python benchmarks/bench_quantizer.py [--tokens 2048 32768] [--codes 1024 16384] [--dim 256]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

try:
    from benchmarks.common import machine_info, print_json, timeit, update_benchmarks_md
except ImportError:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import machine_info, print_json, timeit, update_benchmarks_md
from vqkit import EMAUpdate, VectorQuantizer


def floor_fn(x: torch.Tensor, c: torch.Tensor):
    csq = c.pow(2).sum(1)
    return lambda: torch.addmm(csq, x, c.t(), alpha=-2.0).argmin(1)


def vqkit_fn(x: torch.Tensor, k: int, ema: bool):
    torch.manual_seed(0)
    vq = VectorQuantizer(x.shape[1], k, ema=EMAUpdate(decay=0.99) if ema else None).train()
    xg = x.clone().requires_grad_(True)

    def step():
        out = vq(xg)
        (out.quantized.sum() + out.loss).backward()
        xg.grad = None
        if not ema:
            vq.codebook.grad = None

    return step


def peer_fn(x: torch.Tensor, k: int):
    from vector_quantize_pytorch import VectorQuantize

    torch.manual_seed(0)
    vq = VectorQuantize(dim=x.shape[1], codebook_size=k, decay=0.99, commitment_weight=0.25)
    vq.train()
    xg = x.clone()[None].requires_grad_(True)

    def step():
        q, _, loss = vq(xg)
        (q.sum() + loss.sum()).backward()
        xg.grad = None

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 32768])
    p.add_argument("--codes", type=int, nargs="+", default=[1024, 16384])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 when other jobs share cores)"
    )
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for m in args.tokens:
        for k in args.codes:
            x = torch.randn(m, args.dim)
            c = torch.randn(k, args.dim)
            impls = {
                "floor (matmul + argmin)": floor_fn(x, c),
                "vqkit gradient": vqkit_fn(x, k, ema=False),
                "vqkit EMA": vqkit_fn(x, k, ema=True),
            }
            if not args.no_peer and importlib.util.find_spec("vector_quantize_pytorch"):
                impls["vector-quantize-pytorch EMA"] = peer_fn(x, k)
            times = {name: timeit(fn, repeat=args.repeat) for name, fn in impls.items()}
            base = times["floor (matmul + argmin)"]
            for name, t in times.items():
                rows.append(
                    {
                        "tokens": m,
                        "codes": k,
                        "dim": args.dim,
                        "impl": name,
                        "seconds": t,
                        "x_floor": t / base,
                    }
                )
    result = {
        "benchmark": "quantizer_forward_backward",
        "machine": machine_info(),
        "rows": rows,
    }
    print_json(result)
    md = [
        f"Forward + backward of one batch, D={args.dim}, fp32, CPU ({torch.get_num_threads()} "
        f"threads, torch {torch.__version__}); median of {args.repeat}. `x floor` divides by one "
        "`addmm` + `argmin` over the same tokens and codes.",
        "",
        "| tokens M | codes K | implementation | seconds | x floor |",
        "|---:|---:|---|---:|---:|",
    ]
    md += [
        f"| {r['tokens']:,} | {r['codes']:,} | {r['impl']} | {r['seconds']:.4f} | "
        f"{r['x_floor']:.2f} |"
        for r in rows
    ]
    table = "\n".join(md)
    print(table)
    if not args.no_write:
        update_benchmarks_md("quantizer", table)


if __name__ == "__main__":
    main()

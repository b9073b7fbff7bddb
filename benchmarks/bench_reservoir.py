"""Reservoir ``add``: vqkit's vectorized Algorithm R against a per-sample Python loop like VQFR's,
and as a share of a quantizer step (one fp32 nearest-code search of the same batch, K=1024).

    python benchmarks/bench_reservoir.py [--batches 2048 32768] [--dim 256] [--size 16384]

Two stream positions: right after the fill (``seen == size``: most of the batch is accepted and
written) and steady state (``seen`` = 1M: a few hundred rows per batch are). Every
timed call starts from the same state (restored outside the timed region, then a 64 MiB array is
read to push the reservoir out of the caches, as the rest of a training step would), so the
repeats measure the same work.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

try:
    from benchmarks.common import machine_info, print_json, timeit, update_benchmarks_md
except ImportError:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import machine_info, print_json, timeit, update_benchmarks_md

from vqkit.quantize.distance import nearest
from vqkit.quantize.reservoir import ReservoirSampler


class LoopReservoir:
    """The per-sample reference: VQFR's reservoir update, kept as written (including drawing
    every position of a batch from ``[0, i)`` with ``i`` the stream position at batch start)."""

    def __init__(self, num_samples: int, dim: int, device: torch.device) -> None:
        self.n = num_samples
        self.i = 0
        self.buffer = torch.empty(num_samples, dim, device=device)

    def add(self, samples: torch.Tensor) -> None:
        samples = samples.detach()
        buffer = self.buffer
        if self.i < self.n:
            slots = self.n - self.i
            add_samples = samples[:slots]
            samples = samples[slots:]
            buffer[self.i : self.i + len(add_samples)] = add_samples
            self.i += len(add_samples)
            if not len(samples):
                return
        positions = torch.randint(0, self.i, (len(samples),), device=samples.device)
        for s, pos in zip(samples, positions, strict=True):
            self.i += 1
            if pos < self.n:
                buffer[pos] = s


def _vqkit_at(size: int, dim: int, seen: int, device: torch.device) -> ReservoirSampler:
    r = ReservoirSampler(size, dim, device=device)
    chunk = torch.randn(min(seen, 65536), dim, device=device)
    left = seen
    while left:
        take = min(left, chunk.shape[0])
        r.add(chunk[:take])
        left -= take
    return r


def run_case(
    m: int, size: int, dim: int, seen: int, repeat: int, loop_repeat: int, device: torch.device
) -> dict:
    x = torch.randn(m, dim, device=device)

    res = _vqkit_at(size, dim, seen, device)
    snapshot = {k: v.clone() for k, v in res.state_dict().items()}

    # In training the rest of the step runs between two adds, so the reservoir is not in cache;
    # reading (not writing: no dirty lines left behind) a larger array evicts it.
    evict = torch.ones(64 * 2**20 // 4, device=device)

    def restore() -> None:
        res.load_state_dict(snapshot)
        _ = res.seen  # re-reads the host mirrors now rather than inside the timed call
        evict.sum()

    t_vqkit = timeit(lambda: res.add(x), repeat, setup=restore)

    loop = LoopReservoir(size, dim, device)
    loop.add(torch.randn(size, dim, device=device))

    def rewind() -> None:
        loop.i = seen
        evict.sum()

    t_loop = timeit(lambda: loop.add(x), loop_repeat, setup=rewind)

    codebook = torch.randn(1024, dim, device=device)
    t_step = timeit(lambda: nearest(x, codebook), repeat)
    accepted = _accepted(size, seen, m)
    return {
        "batch": m,
        "dim": dim,
        "size": size,
        "seen": seen,
        "expected_accepted": accepted,
        "loop_s": t_loop,
        "vqkit_s": t_vqkit,
        "speedup": t_loop / t_vqkit,
        "nearest_k1024_s": t_step,
        "share_of_step": t_vqkit / t_step,
    }


def _accepted(size: int, seen: int, m: int) -> float:
    """Expected number of accepted items: sum of size / (i + 1) over the batch."""
    fill = min(max(size - seen, 0), m)
    lo, hi = seen + fill, seen + m
    harmonic = torch.arange(lo + 1, hi + 1, dtype=torch.float64).reciprocal().sum()
    return fill + size * float(harmonic)


def _idle_percent(seconds: float = 1.0) -> float:
    """Share of CPU time idle machine-wide over ``seconds`` (Linux; NaN elsewhere)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:8]]
        return v[3] + v[4], sum(v)

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except OSError:
        return float("nan")
    return 100.0 * (idle1 - idle0) / max(total1 - total0, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batches", type=int, nargs="+", default=[2048, 32768])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--size", type=int, default=16384)
    p.add_argument("--steady", type=int, default=1_000_000, help="stream position, steady state")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--loop-repeat", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    idle_before = _idle_percent()

    rows = []
    for m in args.batches:
        for phase, seen in (("right after fill", args.size), ("steady state", args.steady)):
            row = run_case(m, args.size, args.dim, seen, args.repeat, args.loop_repeat, device)
            row["phase"] = phase
            rows.append(row)
            print(
                f"batch {m:>6} {phase:<17} loop {row['loop_s']:.4f}s vqkit {row['vqkit_s']:.5f}s "
                f"x{row['speedup']:.0f}  {100 * row['share_of_step']:.2f}% of nearest",
                file=sys.stderr,
            )

    result = {
        "benchmark": "reservoir_add",
        "machine": {"device": str(device), **machine_info()},
        "cpu_idle_percent_before": idle_before,
        "targets": {"speedup_min": 10.0, "share_of_step_max": 0.05},
        "rows": rows,
    }
    print_json(result)
    md = [
        f"One `ReservoirSampler.add` of a batch into a reservoir of {args.size:,} x {args.dim} "
        f"fp32 on {device.type} ({torch.get_num_threads()} threads, torch {torch.__version__}), "
        f"median of {args.repeat} (loop: {args.loop_repeat}), each from the same state with the "
        "reservoir evicted from the CPU caches. *Loop* "
        "is VQFR's per-sample update. *Step* is one fp32 `nearest(x, codebook)` with K=1024 for "
        "the same batch, standing in for a quantizer step. Targets: >= 10x faster than the loop "
        f"and < 5% of a step. CPU idle in the second before the run: {idle_before:.0f}%"
        + (
            "; other jobs shared the machine, so the times are inflated, unevenly."
            if idle_before < 90
            else "."
        ),
        "",
        "| batch | stream position | accepted (exp.) | loop s | vqkit s | speedup | step s "
        "| vqkit / step |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    md += [
        f"| {r['batch']:,} | {r['phase']} ({r['seen']:,}) | {r['expected_accepted']:,.0f} | "
        f"{r['loop_s']:.4f} | {r['vqkit_s']:.5f} | {r['speedup']:,.0f}x | "
        f"{r['nearest_k1024_s']:.4f} | {100 * r['share_of_step']:.2f}% |"
        for r in rows
    ]
    md += [
        "",
        "Right after the fill most of a batch is accepted (an item at stream position i is "
        "accepted with probability size / (i + 1)), so `add` is then a memory-bound scatter of "
        "most of the batch into the reservoir; the rate halves each time the stream doubles.",
    ]
    table = "\n".join(md)
    print(table)
    if not args.no_write:
        update_benchmarks_md("reservoir", table)


if __name__ == "__main__":
    main()

"""k-means of a Gaussian mixture: vqkit.kmeans against scikit-learn's KMeans (what VQFR runs) and
faiss.Kmeans, side by side in one run.

    python benchmarks/bench_kmeans.py [--n 16384] [--dim 256] [--k 1024] [--repeat 3]
                                      [--threads T] [--json-out PATH] [--no-write]
    python benchmarks/bench_kmeans.py --memcheck   # N=262,144, K=16,384, D=256: minutes

Data: ``k`` cluster means drawn from N(0, I_D), every point a uniformly chosen mean plus
N(0, sigma^2 I_D) noise with sigma = 0.75 (``--sigma``), generated with a fixed torch seed. In
D=256 a point then lies about 12 from its own mean and about 25 from the others, so the clusters
touch: k-means has real work to do and the seeding matters for the final inertia.

Each implementation runs with its defaults and seed 0: scikit-learn ``KMeans(n_clusters=k,
random_state=0)`` (greedy k-means++, n_init "auto" = 1, max_iter 300, tol 1e-4), faiss
``Kmeans(d, k, niter=20, seed=0)`` (random init, 20 iterations), vqkit ``kmeans(x, k, seed=0,
iters=300)`` (greedy k-means++, tol 1e-4 as scikit-learn). The inertia column is recomputed the
same way for all three: the sum over points of the squared distance to the nearest returned
center (fp64 sum). Rounds are interleaved (one run of each implementation per round) so that
load changes on a shared machine hit all of them alike; the table shows medians.

``--memcheck`` runs vqkit alone at N=262,144, K=16,384, D=256 and reports the peak resident set
size (``resource.getrusage``), or the peak CUDA allocation with ``--device cuda``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    from benchmarks.common import (
        machine_info,
        print_json,
        timeit,
        update_benchmarks_md,
        write_json,
    )
except ImportError:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import (
        machine_info,
        print_json,
        timeit,
        update_benchmarks_md,
        write_json,
    )

from vqkit.quantize.distance import nearest
from vqkit.quantize.kmeans import kmeans

TARGET_SPEEDUP = 5.0
TARGET_INERTIA_RATIO = 1.01


def mixture(
    n: int, dim: int, k: int, sigma: float, seed: int = 0, device: str = "cpu"
) -> torch.Tensor:
    """The benchmark data, generated in row blocks so that the peak memory is ~ the data."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, dim, generator=g)
    labels = torch.randint(k, (n,), generator=g)
    x = torch.empty(n, dim, device=device)
    step = 1 << 15
    for s in range(0, n, step):
        lab = labels[s : s + step]
        x[s : s + step] = (means[lab] + sigma * torch.randn(len(lab), dim, generator=g)).to(device)
    return x


def inertia_of(x: torch.Tensor, centers: torch.Tensor) -> float:
    _, d = nearest(x, centers.to(x.device, torch.float32))
    return float(d.sum(dtype=torch.float64))


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 / 1024**2 if sys.platform == "darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# --------------------------------------------------------------------------------------------
# Implementations: each returns a function that runs once and reports (centers, iterations).
# --------------------------------------------------------------------------------------------


def vqkit_impl(x: torch.Tensor, k: int) -> Callable[[], tuple[torch.Tensor, int]]:
    def run() -> tuple[torch.Tensor, int]:
        res = kmeans(x, k, seed=0, iters=300)
        return res.centers, res.iterations

    return run


def sklearn_impl(x: torch.Tensor, k: int, threads: int) -> Callable[[], tuple[torch.Tensor, int]]:
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    xn = x.cpu().numpy()

    def run() -> tuple[torch.Tensor, int]:
        with threadpool_limits(threads):
            km = KMeans(n_clusters=k, random_state=0).fit(xn)
        return torch.from_numpy(km.cluster_centers_), int(km.n_iter_)

    return run


def faiss_impl(x: torch.Tensor, k: int, threads: int) -> Callable[[], tuple[torch.Tensor, int]]:
    import faiss

    xn = x.cpu().numpy()

    def run() -> tuple[torch.Tensor, int]:
        faiss.omp_set_num_threads(threads)
        km = faiss.Kmeans(xn.shape[1], k, niter=20, seed=0, verbose=False)
        km.train(xn)
        return torch.from_numpy(km.centroids.copy()), 20

    return run


def compare(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    x = mixture(args.n, args.dim, args.k, args.sigma, device=args.device)
    impls: dict[str, Callable[[], tuple[torch.Tensor, int]]] = {"vqkit": vqkit_impl(x, args.k)}
    skipped: dict[str, str] = {}
    for name, make in (("scikit-learn", sklearn_impl), ("faiss", faiss_impl)):
        if name in args.skip:
            skipped[name] = "--skip"
            continue
        try:
            impls[name] = make(x, args.k, threads)
        except ImportError as e:
            skipped[name] = f"not installed ({e.name})"
    # Warm up every library once on a small problem (thread pools, MKL/BLAS dispatch).
    small = x[: min(args.n, 20 * 32)]
    vqkit_impl(small, 32)()
    if "scikit-learn" in impls:
        sklearn_impl(small, 32, threads)()
    if "faiss" in impls:
        faiss_impl(small, 32, threads)()

    times: dict[str, list[float]] = {name: [] for name in impls}
    results: dict[str, tuple[torch.Tensor, int]] = {}
    for r in range(args.repeat):
        for name, fn in impls.items():
            out: list[tuple[torch.Tensor, int]] = []
            times[name].append(timeit(lambda fn=fn, out=out: out.append(fn()), 1, warmup=0))
            results[name] = out[0]
            print(f"round {r + 1}: {name:<13} {times[name][-1]:8.3f} s", file=sys.stderr)

    rows = []
    for name in impls:
        centers, iters = results[name]
        rows.append(
            {
                "impl": name,
                "seconds": statistics.median(times[name]),
                "seconds_all": times[name],
                "iterations": iters,
                "inertia": inertia_of(x, centers),
            }
        )
    base = next((r for r in rows if r["impl"] == "scikit-learn"), None)
    for row in rows:
        row["inertia_ratio"] = row["inertia"] / base["inertia"] if base else None
        row["speedup"] = base["seconds"] / row["seconds"] if base else None
    ours = rows[0]
    return {
        "rows": rows,
        "skipped": skipped,
        "targets": {
            "speedup_min": TARGET_SPEEDUP,
            "inertia_ratio_max": TARGET_INERTIA_RATIO,
            "speedup_met": None if base is None else ours["speedup"] >= TARGET_SPEEDUP,
            "inertia_met": None if base is None else ours["inertia_ratio"] <= TARGET_INERTIA_RATIO,
        },
    }


def markdown(args: argparse.Namespace, threads: int, res: dict[str, Any]) -> str:
    info = machine_info()
    lines = [
        f"k-means of a Gaussian mixture: N={args.n:,}, D={args.dim}, K={args.k:,} ({args.k:,} "
        f"means ~ N(0, I), noise sigma {args.sigma}, fixed seed), fp32, {args.device}, "
        f"{threads} thread(s) on {info['cpu_cores']} cores, torch {info['torch']}; median of "
        f"{args.repeat} interleaved rounds. scikit-learn: `KMeans(n_clusters={args.k}, "
        "random_state=0)` (greedy k-means++, one init, tol 1e-4); faiss: `Kmeans(d, k, niter=20, "
        "seed=0)`; vqkit: `kmeans(x, k, seed=0, iters=300)`. Inertia: squared distances to the "
        "nearest returned center, recomputed alike for all. Target: vqkit >= "
        f"{TARGET_SPEEDUP:g}x faster than scikit-learn at <= {TARGET_INERTIA_RATIO}x its inertia.",
        "",
        "| implementation | seconds | iterations | inertia | inertia / sklearn "
        "| speedup vs sklearn |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        ratio = "-" if r["inertia_ratio"] is None else f"{r['inertia_ratio']:.4f}"
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(
            f"| {r['impl']} | {r['seconds']:.2f} | {r['iterations']} | {r['inertia']:,.0f} | "
            f"{ratio} | {speed} |"
        )
    for name, why in res["skipped"].items():
        lines.append(f"| {name} | skipped: {why} | | | | |")
    return "\n".join(lines)


def memcheck(args: argparse.Namespace) -> dict[str, Any]:
    n, k, d = args.memcheck_n, args.memcheck_k, args.dim
    x = mixture(n, d, k, args.sigma, device=args.device)
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_dev = torch.cuda.memory_allocated() / 2**20
    base = peak_rss_mib()
    t0 = time.perf_counter()
    res = kmeans(x, k, seed=0, iters=args.memcheck_iters, init=args.memcheck_init)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {
        "n": n,
        "k": k,
        "dim": d,
        "device": str(x.device),
        "init": args.memcheck_init,
        "iters": args.memcheck_iters,
        "iterations_run": res.iterations,
        "seconds": seconds,
        "data_mib": x.numel() * 4 / 2**20,
        "peak_rss_mib_before": base,
        "peak_rss_mib": peak_rss_mib(),
        "limit_mib": 4096,
    }
    if cuda:
        out["cuda_data_mib"] = base_dev
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def memcheck_markdown(m: dict[str, Any]) -> str:
    where = (
        f"peak CUDA allocation {m['cuda_peak_mib']:,.0f} MiB"
        if "cuda_peak_mib" in m
        else f"peak RSS {m['peak_rss_mib']:,.0f} MiB"
    )
    return (
        f"`kmeans` at N={m['n']:,}, K={m['k']:,}, D={m['dim']} on {m['device']} (init "
        f"{m['init']}, {m['iterations_run']} Lloyd iterations, {m['seconds']:,.0f} s): {where} "
        f"for the whole process, data ({m['data_mib']:,.0f} MiB) included; peak RSS before the "
        f"call {m['peak_rss_mib_before']:,.0f} MiB. Budget: 4 GiB. Distance blocks are bounded "
        "(64 MiB), so memory does not grow with N x K."
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--sigma", type=float, default=0.75, help="per-cluster noise std")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="default: torch's default")
    p.add_argument("--device", default="cpu", help="device for vqkit (the others run on CPU)")
    p.add_argument("--skip", nargs="*", default=[], choices=["scikit-learn", "faiss"])
    p.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    p.add_argument("--memcheck", action="store_true", help="large memory check instead (slow)")
    p.add_argument("--memcheck-n", type=int, default=262144)
    p.add_argument("--memcheck-k", type=int, default=16384)
    p.add_argument("--memcheck-iters", type=int, default=3)
    p.add_argument("--memcheck-init", default="k-means++", choices=["k-means++", "random"])
    args = p.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    result: dict[str, Any] = {
        "benchmark": "kmeans_memory" if args.memcheck else "kmeans",
        "machine": machine_info() | {"platform": platform.platform(), "pid": os.getpid()},
        "threads": threads,
        "config": {
            "n": args.n,
            "dim": args.dim,
            "k": args.k,
            "sigma": args.sigma,
            "repeat": args.repeat,
            "device": args.device,
        },
    }
    if args.memcheck:
        result["memcheck"] = m = memcheck(args)
        table = memcheck_markdown(m)
        section = "kmeans_memory"
    else:
        result |= compare(args, threads)
        table = markdown(args, threads, result)
        section = "kmeans"
    print_json(result)
    print(table)
    if args.json_out is not None:
        write_json(result, args.json_out)
    if not args.no_write:
        update_benchmarks_md(section, table)


if __name__ == "__main__":
    main()

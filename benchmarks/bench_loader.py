"""Images/s of the training loader alone with ``cache_images`` "memory", "disk" and "none", the
disk cache's build, the loader's peak resident memory, and next to them the model step of
``configs/vqvae_anime.yaml``: does the loader keep up?

    python benchmarks/bench_loader.py [--images 2000] [--size 256] [--root DIR] [--batches 60]
                                      [--workers 0 2] [--loader-threads 1] [--threads N]
                                      [--model-batch 4] [--model-steps 2] [--workdir DIR]
                                      [--no-write]

Without ``--root`` it writes ``--images`` synthetic PNGs (smooth random colour fields with a
little noise, so they compress like photos or renders rather than like flat colour). The loader
is what ``vqkit fit`` trains from: ``ResumableLoader`` over the data module's train set, batch
32, flips and colour jitter on. Each cache mode runs in a fresh process, so its peak resident
memory (``VmHWM`` and ``ru_maxrss``, and ``ru_maxrss`` of its worker processes) is its own.
"disk, cold" first drops the cache file from the OS page cache (``posix_fadvise DONTNEED``: the
pages are re-read from the disk, though the disk's own cache may still hold them); "warm" then
reads the same batches again. images/s is the steady rate from the first batch to the last,
so worker start-up is left out. The loader's process runs ``--loader-threads`` torch threads
(1, what DataLoader workers use); one more row runs "memory" without workers at ``--threads``
(the training process's), which on a machine whose cores are busy with other work can be far
slower: every small tensor op of the augmentation then waits for a second thread. The model
step is forward + backward + AdamW of the 256 px ResNetVQModel of ``configs/vqvae_anime.yaml``
(its ``init_args``; L1 + VQ loss, no LPIPS, no codebook maintenance schedule, fp32 on this CPU).
Its FLOPs (``torch.utils.flop_counter``) give what a GPU at a few sustained TFLOP/s would take
from the loader: an estimate for a machine without a GPU, not a GPU measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    from benchmarks.common import machine_info, print_json, update_benchmarks_md, write_json
except ImportError:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import machine_info, print_json, update_benchmarks_md, write_json

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32
MB = 1e6


def synthetic_folder(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` ``size`` px PNGs: bicubic-upsampled 8x8 colour noise plus +-6 of pixel noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB")
        a = np.asarray(small.resize((size, size), Image.BICUBIC), dtype=np.int16)
        a = a + rng.integers(-6, 7, a.shape, dtype=np.int16)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB").save(root / f"{i:06d}.png")
    return root


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return None


def _maxrss_mb(who: int) -> float:
    kb = resource.getrusage(who).ru_maxrss  # kB on Linux, bytes on macOS
    return kb / MB if sys.platform == "darwin" else kb * 1024 / MB


def _drop_page_cache(path: Path) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def _rate(dataset, workers: int, batches: int) -> float:  # noqa: ANN001
    """Images/s from the first batch to the last of ``batches`` (epoch 0 of seed 0)."""
    from vqkit.data.sampler import ResumableLoader

    loader = ResumableLoader(dataset, batch_size=BATCH, seed=0, num_workers=workers)
    t_first = t_last = 0.0
    for i, _batch in enumerate(loader):
        if i == 0:
            t_first = time.perf_counter()
        t_last = time.perf_counter()
        if i + 1 == batches:
            break
    del loader
    return (batches - 1) * BATCH / max(t_last - t_first, 1e-9)


def child(args: argparse.Namespace) -> dict:
    """One cache mode in this (fresh) process: setup time, loader rates, peak memory."""
    from vqkit.data import ImageDataModule

    torch.set_num_threads(args.threads)
    mode = args.child
    t0 = time.perf_counter()
    dm = ImageDataModule(
        root=args.root,
        image_size=args.size,
        batch_size=BATCH,
        val_fraction=0.0,
        augment=True,
        cache_images=mode,
        cache_dir=args.cache_dir,
        pin_memory=False,
    )
    dm.setup("fit")
    setup_s = time.perf_counter() - t0
    ds = dm.train_dataset
    rows = []
    batches = min(args.batches, len(ds) // BATCH)
    rss_after_setup = _status_mb("VmRSS")
    for workers in args.workers:
        if mode == "disk":
            for page_cache in ("cold", "warm"):
                if page_cache == "cold" and not _drop_page_cache(ds._disk.path):
                    continue
                rate = _rate(ds, workers, batches)
                rows.append({"workers": workers, "page_cache": page_cache, "images_per_s": rate})
        else:
            rate = _rate(ds, workers, batches)
            rows.append({"workers": workers, "page_cache": "-", "images_per_s": rate})
    return {
        "cache_images": mode,
        "torch_threads": torch.get_num_threads(),
        "images": len(ds),
        "batches": batches,
        "setup_s": setup_s,
        "rows": rows,
        "rss_after_setup_mb": rss_after_setup,
        "peak_rss_mb": _status_mb("VmHWM"),
        "ru_maxrss_mb": _maxrss_mb(resource.RUSAGE_SELF),
        "workers_ru_maxrss_mb": _maxrss_mb(resource.RUSAGE_CHILDREN),
    }


def run_child(
    mode: str,
    args: argparse.Namespace,
    root: Path,
    cache_dir: Path,
    threads: int,
    workers: list[int],
) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        "--root",
        str(root),
        "--cache-dir",
        str(cache_dir),
        "--size",
        str(args.size),
        "--batches",
        str(args.batches),
        "--threads",
        str(threads),
        "--workers",
        *map(str, workers),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def model_step(batch: int, steps: int, threads: int) -> dict:
    """Seconds per forward + backward + AdamW step of the vqvae_anime model on this CPU."""
    import jsonargparse
    import yaml

    from vqkit.models import ResNetVQModel

    torch.set_num_threads(threads)
    cfg = yaml.safe_load((ROOT / "configs" / "vqvae_anime.yaml").read_text())
    spec = cfg["model"]["model"]
    spec["init_args"]["quantizer"]["init_args"].pop("maintenance", None)
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=ResNetVQModel)
    torch.manual_seed(0)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    model = instantiate(parser.parse_object({"model": spec})).model.train()
    resolution = spec["init_args"]["resolution"]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    images = torch.rand(batch, 3, resolution, resolution) * 2 - 1

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        step_loss(model, images).backward()
        opt.step()
        return time.perf_counter() - t0

    step()  # warm-up: allocator, kernels
    times = [step() for _ in range(steps)]
    s = statistics.median(times)
    params = sum(p.numel() for p in model.parameters())
    return {
        "resolution": resolution,
        "batch": batch,
        "params": params,
        "step_s": s,
        "images_per_s": batch / s,
        "gflop_per_image": step_flops(model, images) / batch / 1e9,
    }


def step_loss(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The step's loss: L1 reconstruction + the quantizer's loss (no LPIPS)."""
    out = model(images)
    return torch.nn.functional.l1_loss(out.reconstructions, images) + out.vq_loss


def step_flops(model: torch.nn.Module, images: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of one forward + backward, as ``torch.utils.flop_counter``
    counts them: convolutions, matmuls and attention; normalization, activations and the
    optimizer are not counted (memory-bound on a GPU, and small beside these)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step_loss(model, images).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# What a GPU step would need from the loader, from the step's FLOPs: sustained TFLOP/s on the
# convolutions and matmuls. An H100 SXM's dense bf16 / fp16 peak is 989 TFLOP/s; a ResNet
# autoencoder with GroupNorm and mixed precision sustains a fraction of it.
GPU_TFLOPS = (100, 200, 400)


def anime_workers() -> int:
    """``data.num_workers`` of configs/vqvae_anime.yaml."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "vqvae_anime.yaml").read_text())
    return int(cfg["data"]["num_workers"])


def gpu_feed(result: dict) -> list[dict]:
    """Per sustained GPU rate: the images/s a step at that rate takes, and how many loader
    processes at the disk cache's rate without workers (warm page cache) that is."""
    gflop = result["model_step"]["gflop_per_image"]
    disk = [
        r["images_per_s"]
        for m in result["modes"]
        if m["cache_images"] == "disk"
        for r in m["rows"]
        if r["workers"] == 0 and r["page_cache"] == "warm"
    ]
    per_process = disk[0] if disk else None
    rows = []
    for tflops in GPU_TFLOPS:
        rate = tflops * 1e3 / gflop
        rows.append(
            {
                "tflops": tflops,
                "images_per_s": rate,
                "loader_processes": rate / per_process if per_process else None,
            }
        )
    return rows


def markdown(result: dict) -> str:
    b, m, info = result["build"], result["model_step"], result["machine"]
    n, size = result["files"], result["size"]
    lines = [
        f"The training loader alone (`ResumableLoader`, batch {BATCH}, flip + jitter on) over "
        f"{result['data']}: {n:,} files at {size} px, {result['png_kb_mean']:.0f} kB a file on "
        f"average. CPU; each cache mode in a fresh process; images/s from the first batch to the "
        f"last (worker start-up left out) over {result['modes'][0]['batches']} batches. "
        f"`{' '.join(['python benchmarks/bench_loader.py', result['argv']]).strip()}`.",
        "",
        f"- disk cache build (one pass: decode + validity check + write): {b['build_s']:.1f} s, "
        f"{b['build_images_per_s']:.0f} images/s, {b['cache_mb']:.0f} MB file; a later setup "
        f"with the complete cache: {b['reuse_s']:.2f} s (no decoding); the validity scan that "
        f"every setup without the disk cache runs: {b['scan_s']:.1f} s.",
        "",
        "| cache_images | torch threads | workers | page cache | images/s | setup (s) "
        "| peak RSS main (MB) | peak RSS of a worker (MB) |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for mode in result["modes"]:
        for r in mode["rows"]:
            worker = f"{mode['workers_ru_maxrss_mb']:.0f}" if r["workers"] else "-"
            lines.append(
                f"| {mode['cache_images']} | {mode['torch_threads']} | {r['workers']} | "
                f"{r['page_cache']} | "
                f"{r['images_per_s']:.0f} | {mode['setup_s']:.1f} | {mode['peak_rss_mb']:.0f} | "
                f"{worker} |"
            )
    lines += [
        "",
        "Peak RSS is the process's whole life (setup included; torch alone is most of it); a "
        "worker's is the largest of its workers, and counts the pages it shares with the main "
        "process after the fork. Workers run 1 torch thread each; the row with "
        f"{info['torch_threads']} threads and no workers is the training process's setting "
        "(on cores busy with other jobs each small tensor op of the augmentation then waits "
        "for the second thread: 11 images/s in a run of 2026-11-29 under load). The model "
        "step beside it: "
        f"`configs/vqvae_anime.yaml`'s ResNetVQModel ({m['params'] / 1e6:.1f} M parameters, "
        f"{m['resolution']} px), forward + backward + AdamW, batch {m['batch']}, fp32 on this "
        f"CPU with {info['torch_threads']} threads: {m['step_s']:.1f} s a step, "
        f"**{m['images_per_s']:.2f} images/s**, so every "
        "loader row above keeps up on this CPU by a wide margin. On a GPU the loader must "
        f"deliver {BATCH} / (step time) images/s per GPU: a row's images/s divided by {BATCH} "
        "is the most steps a second it feeds.",
        "",
        f"On a GPU (not measured: no GPU here). The step does **{m['gflop_per_image']:.0f} GFLOP "
        "an image** (forward + backward, 2 per multiply-add, counted by "
        "`torch.utils.flop_counter`: convolutions, matmuls and attention; the VQ-GAN's "
        "discriminator and LPIPS come on top). What a GPU sustaining a given rate on them would "
        "take from the loader, and how many loader processes at the disk cache's rate above "
        "(no workers, warm page cache: one core each) that is; an H100 SXM's dense bf16 / fp16 "
        "peak is 989 TFLOP/s, of which a convolutional autoencoder with GroupNorm sustains a "
        "fraction:",
        "",
        "| sustained TFLOP/s | images/s the step takes | steps/s at batch 32 "
        "| loader processes (cores) |",
        "|---:|---:|---:|---:|",
    ]
    for row in result["gpu_feed"]:
        procs = f"{row['loader_processes']:.1f}" if row["loader_processes"] else "-"
        lines.append(
            f"| {row['tflops']} | {row['images_per_s']:,.0f} | "
            f"{row['images_per_s'] / BATCH:.1f} | {procs} |"
        )
    most = max((r["loader_processes"] or 0) for r in result["gpu_feed"])
    workers, cores = anime_workers(), info.get("cpu_cores") or 0
    if most > 0:
        lines += [
            "",
            f"The anime configs' `num_workers: {workers}` is {workers / most:.1f} times the most "
            "loader processes this table asks for, if a worker keeps the rate of one loader "
            "process, which depends on the machine's cores and memory bandwidth"
            + (
                f": this {cores}-core machine cannot show {workers} workers side by side."
                if cores < workers
                else "."
            ),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="synthetic images (without --root)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--root", default=None, help="a folder of images instead of synthetic ones")
    p.add_argument("--batches", type=int, default=60, help="loader batches timed per row")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="model step")
    p.add_argument("--loader-threads", type=int, default=1, help="torch threads of the loader")
    p.add_argument("--model-batch", type=int, default=4)
    p.add_argument("--model-steps", type=int, default=2)
    p.add_argument("--workdir", default=None, help="where the images and cache go (temporary)")
    p.add_argument("--json-out", default=str(ROOT / "benchmarks" / "results" / "loader.json"))
    p.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md and JSON alone")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    from vqkit.data.diskcache import open_or_build
    from vqkit.data.images import find_images, scan_images

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="vqkit-bench-loader-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        if args.root:
            root, data = Path(args.root).expanduser(), f"`{args.root}`"
        else:
            t0 = time.perf_counter()
            root = synthetic_folder(tmp / "images", args.images, args.size)
            data = "synthetic PNGs (smooth colour noise)"
            print(f"wrote {args.images} PNGs in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        paths = find_images(root)
        png_kb = statistics.mean(q.stat().st_size for q in paths) / 1e3
        cache_dir = tmp / "cache"
        t0 = time.perf_counter()
        found = open_or_build(paths, args.size, cache_dir=cache_dir / "image-cache")
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = open_or_build(paths, args.size, cache_dir=cache_dir / "image-cache")
        reuse_s = time.perf_counter() - t0
        assert found.built and not again.built
        t0 = time.perf_counter()
        scan_images(paths)
        scan_s = time.perf_counter() - t0
        build = {
            "build_s": build_s,
            "build_images_per_s": len(paths) / build_s,
            "cache_mb": found.cache.path.stat().st_size / MB,
            "reuse_s": reuse_s,
            "scan_s": scan_s,
        }
        print(f"build: {build}", file=sys.stderr)
        modes = []
        runs = [(m, args.loader_threads, args.workers) for m in ("memory", "disk", "none")]
        if args.threads != args.loader_threads:
            runs.append(("memory", args.threads, [0]))
        for mode, threads, workers in runs:
            modes.append(run_child(mode, args, root, cache_dir, threads, workers))
            print(f"{mode}: {modes[-1]}", file=sys.stderr)
    step = model_step(args.model_batch, args.model_steps, args.threads)
    result = {
        "benchmark": "loader",
        "machine": machine_info(),
        "argv": " ".join(sys.argv[1:] if argv is None else argv),
        "data": data,
        "files": len(paths),
        "size": args.size,
        "png_kb_mean": png_kb,
        "build": build,
        "modes": modes,
        "model_step": step,
    }
    result["gpu_feed"] = gpu_feed(result)
    print_json(result)
    md = markdown(result)
    print(md)
    if not args.no_write:
        write_json(result, args.json_out)
        update_benchmarks_md("loader", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

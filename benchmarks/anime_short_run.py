"""Seed 004's 256 px tokenizers trained for a short, real budget on this machine (issue 13, part 3).

    python benchmarks/anime_short_run.py                       # VQ-VAE and VQ-GAN, 200 steps each
    python benchmarks/anime_short_run.py --variants vqvae --steps 100 --batch-size 2

Each run is ``vqkit fit`` on ``configs/vqvae_anime.yaml`` / ``configs/vqgan_anime.yaml`` with the
model unchanged (256 px, down factor 16, 16x16 codes, attention at 16x16, 1,024 codes of dim 256,
seed 004's losses) and only what a CPU and a short budget need changed, written to the run folder
as ``short_config.yaml``:

- CPU, fp32 (16-mixed is a GPU setting), ``--steps`` steps at ``--batch-size``, two validations on
  ``--val-batches`` batches, step checkpoints every quarter (the frequent one) and half;
- the maintenance schedule scaled into the budget (k-means init at a quarter, k-means
  re-estimations every quarter until three quarters, reservoirs of 16,384 vectors), the LR
  warm-up at a tenth; the VQ-GAN's discriminator starts at half and ramps over a quarter;
- no LPIPS and no rFID callback: their VGG16 / Inception weights are not on this offline machine
  (``perceptual: null``); with the files present the configs use them unchanged;
- the data: the avatar set (``--train-images`` avatars, 60,000 by default) streamed from the disk
  cache (``cache_images: disk``) by ``--workers`` loader processes.

It reports, per run: the training loss over the first and last tenth of the steps, the
maintenance events (from TensorBoard), the files written, ``summary.json``'s figures, wall time,
images/s and the peak resident memory of the ``vqkit fit`` process tree (the main process and its
loader workers, summed, sampled every 0.5 s from /proc), to
``benchmarks/results/anime_short_run.json`` and the ``anime_short_run`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

try:
    from benchmarks.common import (
        REPO_ROOT,
        machine_info,
        print_json,
        update_benchmarks_md,
        write_json,
    )
except ImportError:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import (
        REPO_ROOT,
        machine_info,
        print_json,
        update_benchmarks_md,
        write_json,
    )

CONFIGS = {"vqvae": "configs/vqvae_anime.yaml", "vqgan": "configs/vqgan_anime.yaml"}
JSON_REL = Path("benchmarks/results/anime_short_run.json")


def _module_args(cfg: dict) -> dict:
    """The LightningModule's arguments: ``model:`` itself, or its ``init_args`` (VQ-GAN)."""
    m = cfg["model"]
    return m["init_args"] if "class_path" in m else m


def short_config(
    cfg: dict,
    *,
    steps: int,
    batch_size: int,
    val_batches: int,
    out: Path,
    train_images: int,
    workers: int,
    cache_images: str = "disk",
) -> dict:
    """``cfg`` (a 256 px anime config) with the CPU / short-budget changes listed in the module
    docstring; the model is left as it is."""
    cfg = copy.deepcopy(cfg)
    quarter, half = max(1, steps // 4), max(1, steps // 2)
    t = cfg["trainer"]
    t.update(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=steps,
        val_check_interval=half,
        limit_val_batches=val_batches,
        log_every_n_steps=max(1, steps // 40),
        default_root_dir=str(out),
    )
    t["logger"]["init_args"]["save_dir"] = str(out)
    callbacks = [
        cb  # rFID / LPIPS weights are not on an offline machine
        for cb in t.get("callbacks", [])
        if not cb["class_path"].endswith("EvaluationCallback")
    ]
    # step checkpoints at a quarter, a half, ...: still distinct (Lightning refuses two
    # ModelCheckpoints with the same settings), in the configs' order of frequency
    periodic = sorted(
        (cb["init_args"] for cb in callbacks if "every_n_train_steps" in cb.get("init_args", {})),
        key=lambda a: a["every_n_train_steps"],
    )
    every = 0
    for i, a in enumerate(periodic):
        every = max(every + 1, steps * (i + 1) // 4)
        a["every_n_train_steps"] = every
    t["callbacks"] = callbacks
    m = _module_args(cfg)
    m["perceptual"] = None
    m["warmup_steps"] = max(1, steps // 10)
    m["usage_window_steps"] = quarter
    m["log_images_every_n_steps"] = half
    q = m["model"]["init_args"]["quantizer"]["init_args"]
    for s in q.get("maintenance", []):
        name, a = s["class_path"].rsplit(".", 1)[-1], s.setdefault("init_args", {})
        if "reservoir_size" in a:
            a["reservoir_size"] = 16384
        if name == "KMeansInit":
            a["warmup_steps"] = quarter
        elif name == "KMeansReestimate":
            a["every"], a["until"] = quarter, 3 * quarter
    if "adversarial" in m:
        adv = m["adversarial"]["init_args"]
        adv["disc_start"], adv["ramp_steps"] = half, quarter
    d = cfg["data"]
    d.update(
        root=None,
        dataset="avatars",
        dataset_size=train_images,
        batch_size=batch_size,
        num_workers=workers,
        cache_images=cache_images,
    )
    return cfg


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _tree_rss_kb(pid: int) -> int:
    """Resident memory (kB) of ``pid`` and all its descendants, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def _run_watched(cmd: list[str], log_path: Path) -> tuple[int, float, int]:
    """Run ``cmd`` with output to ``log_path``; return (exit code, seconds, peak tree RSS kB),
    the tree's resident memory sampled every 0.5 s."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss_kb(proc.pid))
            time.sleep(0.5)
    return proc.returncode, time.perf_counter() - t0, peak


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def run_one(variant: str, args: argparse.Namespace) -> dict:
    out = args.out / variant
    cfg = yaml.safe_load((REPO_ROOT / CONFIGS[variant]).read_text())
    short = short_config(
        cfg,
        steps=args.steps,
        batch_size=args.batch_size,
        val_batches=args.val_batches,
        out=out,
        train_images=args.train_images,
        workers=args.workers,
    )
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "short_config.yaml"
    config_path.write_text(yaml.safe_dump(short, sort_keys=False))
    cmd = [sys.executable, "-m", "vqkit.cli", "fit", "--config", str(config_path)]
    print("running:", " ".join(cmd), flush=True)
    code, wall, peak_kb = _run_watched(cmd, out / "fit.log")
    if code != 0:
        tail = (out / "fit.log").read_text()[-3000:]
        raise SystemExit(f"{variant}: vqkit fit failed, see {out / 'fit.log'}:\n{tail}")
    versions = sorted((out / "tensorboard").glob("version_*"), key=lambda p: p.stat().st_mtime)
    run_dir = versions[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    scalars = _scalars(run_dir)
    loss = [v for _, v in scalars.get("train/loss", [])]
    tenth = max(1, len(loss) // 10)
    events = {
        tag.split("/", 1)[1]: [(s, v) for s, v in pts]
        for tag, pts in scalars.items()
        if tag.startswith("maintenance/") and tag.endswith("codes_replaced")
    }
    checkpoints = sorted(p.name for p in out.rglob("*.ckpt"))
    return {
        "variant": variant,
        "config": CONFIGS[variant],
        "short_config": str(config_path.relative_to(REPO_ROOT))
        if config_path.is_relative_to(REPO_ROOT)
        else str(config_path),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_images": args.train_images,
        "wall_seconds": wall,
        "peak_rss_gb": peak_kb / 2**20,
        "loss_first_tenth": _mean(loss[:tenth]),
        "loss_last_tenth": _mean(loss[-tenth:]),
        "loss_points": len(loss),
        "maintenance_events": events,
        "checkpoints": checkpoints,
        "pictures": sorted(p.name for p in run_dir.glob("*.png")),
        "summary": {k: v for k, v in summary.items() if k != "files"},
    }


def markdown(result: dict) -> str:
    lines = [
        f"Command: `{result['command']}`. The 256 px configs, model unchanged, on CPU for a short "
        "budget (what changed: `benchmarks/anime_short_run.py`'s docstring; no LPIPS, its "
        "weights are not on this offline machine). Data: the avatar set streamed from the disk "
        "cache. Peak RSS: the `vqkit fit` process and its loader workers, summed (sampled "
        "every 0.5 s).",
        "",
        "| config | steps x batch | loss first / last tenth | k-means events | codes used (val) "
        "| PSNR | images/s | wall | peak RSS |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        s = r["summary"]
        ev = ", ".join(
            f"{k.replace('_codes_replaced', '')} x{len(v)}"
            for k, v in r["maintenance_events"].items()
        )
        lines.append(
            f"| `{r['config']}` | {r['steps']} x {r['batch_size']} | "
            f"{r['loss_first_tenth']:.3f} / {r['loss_last_tenth']:.3f} | {ev or 'none'} | "
            f"{s.get('used_codes', 0)} / {s.get('codebook_size', 0)} | {s.get('psnr', 0):.2f} | "
            f"{s.get('images_per_second', 0):.1f} | {r['wall_seconds'] / 60:.1f} min | "
            f"{r['peak_rss_gb']:.2f} GB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=sorted(CONFIGS), default=["vqvae", "vqgan"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--train-images", type=int, default=60_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "anime_short")
    p.add_argument("--no-write", action="store_true", help="no JSON / BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.steps < 8:
        p.error(f"--steps must be >= 8 (the schedules are quarters of it), got {args.steps}")
    command = "python benchmarks/anime_short_run.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    runs = [run_one(v, args) for v in args.variants]
    result = {
        "benchmark": "anime_short_run",
        "command": command.strip(),
        "machine": machine_info(),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "runs": runs,
    }
    print_json(result)
    print(markdown(result))
    if not args.no_write:
        write_json(result, REPO_ROOT / JSON_REL)
        update_benchmarks_md("anime_short_run", markdown(result))
    return result


if __name__ == "__main__":
    main()

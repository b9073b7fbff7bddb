"""The sparse 3D comparison (seed 001): which quantizer keeps 8,192 codes of a sparse SDF
VQ-VAE alive, and what its k-means costs.

    python benchmarks/sparse3d_study.py            # the full table (~35 min on 2 cores)
    python benchmarks/sparse3d_study.py --quick    # CI-sized check of the whole path (~1 min)

Every row trains the quickstart model of ``configs/sparse3d/quickstart.yaml`` (the same
SparseSDFVQVAE, data, batches, optimizer, schedule and step budget, through
``SparseSDFModule`` under a Lightning ``Trainer``); only the quantizer differs:

- ``none``: the seed's quantizer without k-means (``use_kmeans_reinit: false``): a gradient
  codebook initialized uniform(-1/K, 1/K), the model's original behaviour;
- ``seed-001 (scikit-learn)``: the seed as written (``benchmarks/sparse3d/vqfr.py``): gradient
  codebook, a 16,384-vector reservoir filled with the seed's per-token loop, and every
  ``kmeans_interval`` steps the whole codebook replaced by ``sklearn.cluster.k_means`` on the
  CPU;
- ``seed-001 config on vqkit``: the same JSON keys given to vqkit's drop-in
  (``SparseVectorQuantizer``): k-means on the device, k-means init, optimizer rows reset, a
  dead-code restart;
- ``vqkit default``: the quickstart's quantizer (EMA codebook, k-means init, re-estimation of
  dead codes, dead-code restart).

Figures come from one validation pass over the validation shapes after training (eval mode,
vqkit's ``CodeUsage`` for every row), and the held-out meshes (bunny, teapot, ...) are measured
one by one. k-means time is the wall time inside k-means (scikit-learn's ``k_means`` call, or
the duration vqkit's maintenance events report). The uniform ceiling is the share of codes a
codebook used uniformly would show on as many tokens: ``1 - (1 - 1/K)^N``.

Results: ``benchmarks/results/sparse3d_study.json`` and the ``sparse3d`` section of
BENCHMARKS.md (and the table in ``docs/sparse3d.md``, pasted from it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

try:
    from benchmarks.common import REPO_ROOT, machine_info, update_benchmarks_md, write_json
except ImportError:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import REPO_ROOT, machine_info, update_benchmarks_md, write_json

from benchmarks.sparse3d.vqfr import VQFRQuantizer
from benchmarks.utilization.report import uniform_ceiling

CONFIG = REPO_ROOT / "configs" / "sparse3d" / "quickstart.yaml"
ROWS = ("none", "seed-001 (scikit-learn)", "seed-001 config on vqkit", "vqkit default")


def _load_config() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(CONFIG.read_text())


def build_quantizer(
    row: str, cfg: dict, *, codebook_size: int, interval: int, scale: float = 1.0
) -> torch.nn.Module:
    """The quantizer of ``row`` (dim 64, ``codebook_size`` codes); ``scale`` stretches the
    default's schedule (steps) to a budget other than the config's."""
    from vqkit.configurable import build
    from vqkit.integrations.sparse import SparseVectorQuantizer

    qcfg = cfg["model"]["init_args"]["model"]["init_args"]["quantizer"]
    dim = qcfg["init_args"]["dim"]
    reservoir = 16384  # the seed's
    if row == "none":
        return VQFRQuantizer(dim, codebook_size, use_kmeans_reinit=False)
    if row == "seed-001 (scikit-learn)":
        return VQFRQuantizer(
            dim,
            codebook_size,
            kmeans_interval=interval,
            reservoir_size=max(reservoir, codebook_size),
        )
    if row == "seed-001 config on vqkit":
        return SparseVectorQuantizer(
            codebook_size,
            dim,
            use_kmeans_reinit=True,
            kmeans_interval=interval,
            reservoir_size=max(reservoir, codebook_size),
        )
    if row == "vqkit default":
        qcfg = json.loads(json.dumps(qcfg))
        qcfg["init_args"]["codebook_size"] = codebook_size
        for m in qcfg["init_args"].get("maintenance", []):
            args = m.get("init_args", {})
            if "reservoir_size" in args:
                args["reservoir_size"] = max(args["reservoir_size"], codebook_size)
            for key in ("warmup_steps", "every", "until"):  # the schedule, scaled to the budget
                if args.get(key):
                    args[key] = max(1, round(args[key] * scale))
        return build(qcfg)
    raise ValueError(f"unknown row {row!r}; known: {ROWS}")


class KMeansClock:
    """Sums the durations of vqkit's k-means events (init and re-estimation) of a run."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def collect(self, quantizer: Any) -> None:
        pop = getattr(quantizer, "pop_events", None)
        for e in pop() if pop is not None else []:
            if e.strategy in ("k-means init", "k-means re-estimation") and e.status == "done":
                self.seconds += e.ms / 1000.0
                self.calls += 1


def run_row(row: str, args: argparse.Namespace, cfg: dict) -> dict[str, Any]:
    import lightning as L

    from vqkit.data.sparse3d import ShapeDataModule
    from vqkit.models.sparse3d import SparseSDFVQVAE
    from vqkit.training.sparse3d import SparseSDFModule

    L.seed_everything(args.seed, verbose=False)
    mcfg = cfg["model"]["init_args"]
    arch = {k: v for k, v in mcfg["model"]["init_args"].items() if k != "quantizer"}
    arch["grid"] = args.resolution // arch.get("patch", 4)
    quantizer = build_quantizer(
        row,
        cfg,
        codebook_size=args.codebook_size,
        interval=args.kmeans_interval,
        scale=args.steps / cfg["trainer"]["max_steps"],
    )
    torch.manual_seed(args.seed)  # the same encoder/decoder weights in every row
    model = SparseSDFVQVAE(quantizer, **arch)
    module_args = {k: v for k, v in mcfg.items() if k != "model"}
    module_args["warmup_steps"] = min(module_args.get("warmup_steps", 0), args.steps // 4)
    module_args["resolution"] = args.resolution
    module = SparseSDFModule(model, **module_args)
    dcfg = dict(cfg["data"]["init_args"])
    dcfg.update(
        train_shapes=args.train_shapes, val_shapes=args.val_shapes, resolution=args.resolution
    )
    if args.held_out is not None:
        dcfg["held_out"] = args.held_out
    data = ShapeDataModule(**dcfg)
    clock = KMeansClock()

    class Collect(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *a) -> None:  # noqa: ANN001, ANN002
            clock.collect(pl_module.quantizer)

    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu" if args.cpu else "auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=cfg["trainer"].get("gradient_clip_val"),
        callbacks=[Collect()],
        default_root_dir=str(args.work / row.replace(" ", "_")),
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_seconds = time.perf_counter() - t0
    trainer.limit_val_batches = 1.0
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    stats = module.quantizer.usage.stats("eval")
    tokens = int(stats.tokens)
    summary: dict[str, Any] = {}
    folder = args.work / row.replace(" ", "_")
    folder.mkdir(parents=True, exist_ok=True)
    module.fit_report(trainer, folder, summary)
    kmeans_seconds = getattr(quantizer, "kmeans_seconds", None)
    kmeans_calls = getattr(quantizer, "kmeans_calls", None)
    if kmeans_seconds is None:
        kmeans_seconds, kmeans_calls = clock.seconds, clock.calls
    return {
        "row": row,
        "seed": args.seed,
        "steps": int(trainer.global_step),
        "codebook_size": args.codebook_size,
        "val_tokens": tokens,
        "uniform_ceiling": uniform_ceiling(args.codebook_size, tokens),
        "utilization": float(stats.utilization),
        "used_codes": int(stats.used_codes),
        "perplexity": float(stats.perplexity),
        "shape_used_codes": float(metrics.get("val/shape_used_codes", float("nan"))),
        "shape_used_per_token": float(metrics.get("val/shape_used_per_token", float("nan"))),
        "sdf_l1": float(metrics["val/sdf_l1"]),
        "iou": float(metrics.get("val/iou", float("nan"))),
        "chamfer": float(metrics.get("val/chamfer", float("nan"))),
        "held_out": summary.get("held_out", {}),
        "kmeans_seconds": round(float(kmeans_seconds), 3),
        "kmeans_calls": int(kmeans_calls or 0),
        "run_seconds": round(train_seconds, 1),
    }


def markdown(result: dict[str, Any]) -> str:
    runs = result["runs"]
    first = runs[0]
    lines = [
        f"K = {first['codebook_size']:,} codes, {first['steps']} steps, "
        f"{result['settings']['train_shapes']:,} training shapes, validation on "
        f"{result['settings']['val_shapes']} shapes = {first['val_tokens']:,} patch tokens "
        f"(uniform ceiling {first['uniform_ceiling']:.2%}); seed {first['seed']}.",
        "",
        "| quantizer | codes used (val) | per shape: codes / patches | SDF L1 | IoU | Chamfer "
        "| held-out Chamfer | k-means s (calls) | run s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        held = r["held_out"]
        hc = sum(v["chamfer"] for v in held.values()) / len(held) if held else float("nan")
        lines.append(
            f"| {r['row']} | {r['utilization']:.2%} ({r['used_codes']:,}) | "
            f"{r['shape_used_codes']:.0f} / {r['shape_used_per_token']:.3f} | {r['sdf_l1']:.4f} | "
            f"{r['iou']:.4f} | {r['chamfer']:.4f} | {hc:.4f} | "
            f"{r['kmeans_seconds']:.1f} ({r['kmeans_calls']}) | {r['run_seconds']:.0f} |"
        )
    lines += [
        "",
        "SDF L1 in units of the truncation (2 voxels); IoU of the occupied voxels inside the "
        "active patches; Chamfer in world units (the grid spans [-1, 1]) over the first "
        f"{result['settings']['chamfer_shapes']} validation shapes; held-out Chamfer: the mean "
        "over the npm meshes; per shape: distinct codes of a shape and distinct codes / patches.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a CI-sized run of the whole path")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--codebook-size", type=int, default=None)
    p.add_argument("--kmeans-interval", type=int, default=None)
    p.add_argument("--train-shapes", type=int, default=None)
    p.add_argument("--val-shapes", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None, help="voxels per grid side")
    p.add_argument("--held-out", nargs="*", default=None, help="mesh names ([]: none)")
    p.add_argument("--rows", nargs="*", default=list(ROWS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--work", type=Path, default=Path("runs/sparse3d_study"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-write", action="store_true", help="print only (no JSON, no BENCHMARKS)")
    args = p.parse_args(argv)
    cfg = _load_config()
    trainer_steps = cfg["trainer"]["max_steps"]
    data = cfg["data"]["init_args"]
    if args.quick:
        defaults = dict(
            steps=12,
            codebook_size=128,
            kmeans_interval=5,
            train_shapes=24,
            val_shapes=8,
            resolution=32,
        )
    else:
        defaults = dict(
            steps=trainer_steps,
            codebook_size=cfg["model"]["init_args"]["model"]["init_args"]["quantizer"]["init_args"][
                "codebook_size"
            ],
            kmeans_interval=trainer_steps // 3,
            train_shapes=data["train_shapes"],
            val_shapes=data["val_shapes"],
            resolution=data.get("resolution", 64),
        )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    runs = []
    for row in args.rows:
        t0 = time.perf_counter()
        runs.append(run_row(row, args, cfg))
        print(f"{row}: {time.perf_counter() - t0:.0f} s {json.dumps(runs[-1])}", file=sys.stderr)
    settings = {
        k: getattr(args, k)
        for k in (
            "steps",
            "codebook_size",
            "kmeans_interval",
            "train_shapes",
            "val_shapes",
            "resolution",
            "seed",
        )
    }
    settings["chamfer_shapes"] = cfg["model"]["init_args"].get("chamfer_shapes", 16)
    result = {"settings": settings, "machine": machine_info(), "runs": runs}
    table = markdown(result)
    print(json.dumps(result, indent=2, default=str))
    print(table)
    if not args.no_write and not args.quick:
        out = args.out or REPO_ROOT / "benchmarks" / "results" / "sparse3d_study.json"
        write_json(result, out)
        update_benchmarks_md("sparse3d", "## Sparse 3D tokens (seed 001)\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

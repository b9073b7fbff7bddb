"""Running the study: the data, one row's training run, the shared evaluation, the grid of runs.

``run_study`` trains every (codebook size, row, seed) not yet in the JSON, writes the JSON after
each finished run (so an interrupted study resumes) and returns the result with its summary.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from benchmarks.common import machine_info, write_json
from benchmarks.utilization.report import machine_text
from benchmarks.utilization.rows import (
    ROWS,
    Ctx,
    build_model,
    build_quantizer,
    load_quickstart,
    scale_steps,
    schedule_scale,
)
from torch import Tensor, nn

from vqkit.evaluation.metrics import psnr, ssim
from vqkit.losses import VQLoss
from vqkit.quantize import CodeUsage, reset_optimizer_state
from vqkit.training.schedules import warmup_cosine


# --------------------------------------------------------------------------------- data
@dataclass
class Data:
    train: Any
    val: Tensor
    epoch_steps: int


def load_data(
    quickstart: dict,
    *,
    max_images: int | None,
    val_images: int | None,
    data: str = "emoji",
    train_images: int | None = None,
    flip_p: float = 0.5,
) -> Data:
    """The study's images at the quickstart's size: the bundled Fluent Emoji 3D set and its
    split (``data="emoji"``), or the first ``train_images`` / ``val_images`` avatars of
    ``vqkit.data.avatars`` (drawn on first use; sha256-listed, so not scanned again).

    Training images are augmented as the ``ImageDataModule`` does (colour jitter 0.1), with
    horizontal flips of probability ``flip_p`` (the data module's default 0.5)."""
    if data == "avatars":
        from vqkit.data.avatars import fetch_avatars
        from vqkit.data.images import ImageFolderDataset

        built = fetch_avatars(train_images or max_images or 20_000, val_images or 2_000)

        def dataset(paths: list, augment: bool) -> ImageFolderDataset:
            # the ImageDataModule's augmentation (jitter 0.1), decoded once into memory
            return ImageFolderDataset(
                paths,
                quickstart["image_size"],
                augment=augment,
                flip_p=flip_p,
                validate=False,
                cache=True,
            )

        train = dataset(built.train, True)
        val_set = dataset(built.val, False)
        val = torch.stack([val_set[i] for i in range(len(val_set))])
        return Data(train, val, len(train) // quickstart["batch_size"])
    if data != "emoji":
        raise ValueError(f"data must be 'emoji' or 'avatars', got {data!r}")
    from vqkit.data import ImageDataModule

    dm = ImageDataModule(
        dataset="fluent-emoji-3d",
        image_size=quickstart["image_size"],
        batch_size=quickstart["batch_size"],
        num_workers=0,
        cache_images=True,
        max_images=max_images,
        flip_p=flip_p,
    )
    dm.prepare_data()
    dm.setup("fit")
    val = torch.stack([dm.val_dataset[i] for i in range(len(dm.val_dataset))])
    if val_images is not None:
        val = val[:val_images]
    return Data(dm.train_dataset, val, len(dm.train_dataset) // quickstart["batch_size"])


def train_batches(data: Data, batch_size: int, seed: int) -> Iterator[Tensor]:
    """The quickstart's training stream: ``ResumableLoader`` (seeded order and augmentation)."""
    from vqkit.data.sampler import ResumableLoader

    loader = ResumableLoader(data.train, batch_size=batch_size, seed=seed, num_workers=0)
    while True:
        yield from loader


# --------------------------------------------------------------------------------- measuring
@torch.no_grad()
def evaluate(model: nn.Module, val: Tensor, codebook_size: int, *, full: bool = True) -> dict:
    """Validation figures, counted the same way for every row (indices -> ``CodeUsage``)."""
    was = model.training
    model.eval()
    usage = CodeUsage(codebook_size)
    n, l1, ps, ss = 0, 0.0, 0.0, 0.0
    for i in range(0, len(val), 128):
        x = val[i : i + 128]
        out = model(x)
        usage.update_eval(torch.bincount(out.indices.reshape(-1), minlength=codebook_size))
        rec = out.reconstructions
        b = x.shape[0]
        n += b
        l1 += float(F.l1_loss(rec, x)) * b
        ps += float(psnr(rec, x)) * b
        if full:
            ss += float(ssim(rec, x)) * b
    model.train(was)
    st = usage.stats("eval")
    res = {
        "utilization": st.utilization,
        "used_codes": st.used_codes,
        "perplexity": st.perplexity,
        "normalized_entropy": st.normalized_entropy,
        "dead_codes": st.dead_codes,
        "tokens": st.tokens,
        "l1": l1 / n,
        "psnr": ps / n,
    }
    if full:
        res["ssim"] = ss / n
        res["counts"] = usage.eval_counts.tolist()
    return res


# --------------------------------------------------------------------------------- one run
def run_one(
    name: str,
    codebook_size: int,
    seed: int,
    steps: int,
    data: Data,
    quickstart: dict,
    curve_every: int,
    scale: float,
    curve_images: int | None = None,
    extra_eval: Callable[[nn.Module], dict] | None = None,
) -> dict:
    """Train one row and evaluate it; ``extra_eval(model)`` adds figures of the final model to
    the result (``benchmarks/flip_ablation.py`` counts the training split's codes with it)."""
    ctx = Ctx(
        dim=quickstart["quantizer"]["init_args"]["dim"],
        codebook_size=codebook_size,
        scale=scale,
        epoch_steps=data.epoch_steps,
        quickstart=quickstart,
    )
    torch.manual_seed(seed)
    quantizer = build_quantizer(name, ctx)
    model = build_model(quantizer, quickstart, seed)
    model.train()
    loss_fn = VQLoss()
    hp = quickstart["module"]
    warm = scale_steps(hp["warmup_steps"], scale, floor=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=hp["lr"], betas=tuple(hp["betas"]), weight_decay=hp["weight_decay"]
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            warmup_cosine(
                s,
                base_lr=hp["lr"],
                warmup_steps=warm,
                total_steps=steps,
                start_lr=hp["warmup_start_lr"],
                min_lr=hp["min_lr"],
            )
            / hp["lr"]
        ),
    )
    clip = quickstart["gradient_clip_val"]
    gradient_mode = not quantizer.uses_ema
    batches = train_batches(data, quickstart["batch_size"], seed)
    train_seconds = data_seconds = cpu_seconds = 0.0
    # what vqkit's maintenance reported (rows of other libraries have no events): the time of
    # its k-means calls (part of train_seconds) and the codes the dead-code restart re-placed
    kmeans_ms, kmeans_calls, restarted = 0.0, 0, 0
    pop_events = getattr(quantizer, "pop_events", None)
    step_times: list[float] = []
    curve: list[dict] = []
    torch.manual_seed(seed)  # same global stream (restart picks, sampling) for every row
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        images = next(batches)
        c1, t1 = time.process_time(), time.perf_counter()
        out = model(images)
        total, _ = loss_fn(images, out.reconstructions, out.vq_losses)
        if not torch.isfinite(total):
            raise FloatingPointError(f"row {name}: loss {float(total)} at step {step}")
        opt.zero_grad(set_to_none=True)
        total.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        if gradient_mode and bool(quantizer.replaced_mask.any()):
            reset_optimizer_state(opt, quantizer)
        t2 = time.perf_counter()
        cpu_seconds += time.process_time() - c1
        data_seconds += t1 - t0
        train_seconds += t2 - t1
        step_times.append(t2 - t1)
        for e in pop_events() if pop_events is not None else ():
            if e.status == "done" and e.strategy.startswith("k-means"):
                kmeans_ms, kmeans_calls = kmeans_ms + e.ms, kmeans_calls + 1
            elif e.status == "done" and e.strategy == "dead-code restart":
                restarted += e.codes_replaced
        if step % curve_every == 0 or step == steps:
            # the curve may use the split's first images only (the final figures use all)
            ev = evaluate(model, data.val[:curve_images], codebook_size, full=False)
            curve.append(
                {
                    "step": step,
                    "utilization": ev["utilization"],
                    "normalized_entropy": ev["normalized_entropy"],
                    "psnr": ev["psnr"],
                    "train_seconds": train_seconds,
                }
            )
    final = evaluate(model, data.val, codebook_size)
    if extra_eval is not None:
        final.update(extra_eval(model))
    return {
        "row": name,
        "codebook_size": codebook_size,
        "seed": seed,
        "steps": steps,
        **final,
        "train_seconds": train_seconds,
        "data_seconds": data_seconds,
        # CPU time of the training steps (all threads): less sensitive to a shared machine.
        "train_cpu_seconds": cpu_seconds,
        "median_step_seconds": statistics.median(step_times),
        "replacements": int(getattr(quantizer, "num_replacements", 0)),
        "kmeans_seconds": kmeans_ms / 1000.0,
        "kmeans_calls": kmeans_calls,
        "restarted_codes": restarted,
        "curve": curve,
    }


# --------------------------------------------------------------------------------- summary
FIELDS = (
    "utilization",
    "used_codes",
    "perplexity",
    "normalized_entropy",
    "dead_codes",
    "l1",
    "psnr",
    "ssim",
    "train_seconds",
    "train_cpu_seconds",
)


def summarize(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """{codebook_size: {row: {field: mean, 'per_seed': {...}}}} over the finished runs."""
    out: dict[str, dict[str, dict]] = {}
    for r in runs:
        out.setdefault(str(r["codebook_size"]), {}).setdefault(r["row"], {"runs": []})
        out[str(r["codebook_size"])][r["row"]]["runs"].append(r)
    for rows in out.values():
        for d in rows.values():
            rs = sorted(d.pop("runs"), key=lambda r: r["seed"])
            for f in FIELDS:
                d[f] = sum(r[f] for r in rs) / len(rs)
            d["seeds"] = [r["seed"] for r in rs]
            d["per_seed"] = {f: [r[f] for r in rs] for f in FIELDS}
    return out


# --------------------------------------------------------------------------------- the grid
# studies stored before a setting existed ran with these values: the data module's flips, the
# bundled emoji set (before --data), curves on the whole validation split (before --curve-images)
_BEFORE = {"flip_p": lambda s: 0.5, "data": lambda s: "emoji"}
_BEFORE["curve_images"] = lambda s: s.get("val_images")


def setting(settings: dict, key: str) -> object:
    """A stored study's setting, or the value it ran with before the setting existed."""
    if key in settings:
        return settings[key]
    return _BEFORE[key](settings) if key in _BEFORE else None


def settings_clash(a: dict, b: dict, keys: tuple[str, ...]) -> dict[str, tuple]:
    """The settings among ``keys`` on which two studies differ: {key: (a's, b's)}."""
    pairs = {k: (setting(a, k), setting(b, k)) for k in keys}
    return {k: v for k, v in pairs.items() if v[0] != v[1]}


def _resume(json_path: Path, settings: dict, steps_for: dict[int, int]) -> list[dict]:
    """The finished runs stored in ``json_path`` that this study can keep: it refuses runs made
    with other settings and drops those of another step budget."""
    old = json.loads(json_path.read_text())
    keep = ("quick", "threads", "batch_size", "image_size", "val_images", "train_images")
    clash = settings_clash(old["settings"], settings, (*keep, "flip_p"))
    if clash:
        raise SystemExit(
            f"{json_path} holds runs made with other settings {clash} (stored, requested); "
            "pass --fresh to start over or --out to write elsewhere"
        )
    runs = []
    for r in old["runs"]:
        if r["steps"] == steps_for.get(r["codebook_size"], r["steps"]):
            runs.append(r)
        else:
            print(
                f"dropping stored K={r['codebook_size']} {r['row']} seed {r['seed']}: "
                f"{r['steps']} steps, this run uses {steps_for[r['codebook_size']]}",
                flush=True,
            )
    return runs


def run_study(
    *,
    rows: list[str],
    seeds: list[int],
    codebook_sizes: list[int],
    steps: int,
    steps_large: int | None,
    curve_every: int | None,
    threads: int,
    quick: bool,
    json_path: Path,
    fresh: bool,
    command: str,
    data: str = "emoji",
    train_images: int | None = None,
    val_images: int | None = None,
    curve_images: int | None = None,
    flip_p: float = 0.5,
) -> dict:
    """Train every (codebook size, row, seed) not already in ``json_path`` (unless ``fresh``),
    writing the JSON after each run; return the result with its ``summary``. ``steps`` is the
    budget at K <= 1024, ``steps_large`` at larger K (default half of ``steps``); ``quick``
    trains on 800 images and validates on 64."""
    quickstart = load_quickstart()
    steps_for = {
        k: steps if k <= 1024 else (steps_large or max(1, steps // 2)) for k in codebook_sizes
    }
    every = {k: curve_every or max(1, v // 10) for k, v in steps_for.items()}
    reach = quickstart["schedule_reach"]
    scale = {k: schedule_scale(v, reach) for k, v in steps_for.items()}
    dataset = data
    data = load_data(
        quickstart,
        max_images=800 if quick else None,
        val_images=(64 if quick else None) if val_images is None else val_images,
        data=dataset,
        train_images=train_images,
        flip_p=flip_p,
    )
    grid = data.val.shape[-1] // (2 ** (len(quickstart["model"]["channel_mult"]) - 1))
    settings = {
        "data": dataset,
        "curve_images": min(curve_images or len(data.val), len(data.val)),
        "quick": quick,
        "steps": {str(k): v for k, v in steps_for.items()},
        "curve_every": every[codebook_sizes[0]],
        "schedule_scale": scale[codebook_sizes[0]],
        "seeds": seeds,
        "threads": threads,
        "batch_size": quickstart["batch_size"],
        "image_size": quickstart["image_size"],
        "flip_p": flip_p,
        "val_images": int(data.val.shape[0]),
        "tokens_per_image": grid * grid,
        "train_images": len(data.train),
        "steps_per_epoch": data.epoch_steps,
    }
    runs: list[dict] = []
    if json_path.exists() and not fresh:
        runs = _resume(json_path, settings, steps_for)
        settings["seeds"] = sorted(set(seeds) | {r["seed"] for r in runs})
    result = {
        "benchmark": json_path.stem,
        "command": command,
        "machine": machine_info(),
        "settings": settings,
        "rows": {
            n: {"number": ROWS[n].number, "title": ROWS[n].title, "recipe": ROWS[n].recipe}
            for n in ROWS
        },
        "runs": runs,
    }
    done = {(r["codebook_size"], r["row"], r["seed"]) for r in runs}
    for k in codebook_sizes:
        for name in rows:
            for seed in seeds:
                if (k, name, seed) in done:
                    print(f"skip K={k} {name} seed {seed} (in {json_path})", flush=True)
                    continue
                t0 = time.perf_counter()
                r = run_one(
                    name, k, seed, steps_for[k], data, quickstart, every[k], scale[k], curve_images
                )
                runs.append(r)
                print(
                    f"K={k} {name:12s} seed {seed}: util {r['utilization']:.3f} "
                    f"H {r['normalized_entropy']:.3f} PSNR {r['psnr']:.2f} "
                    f"train {r['train_seconds']:.1f} s "
                    f"(wall {time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )
                result["summary"] = summarize(runs)
                json_path.parent.mkdir(parents=True, exist_ok=True)
                write_json(result, json_path)
    result["summary"] = summarize(runs)
    return result


# --------------------------------------------------------------------------------- merging
MERGE_KEEP = ("data", "quick", "threads", "batch_size", "image_size", "val_images")
MERGE_KEEP += ("train_images", "flip_p", "tokens_per_image", "curve_images")


def merge_studies(paths: list[Path]) -> dict:
    """One study from the JSONs of several (``--out`` runs made in parallel, or on several
    machines): their runs together, refused when a setting that changes the figures differs.
    A (codebook size, row, seed) run found twice is kept once, from the first file."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    base = results[0]
    for path, r in zip(paths[1:], results[1:], strict=True):
        clash = settings_clash(base["settings"], r["settings"], MERGE_KEEP)
        if clash:
            raise SystemExit(f"{path}: other settings than {paths[0]}: {clash}")
    settings = dict(base["settings"])
    settings["steps"] = {}
    runs, seen = [], set()
    for r in results:
        for k, v in r["settings"]["steps"].items():
            if settings["steps"].setdefault(k, v) != v:
                raise SystemExit(f"K={k}: step budgets {settings['steps'][k]} and {v} differ")
        for run in r["runs"]:
            key = (run["codebook_size"], run["row"], run["seed"])
            if key not in seen:
                seen.add(key)
                runs.append(run)
    settings["seeds"] = sorted({r["seed"] for r in runs})
    result = dict(base)
    result.update(
        settings=settings,
        runs=runs,
        command="\n".join(dict.fromkeys(r["command"] for r in results)),
        summary=summarize(runs),
    )
    result.pop("machines", None)
    machines: dict[str, list[str]] = {}
    for r in results:  # a merged part keeps the machines it was merged from
        for part in r.get("machines") or [
            {"machine": machine_text(r["machine"]), "commands": r["command"].splitlines()}
        ]:
            machines.setdefault(part["machine"], []).extend(part["commands"])
    if len(machines) > 1:
        result["machines"] = [
            {"machine": m, "commands": list(dict.fromkeys(c))} for m, c in machines.items()
        ]
    return result

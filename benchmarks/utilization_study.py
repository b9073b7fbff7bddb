"""The utilization study (issue 6): which codebook strategy keeps every code alive, on real images.

    python benchmarks/utilization_study.py                      # the full table, K=1024, 2 seeds
    python benchmarks/utilization_study.py --codebook-sizes 1024 8192
    python benchmarks/utilization_study.py --quick              # CI-sized check (~1 minute)

The full table (11 rows x 2 seeds x 1,000 steps at K=1024) is estimated at 1-1.5 hours on 2 idle
cores with ``--threads 2`` (at most ~1 h 52 min at the quickstart's Lightning step rate); how
that was estimated is in ``docs/utilization_study.md`` until the generated page replaces it.

Every row trains the quickstart model (``configs/quickstart.yaml``: 32 px, base 32, mult
[1, 2, 2], z 64, quantizer dim 64) on the bundled Fluent Emoji 3D set with the same split, the
same batches (the quickstart's seeded, resumable loader and augmentation), the same AdamW +
warm-up/cosine schedule, gradient clipping and step budget; only the quantizer differs. For a
seed index ``s`` the encoder/decoder start from the same weights and see the same batches in
every row. The loop is a plain PyTorch loop doing what ``VQTokenizerModule`` does under
Lightning (forward, ``VQLoss``, backward, clip, AdamW, scheduler, optimizer-row reset after a
gradient-mode codebook reset); training time is the sum of the step times, validation excluded.

Validation figures come from one function for every row: the validation split is encoded in
eval mode and the returned indices are counted by ``vqkit.CodeUsage`` (eval horizon), so the
peer (``vector_quantize_pytorch``, row 10) is measured by exactly the same code. The curve is the
validation-split utilization every ``--curve-every`` steps (not a training-window figure).

Results go to ``benchmarks/results/utilization_study.json`` (written after every finished run, so
an interrupted study resumes where it stopped; ``--fresh`` starts over) and
``docs/utilization_study.md`` with PNGs under ``docs/images/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

try:
    from benchmarks.common import REPO_ROOT, machine_info, write_json
except ImportError:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import REPO_ROOT, machine_info, write_json

from vqkit.evaluation.metrics import psnr, ssim
from vqkit.losses import VQLoss
from vqkit.models import ResNetVQModel
from vqkit.quantize import (
    CodeUsage,
    DeadCodeRestart,
    EMAUpdate,
    EntropyPenalty,
    KMeansInit,
    KMeansReestimate,
    LowUsageReset,
    QuantizerOutput,
    VectorQuantizer,
    reset_optimizer_state,
)
from vqkit.quantize.distance import nearest
from vqkit.training.schedules import warmup_cosine

CONFIG = REPO_ROOT / "configs" / "quickstart.yaml"
JSON_REL = Path("benchmarks/results/utilization_study.json")
MD_REL = Path("docs/utilization_study.md")
IMG_REL = Path("docs/images")
QUICK_ROWS = ("plain", "default", "peer")
DEFAULT_STEPS = 1000

# Issue 6's targets for the default row.
TARGET_UTILIZATION = 0.99
TARGET_ENTROPY = 0.95
TARGET_PSNR_MARGIN = 0.1
TARGET_TIME_RATIO = 1.1


# --------------------------------------------------------------------------------- quickstart
def load_quickstart(path: Path = CONFIG) -> dict[str, Any]:
    """Everything the study takes from the quickstart YAML, so no figure can drift from it."""
    cfg = yaml.safe_load(path.read_text())
    model_args = dict(cfg["model"]["model"]["init_args"])
    quantizer = model_args.pop("quantizer")
    import inspect

    from vqkit.training import VQTokenizerModule

    sig = inspect.signature(VQTokenizerModule.__init__).parameters
    module = {k: cfg["model"].get(k, sig[k].default) for k in ("lr", "betas", "weight_decay")}
    module.update(
        {k: cfg["model"].get(k, sig[k].default) for k in ("warmup_steps", "warmup_start_lr")}
    )
    module["min_lr"] = cfg["model"].get("min_lr", sig["min_lr"].default)
    qargs = quantizer["init_args"]
    # The last step at which any of the default's schedules acts: budgets below it scale them.
    reach = [module["warmup_steps"]]
    for m in qargs.get("maintenance", []):
        a = m.get("init_args", {})
        reach += [a.get("warmup_steps", 0), a.get("until", 0)]
    return {
        "model": model_args,
        "quantizer": quantizer,
        "module": module,
        "batch_size": cfg["data"]["batch_size"],
        "image_size": cfg["data"]["image_size"],
        "gradient_clip_val": cfg["trainer"].get("gradient_clip_val"),
        "schedule_reach": max(reach),
    }


def _scaled_quantizer_config(qcfg: dict, codebook_size: int, scale: float) -> dict:
    """The YAML's quantizer with another codebook size and its step counts times ``scale``."""
    q = copy.deepcopy(qcfg)
    q["init_args"]["codebook_size"] = codebook_size
    if scale != 1.0:
        for m in q["init_args"].get("maintenance", []):
            a = m.setdefault("init_args", {})
            for key in ("warmup_steps", "every", "until"):
                if key in a:
                    a[key] = _scale(a[key], scale, floor=0 if key == "warmup_steps" else 1)
    return q


def build_from_config(qcfg: dict) -> VectorQuantizer:
    """Instantiate a ``class_path`` / ``init_args`` quantizer config with the CLI's parser."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--quantizer", type=VectorQuantizer)
    cfg = parser.parse_object({"quantizer": qcfg})
    return parser.instantiate_classes(cfg).quantizer


def schedule_scale(steps: int, reach: int) -> float:
    """1 (the YAML's own schedules) for budgets of at least half the default's reach (its last
    scheduled step, 1000); shorter budgets (``--quick``) scale every step count of the
    schedules and the LR warm-up by ``steps / reach`` so that they still fire."""
    return 1.0 if steps >= reach / 2 else steps / reach


def _scale(n: int, scale: float, floor: int = 1) -> int:
    return max(floor, round(n * scale)) if n else n


# --------------------------------------------------------------------------------- row 10
class PeerQuantizer(nn.Module):
    """``vector_quantize_pytorch.VectorQuantize`` presented as the quantizer ``VQModel`` and
    ``VQTokenizerModule`` expect: a ``QuantizerOutput`` from ``forward``, ``encode``/``decode``,
    ``codebook_size``/``dim``/``channel_first``, ``uses_ema`` (its codebook is an EMA buffer, no
    optimizer parameter), an empty ``replaced_mask`` and a ``CodeUsage`` fed from the indices it
    returns (so its usage is counted by vqkit's code, like every other row)."""

    channel_first = True

    def __init__(self, dim: int, codebook_size: int, **peer_kwargs: Any) -> None:
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        try:  # its k-means init warns through loguru on every tiny batch
            from loguru import logger

            logger.disable("vector_quantize_pytorch")
        except ImportError:
            pass
        self.vq = VectorQuantize(
            dim=dim, codebook_size=codebook_size, accept_image_fmap=True, **peer_kwargs
        )
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = dim
        self.maintenance = nn.ModuleList()
        self.usage = CodeUsage(codebook_size)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("replaced_mask", torch.zeros(codebook_size, dtype=torch.bool))
        self.register_buffer("num_replacements", torch.zeros((), dtype=torch.long))

    @property
    def uses_ema(self) -> bool:
        return not any(p.requires_grad for p in self.vq._codebook.parameters())

    @property
    def current_step(self) -> int:
        return int(self.step)

    def forward(self, x: Tensor) -> QuantizerOutput:
        quantized, indices, loss = self.vq(x)
        counts = torch.bincount(indices.reshape(-1), minlength=self.codebook_size)
        if self.training:
            self.usage.update_train(counts)
            self.step.add_(1)
        else:
            self.usage.update_eval(counts)
        loss = loss.sum()
        p = counts.float() / counts.sum().clamp_min(1)
        ppl = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
        return QuantizerOutput(
            quantized=quantized,
            indices=indices,
            loss=loss,
            losses={"commitment": loss},
            used_codes=(counts > 0).sum(),
            perplexity=ppl,
        )

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        flat = x.movedim(1, -1)
        idx, _ = nearest(flat.reshape(-1, self.dim).float(), self.vq.codebook.float())
        return idx.view(flat.shape[:-1])

    def decode(self, indices: Tensor) -> Tensor:
        return self.vq.get_codes_from_indices(indices.long())


# --------------------------------------------------------------------------------- the rows
@dataclass(frozen=True)
class Ctx:
    dim: int
    codebook_size: int
    scale: float  # step counts of every schedule are multiplied by it (budgets < reach)
    epoch_steps: int  # optimizer steps per pass over the training split
    quickstart: dict


def _vq(ctx: Ctx, **kw: Any) -> VectorQuantizer:
    return VectorQuantizer(ctx.dim, ctx.codebook_size, channel_first=True, **kw)


def _default_schedule(ctx: Ctx) -> dict[str, dict]:
    """The quickstart default's strategies (scaled like it), by class name."""
    q = _scaled_quantizer_config(ctx.quickstart["quantizer"], ctx.codebook_size, ctx.scale)
    return {
        m["class_path"].rsplit(".", 1)[-1]: dict(m.get("init_args", {}))
        for m in q["init_args"].get("maintenance", [])
    }


def _init(ctx: Ctx) -> KMeansInit:
    return KMeansInit(**_default_schedule(ctx)["KMeansInit"])


def _reestimate(ctx: Ctx, mode: str) -> KMeansReestimate:
    args = dict(_default_schedule(ctx)["KMeansReestimate"])
    args["mode"] = mode
    return KMeansReestimate(**args)


def _taming(ctx: Ctx, **kw: Any) -> VectorQuantizer:
    # taming's VectorQuantizer2: U(-1/K, 1/K) codes, beta 0.25 on the commitment term.
    return _vq(ctx, codebook_init="uniform", commitment_weight=0.25, **kw)


@dataclass(frozen=True)
class Row:
    number: int
    title: str
    build: Callable[[Ctx], nn.Module]
    recipe: str


ROWS: dict[str, Row] = {
    "plain": Row(
        1,
        "plain VQ (gradient)",
        lambda c: _taming(c),
        "taming VectorQuantizer2: gradient codebook, U(-1/K,1/K) init, beta 0.25, no maintenance",
    ),
    "ema": Row(
        2,
        "EMA 0.99",
        lambda c: _vq(c, ema=EMAUpdate(decay=0.99)),
        "EMAUpdate(decay=0.99), N(0,1) init",
    ),
    "ema_restart": Row(
        3,
        "EMA + dead-code restart",
        lambda c: _vq(c, ema=EMAUpdate(decay=0.99), maintenance=[DeadCodeRestart(threshold=2.0)]),
        "EMAUpdate(0.99) + DeadCodeRestart(threshold=2, source='batch'): codes whose EMA "
        "count < 2 restart at this batch's encoder outputs (vector-quantize-pytorch / encodec)",
    ),
    "kmeans_init": Row(
        4,
        "EMA + k-means init",
        lambda c: _vq(c, ema=EMAUpdate(decay=0.99), maintenance=[_init(c)]),
        "EMAUpdate(0.99) + KMeansInit after the default's warm-up (pass-through while the "
        "reservoir fills)",
    ),
    "vqfr_full": Row(
        5,
        "VQFR full re-estimation",
        lambda c: _vq(c, ema=EMAUpdate(decay=0.99), maintenance=[_init(c), _reestimate(c, "full")]),
        "EMAUpdate(0.99) + KMeansInit(warm-up) + KMeansReestimate(mode='full'): VQFR's "
        "periodic whole-codebook k-means from a 16,384-vector reservoir, on the default's "
        "schedule (row 6 differs only in the mode)",
    ),
    "vqkit_dead": Row(
        6,
        "vqkit dead-mode re-estimation",
        lambda c: _vq(c, ema=EMAUpdate(decay=0.99), maintenance=[_init(c), _reestimate(c, "dead")]),
        "EMAUpdate(0.99) + KMeansInit(warm-up) + KMeansReestimate(mode='dead'): only codes "
        "unused since the last re-estimation are re-placed, live codes frozen",
    ),
    "cosine8": Row(
        7,
        "cosine, codebook_dim 8",
        lambda c: _taming(c, distance="cosine", codebook_dim=8),
        "LlamaGen: gradient codebook, L2-normalized codes and inputs (distance='cosine'), "
        "codebook_dim=8 with linear projections in/out, beta 0.25",
    ),
    "entropy": Row(
        8,
        "entropy penalty",
        lambda c: _taming(c, regularizers=[EntropyPenalty(weight=0.1, temperature=1.0)]),
        "row 1 + EntropyPenalty(weight=0.1, temperature=1.0) (per-token entropy minus "
        "batch-average entropy)",
    ),
    "seed002": Row(
        9,
        "seed 002 recipe",
        lambda c: _vq(
            c,
            codebook_init="uniform",
            ema=EMAUpdate(decay=0.7),
            sample_temperature=2.5,
            regularizers=[EntropyPenalty(weight=2.0)],
            maintenance=[LowUsageReset(fraction=0.3, every=c.epoch_steps)],
        ),
        "EMA decay 0.7 -> EMAUpdate(decay=0.7); temperature 2.5 -> sample_temperature=2.5 "
        "(training assignments sampled from softmax(-d/2.5), eval nearest); entropy weight "
        "2.0 -> EntropyPenalty(weight=2.0); 30% low-usage reset every epoch -> "
        "LowUsageReset(fraction=0.3, every=<steps per epoch>) (the library's: the 30% "
        "least-used codes since the last reset restart at batch vectors); "
        "codebook_init 'uniform' as the seed's config. Not taken: its codebook size 64 and "
        "commitment beta 10 (the study holds K and the losses fixed)",
    ),
    "peer": Row(
        10,
        "vector-quantize-pytorch",
        lambda c: PeerQuantizer(
            c.dim, c.codebook_size, kmeans_init=True, threshold_ema_dead_code=2
        ),
        "vector_quantize_pytorch.VectorQuantize(dim, codebook_size, kmeans_init=True, "
        "threshold_ema_dead_code=2), its defaults otherwise (decay 0.8, commitment 1.0, "
        "rotation trick), through the PeerQuantizer adapter",
    ),
    "default": Row(
        11,
        "vqkit default (quickstart)",
        lambda c: build_from_config(
            _scaled_quantizer_config(c.quickstart["quantizer"], c.codebook_size, c.scale)
        ),
        "the quantizer of configs/quickstart.yaml, read from the YAML by the CLI's parser",
    ),
}


def build_quantizer(name: str, ctx: Ctx) -> nn.Module:
    if name not in ROWS:
        raise ValueError(f"unknown row {name!r}; rows are {list(ROWS)}")
    return ROWS[name].build(ctx)


def build_model(quantizer: nn.Module, quickstart: dict, seed: int) -> ResNetVQModel:
    """The quickstart model around ``quantizer``; encoder/decoder weights depend on ``seed``
    only, whatever the quantizer consumed of the random stream."""
    shape = quickstart["model"]
    holder = quantizer
    if not isinstance(quantizer, VectorQuantizer):
        holder = VectorQuantizer(quantizer.dim, 2, channel_first=True)
    torch.manual_seed(seed)
    model = ResNetVQModel(holder, **shape)
    if holder is not quantizer:
        model.quantizer = quantizer
    return model


# --------------------------------------------------------------------------------- data
@dataclass
class Data:
    train: Any
    val: Tensor
    epoch_steps: int


def load_data(quickstart: dict, *, max_images: int | None, val_images: int | None) -> Data:
    from vqkit.data import ImageDataModule

    dm = ImageDataModule(
        dataset="fluent-emoji-3d",
        image_size=quickstart["image_size"],
        batch_size=quickstart["batch_size"],
        num_workers=0,
        cache_images=True,
        max_images=max_images,
    )
    dm.prepare_data()
    dm.setup("fit")
    val = torch.stack([dm.val_dataset[i] for i in range(len(dm.val_dataset))])
    if val_images is not None:
        val = val[:val_images]
    return Data(dm.train_dataset, val, len(dm.train_dataset) // quickstart["batch_size"])


def train_batches(data: Data, batch_size: int, seed: int):  # noqa: ANN201
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


def run_one(
    name: str,
    codebook_size: int,
    seed: int,
    steps: int,
    data: Data,
    quickstart: dict,
    curve_every: int,
    scale: float,
) -> dict:
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
    warm = _scale(hp["warmup_steps"], scale, floor=0)
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
        if step % curve_every == 0 or step == steps:
            ev = evaluate(model, data.val, codebook_size, full=False)
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
        "curve": curve,
    }


# --------------------------------------------------------------------------------- report
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


def _ordered(rows: dict) -> list[str]:
    return sorted(rows, key=lambda n: ROWS[n].number if n in ROWS else 99)


def _style(name: str, i: int, cmap: Any) -> dict:
    # the default stands out in black, the peer dashed; the others take tab10 in row order
    if name == "default":
        return {"color": "black", "lw": 2.2}
    return {"color": cmap(i % 10), "lw": 1.4, "ls": "--" if name == "peer" else "-"}


def plot(runs: list[dict], summary: dict, img_dir: Path) -> dict[str, list[Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    for k, rows in summary.items():
        names = _ordered(rows)
        cmap = plt.get_cmap("tab10")
        fig, ax = plt.subplots(figsize=(8, 4.8))
        for i, name in enumerate(names):
            rs = [r for r in runs if r["row"] == name and str(r["codebook_size"]) == k]
            steps = [p["step"] for p in rs[0]["curve"]]
            util = [
                sum(r["curve"][j]["utilization"] for r in rs) / len(rs) for j in range(len(steps))
            ]
            ax.plot(
                steps,
                util,
                marker=".",
                label=f"{ROWS[name].number} {name}",
                **_style(name, i, cmap),
            )
        ax.set_xlabel("training step")
        ax.set_ylabel("validation-split utilization")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"Codebook utilization over training, K={k} (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        curves = img_dir / f"utilization_study_curves_K{k}.png"
        fig.savefig(curves, dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(8, 4.8))
        for i, name in enumerate(names):
            rs = [r for r in runs if r["row"] == name and str(r["codebook_size"]) == k]
            sorted_counts = [
                torch.tensor(r["counts"], dtype=torch.float64).sort(descending=True).values
                for r in rs
            ]
            mean = torch.stack(sorted_counts).mean(0)
            share = mean / mean.sum().clamp_min(1)
            rank = torch.arange(1, len(share) + 1)
            keep = share > 0
            ax.loglog(
                rank[keep],
                share[keep],
                label=f"{ROWS[name].number} {name}",
                **_style(name, i, cmap),
            )
        ax.axhline(1 / int(k), color="k", lw=0.8, ls="--", label="uniform 1/K")
        ax.set_xlabel("code rank")
        ax.set_ylabel("share of validation tokens")
        ax.set_title(f"Rank-frequency of validation code use, K={k} (seed mean)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        rankf = img_dir / f"utilization_study_rank_frequency_K{k}.png"
        fig.savefig(rankf, dpi=110)
        plt.close(fig)
        written[k] = [curves, rankf]
    return written


def _f(x: float, nd: int = 3) -> str:
    return f"{x:.{nd}f}"


def uniform_ceiling(codebook_size: int, tokens: int) -> float:
    """Expected fraction of ``codebook_size`` codes hit by ``tokens`` draws from the uniform
    distribution, 1 - (1 - 1/K)^N: what a perfectly even codebook shows on a split of that size."""
    return 1.0 - (1.0 - 1.0 / codebook_size) ** tokens


def findings(k: str, rows: dict, tokens: int | None = None) -> list[str]:
    """One paragraph per finding, every statement computed from the numbers. ``tokens``: the
    validation split's token count (for the uniform-use ceiling)."""
    out: list[str] = []
    ceiling = uniform_ceiling(int(k), tokens) if tokens else None
    if ceiling is not None and ceiling < TARGET_UTILIZATION:
        best = max(_ordered(rows), key=lambda n: rows[n]["utilization"])
        out.append(
            f"**Ceiling.** {tokens} validation tokens cannot hit all {k} codes: drawn from a "
            f"perfectly even codebook they would hit {100 * ceiling:.1f}% of them on average "
            f"(1 - (1 - 1/K)^N), so the {TARGET_UTILIZATION:.0%} target is out of reach of every "
            f"row at this size. The highest, row {ROWS[best].number} `{best}`, reaches "
            f"{100 * rows[best]['utilization']:.1f}%, {rows[best]['utilization'] / ceiling:.2f} of "
            "the ceiling."
        )
    names = _ordered(rows)
    collapsed = [n for n in names if rows[n]["utilization"] < 0.25]
    partial = [n for n in names if 0.25 <= rows[n]["utilization"] < 0.9]
    full = [n for n in names if rows[n]["utilization"] >= 0.99]

    def lst(ns: list[str]) -> str:
        return ", ".join(
            f"{ROWS[n].number} `{n}` ({100 * rows[n]['utilization']:.1f}%)" for n in ns
        )

    out.append(
        "**Collapse.** "
        + (
            f"Rows using under 25% of the codes: {lst(collapsed)}. "
            if collapsed
            else "No row uses under 25% of the codes. "
        )
        + (f"Partly used (25-90%): {lst(partial)}. " if partial else "")
        + (f"At least 99% used: {lst(full)}." if full else "No row reaches 99% utilization.")
    )
    best_psnr = max(names, key=lambda n: rows[n]["psnr"])
    best_util = max(names, key=lambda n: (rows[n]["utilization"], rows[n]["normalized_entropy"]))
    worst_psnr = min(names, key=lambda n: rows[n]["psnr"])
    out.append(
        f"**Reconstruction.** Best validation PSNR: row {ROWS[best_psnr].number} `{best_psnr}` "
        f"({_f(rows[best_psnr]['psnr'], 2)} dB, SSIM {_f(rows[best_psnr]['ssim'])}); worst: row "
        f"{ROWS[worst_psnr].number} `{worst_psnr}` ({_f(rows[worst_psnr]['psnr'], 2)} dB). "
        f"Highest utilization: row {ROWS[best_util].number} `{best_util}` "
        f"({100 * rows[best_util]['utilization']:.1f}%, normalized entropy "
        f"{_f(rows[best_util]['normalized_entropy'])})."
    )
    if "default" in rows:
        d = rows["default"]
        others = [n for n in names if n != "default"]
        checks = [
            (
                f"utilization >= {TARGET_UTILIZATION:.0%}",
                d["utilization"] >= TARGET_UTILIZATION,
                f"{100 * d['utilization']:.2f}% ({d['used_codes']:.1f} of {k} codes)",
            ),
            (
                f"normalized entropy >= {TARGET_ENTROPY}",
                d["normalized_entropy"] >= TARGET_ENTROPY,
                _f(d["normalized_entropy"]),
            ),
        ]
        if others:
            bo = max(others, key=lambda n: rows[n]["psnr"])
            checks.append(
                (
                    f"PSNR >= best other row - {TARGET_PSNR_MARGIN} dB",
                    d["psnr"] >= rows[bo]["psnr"] - TARGET_PSNR_MARGIN,
                    f"{_f(d['psnr'], 2)} dB vs row {ROWS[bo].number} `{bo}` "
                    f"{_f(rows[bo]['psnr'], 2)} dB",
                )
            )
        if "peer" in rows:
            p = rows["peer"]
            ratio = d["train_seconds"] / p["train_seconds"]
            checks += [
                (
                    "utilization above the peer (row 10)",
                    d["utilization"] > p["utilization"],
                    f"{100 * d['utilization']:.2f}% vs {100 * p['utilization']:.2f}%",
                ),
                (
                    "PSNR above the peer",
                    d["psnr"] > p["psnr"],
                    f"{_f(d['psnr'], 2)} vs {_f(p['psnr'], 2)} dB",
                ),
                (
                    f"training time <= {TARGET_TIME_RATIO}x the peer's",
                    ratio <= TARGET_TIME_RATIO,
                    f"{d['train_seconds']:.0f} s vs {p['train_seconds']:.0f} s ({ratio:.2f}x)",
                ),
            ]
        met = sum(ok for _, ok, _ in checks)
        scope = "" if int(k) == 1024 else ", set for K=1024 and shown here for reference"
        out.append(
            f"**The default against issue 6's targets ({met} of {len(checks)} met{scope}).** "
            + "; ".join(f"{name}: {'met' if ok else 'MISSED'} ({val})" for name, ok, val in checks)
            + "."
        )
    if "seed002" in rows:
        s = rows["seed002"]
        hope = (
            "inside"
            if 0.3 <= s["utilization"] <= 0.5
            else ("above" if s["utilization"] > 0.5 else "below")
        )
        out.append(
            f"**Seed 002's recipe** uses {100 * s['utilization']:.1f}% of the codes "
            f"(normalized entropy {_f(s['normalized_entropy'])}, PSNR {_f(s['psnr'], 2)} dB): "
            f"{hope} the 30-50% the seed hoped for."
        )
    if "plain" in rows:
        base = rows["plain"]["train_seconds"]
        costs = ", ".join(
            f"{ROWS[n].number} `{n}` {rows[n]['train_seconds'] / base:.2f}x"
            for n in names
            if n != "plain"
        )
        out.append(
            f"**Training time** relative to row 1 (plain, {base:.0f} s): {costs}. "
            "Times are the sum of training-step times, validation excluded."
        )
    spread = max(
        names,
        key=lambda n: (
            max(rows[n]["per_seed"]["utilization"]) - min(rows[n]["per_seed"]["utilization"])
        ),
    )
    su = rows[spread]["per_seed"]["utilization"]
    if len(su) > 1:
        out.append(
            f"**Seeds.** The largest seed-to-seed spread in utilization is row "
            f"{ROWS[spread].number} `{spread}`: "
            + " / ".join(f"{100 * u:.1f}%" for u in su)
            + "; per-seed figures are in the JSON."
        )
    return out


def markdown(result: dict, images: dict[str, list[Path]], md_path: Path) -> str:
    s = result["settings"]
    lines = [
        "# Codebook utilization study",
        "",
        "Generated by `benchmarks/utilization_study.py` (issue 6) from "
        f"`{JSON_REL}`; do not edit by hand.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine'].get('processor')}, {result['machine'].get('cpu_cores')} "
        f"cores, torch {result['machine'].get('torch')}, {s['threads']} threads.",
        "",
        "Setup: the quickstart model (`configs/quickstart.yaml`) on the bundled Fluent Emoji 3D "
        f"set, {s['image_size']} px, batch {s['batch_size']}, the same split, batches, AdamW + "
        "warm-up/cosine schedule and seeds for every row; step budget "
        + ", ".join(f"{v} steps at K={k}" for k, v in s["steps"].items())
        + f"; seeds {s['seeds']}. Schedules of the maintenance strategies (and the LR warm-up) "
        f"are the quickstart's scaled by {s['schedule_scale']}"
        + (" (the YAML's own numbers)" if s["schedule_scale"] == 1.0 else "")
        + f". Validation: {s['val_images']} held-out images "
        f"({s['val_images'] * s['tokens_per_image']} tokens), indices counted by "
        "`vqkit.CodeUsage` for every row (the peer included); the curves are the "
        f"validation-split utilization every {s['curve_every']} steps. Training time is the sum "
        "of the training-step times (data loading and validation excluded); it compares rows only "
        "when nothing else ran on the machine, so the CPU time of the same steps (all threads) "
        "is reported beside it.",
        "",
    ]
    for k, rows in result["summary"].items():
        names = _ordered(rows)
        lines += [
            f"## K = {k}",
            "",
            f"{s['steps'][k]} training steps per run; the validation split holds "
            f"{s['val_images'] * s['tokens_per_image'] / int(k):.1f} tokens per code.",
            "",
            "| # | row | utilization | used | perplexity | norm. entropy | dead | L1 | PSNR (dB) "
            "| SSIM | train time (s) | train CPU (s) |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n in names:
            r = rows[n]
            lines.append(
                f"| {ROWS[n].number} | {ROWS[n].title} (`{n}`) | {100 * r['utilization']:.1f}% | "
                f"{r['used_codes']:.1f} | {r['perplexity']:.1f} | {_f(r['normalized_entropy'])} | "
                f"{r['dead_codes']:.1f} | {_f(r['l1'], 4)} | {_f(r['psnr'], 2)} | "
                f"{_f(r['ssim'])} | "
                f"{r['train_seconds']:.0f} | {r['train_cpu_seconds']:.0f} |"
            )
        lines += [
            "",
            "Means over seeds. Per seed (utilization / PSNR / train time):",
            "",
            "| row | " + " | ".join(f"seed {sd}" for sd in rows[names[0]]["seeds"]) + " |",
            "|---|" + "---:|" * len(rows[names[0]]["seeds"]),
        ]
        for n in names:
            ps = rows[n]["per_seed"]
            cells = [
                f"{100 * u:.1f}% / {p:.2f} / {t:.0f} s"
                for u, p, t in zip(ps["utilization"], ps["psnr"], ps["train_seconds"], strict=True)
            ]
            lines.append(f"| `{n}` | " + " | ".join(cells) + " |")
        lines += ["", "### Findings", ""]
        for para in findings(k, rows, s["val_images"] * s["tokens_per_image"]):
            lines += [para, ""]
        for img in images.get(k, []):
            rel = img.relative_to(md_path.parent) if img.is_relative_to(md_path.parent) else img
            lines += [f"![{img.stem}]({rel.as_posix()})", ""]
    lines += ["## Rows", ""]
    lines += [f"{ROWS[n].number}. `{n}`: {ROWS[n].recipe}." for n in ROWS]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", nargs="+", default=None, help=f"rows to run, of {list(ROWS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seed indices (default 0 1)")
    p.add_argument(
        "--steps", type=int, default=None, help=f"step budget at K=1024 (default {DEFAULT_STEPS})"
    )
    p.add_argument(
        "--steps-large",
        type=int,
        default=None,
        help="step budget for K > 1024 (default: half of --steps)",
    )
    p.add_argument("--codebook-sizes", nargs="+", type=int, default=[1024])
    p.add_argument("--threads", type=int, default=2, help="torch threads (the study: 2)")
    p.add_argument("--out", type=Path, default=None, help="output root (default: the repository)")
    p.add_argument("--curve-every", type=int, default=None, help="validation every N steps")
    p.add_argument("--quick", action="store_true", help="3 rows, 1 seed, 30 steps, 64 val images")
    p.add_argument("--fresh", action="store_true", help="discard finished runs in the JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.rows = args.rows or list(QUICK_ROWS)
        args.seeds = args.seeds or [0]
        args.steps = args.steps or 30
        args.out = args.out or REPO_ROOT / "runs" / "utilization_study_quick"
    args.rows = args.rows or list(ROWS)
    args.seeds = args.seeds if args.seeds is not None else [0, 1]
    args.steps = args.steps or DEFAULT_STEPS
    args.out = args.out or REPO_ROOT
    for r in args.rows:
        if r not in ROWS:
            p.error(f"unknown row {r!r}; rows are {list(ROWS)}")
    if args.steps < 1 or (args.steps_large is not None and args.steps_large < 1):
        p.error(f"--steps must be >= 1, got {args.steps}")
    for k in args.codebook_sizes:
        if k < 2:
            p.error(f"--codebook-sizes must be >= 2, got {k}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quickstart = load_quickstart()
    steps_for = {
        k: args.steps if k <= 1024 else (args.steps_large or max(1, args.steps // 2))
        for k in args.codebook_sizes
    }
    curve_every = {k: args.curve_every or max(1, v // 10) for k, v in steps_for.items()}
    reach = quickstart["schedule_reach"]
    scale = {k: schedule_scale(v, reach) for k, v in steps_for.items()}
    data = load_data(
        quickstart,
        max_images=800 if args.quick else None,
        val_images=64 if args.quick else None,
    )
    grid = data.val.shape[-1] // (2 ** (len(quickstart["model"]["channel_mult"]) - 1))
    settings = {
        "quick": args.quick,
        "steps": {str(k): v for k, v in steps_for.items()},
        "curve_every": curve_every[args.codebook_sizes[0]],
        "schedule_scale": scale[args.codebook_sizes[0]],
        "seeds": args.seeds,
        "threads": args.threads,
        "batch_size": quickstart["batch_size"],
        "image_size": quickstart["image_size"],
        "val_images": int(data.val.shape[0]),
        "tokens_per_image": grid * grid,
        "train_images": len(data.train),
        "steps_per_epoch": data.epoch_steps,
    }
    json_path = args.out / JSON_REL
    runs: list[dict] = []
    if json_path.exists() and not args.fresh:
        old = json.loads(json_path.read_text())
        keep = ("quick", "threads", "batch_size", "image_size", "val_images")
        clash = {
            k: (old["settings"].get(k), settings[k])
            for k in keep
            if old["settings"].get(k) != settings[k]
        }
        if clash:
            raise SystemExit(
                f"{json_path} holds runs made with other settings {clash} (stored, requested); "
                "pass --fresh to start over or --out to write elsewhere"
            )
        for r in old["runs"]:
            if r["steps"] == steps_for.get(r["codebook_size"], r["steps"]):
                runs.append(r)
            else:
                print(
                    f"dropping stored K={r['codebook_size']} {r['row']} seed {r['seed']}: "
                    f"{r['steps']} steps, this run uses {steps_for[r['codebook_size']]}",
                    flush=True,
                )
        settings["seeds"] = sorted(set(args.seeds) | {r["seed"] for r in runs})
    cmd = "python " + " ".join(
        shlex.quote(a)
        for a in ["benchmarks/utilization_study.py", *(argv if argv is not None else sys.argv[1:])]
    )
    result = {
        "benchmark": "utilization_study",
        "command": cmd,
        "machine": machine_info(),
        "settings": settings,
        "rows": {
            n: {"number": ROWS[n].number, "title": ROWS[n].title, "recipe": ROWS[n].recipe}
            for n in ROWS
        },
        "runs": runs,
    }
    done = {(r["codebook_size"], r["row"], r["seed"]) for r in runs}
    for k in args.codebook_sizes:
        for name in args.rows:
            for seed in args.seeds:
                if (k, name, seed) in done:
                    print(f"skip K={k} {name} seed {seed} (in {json_path})", flush=True)
                    continue
                t0 = time.perf_counter()
                r = run_one(name, k, seed, steps_for[k], data, quickstart, curve_every[k], scale[k])
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
    images = plot(runs, result["summary"], args.out / IMG_REL)
    md_path = args.out / MD_REL
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown(result, images, md_path))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, json_path)
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    main()

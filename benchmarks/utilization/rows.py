"""The study's rows: what each of the 12 rows trains, read from or scaled like the quickstart.

Every row is a ``Row`` whose ``build`` turns a ``Ctx`` (dimension, codebook size, schedule scale,
steps per epoch, the quickstart config) into a quantizer; ``build_model`` puts it inside the
quickstart model with encoder/decoder weights that depend on the seed only.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from benchmarks.common import REPO_ROOT
from benchmarks.utilization.peer import PeerQuantizer
from torch import nn

from vqkit.models import ResNetVQModel
from vqkit.quantize import (
    DeadCodeRestart,
    EMAUpdate,
    EntropyPenalty,
    KMeansInit,
    KMeansReestimate,
    LowUsageReset,
    VectorQuantizer,
)
from vqkit.quantize.kmeans import greedy_local_trials

CONFIG = REPO_ROOT / "configs" / "quickstart.yaml"


# --------------------------------------------------------------------------------- quickstart
def load_quickstart(path: Path = CONFIG) -> dict[str, Any]:
    """Everything the study takes from the quickstart YAML, so no figure can drift from it."""
    cfg = yaml.safe_load(path.read_text())
    model_args = dict(cfg["model"]["model"]["init_args"])
    quantizer = model_args.pop("quantizer")

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


def schedule_scale(steps: int, reach: int) -> float:
    """1 (the YAML's own schedules) for budgets of at least half the default's reach (its last
    scheduled step, 1000); shorter budgets (``--quick``) scale every step count of the
    schedules and the LR warm-up by ``steps / reach`` so that they still fire."""
    return 1.0 if steps >= reach / 2 else steps / reach


def scale_steps(n: int, scale: float, floor: int = 1) -> int:
    """A schedule's step count ``n`` times ``scale``, at least ``floor``; 0 (never) stays 0."""
    return max(floor, round(n * scale)) if n else n


# Every row but the default keeps the reservoir its stored runs were measured with: 16,384
# vectors, grown to 2 per code past K = 8,192 (the quickstart's default too until commit 49bf8b1).
STUDY_RESERVOIR, STUDY_RESERVOIR_PER_CODE = 16384, 2


def _scaled_quantizer_config(
    qcfg: dict, codebook_size: int, scale: float, *, pin_reservoir: bool = True
) -> dict:
    """The YAML's quantizer with another codebook size and its step counts times ``scale``.

    ``pin_reservoir``: the rules the stored rows were measured with: every reservoir holds
    ``max(16384, 2 * codebook_size)`` vectors and k-means is greedy k-means++
    (``vqkit.quantize.kmeans.greedy_local_trials``) then 50 (init) or 20 (re-estimation) Lloyd
    iterations at every K (``measured_kmeans``); False keeps the YAML's own and the library's
    defaults (``vqkit.quantize.default_reservoir_size``, ``default_local_trials``,
    ``default_kmeans_start``)."""
    q = copy.deepcopy(qcfg)
    q["init_args"]["codebook_size"] = codebook_size
    for m in q["init_args"].get("maintenance", []):
        a = m.setdefault("init_args", {})
        if "reservoir_size" in a and pin_reservoir:
            a["reservoir_size"] = max(
                a["reservoir_size"] or STUDY_RESERVOIR, STUDY_RESERVOIR_PER_CODE * codebook_size
            )
        name = m["class_path"].rsplit(".", 1)[-1]
        if pin_reservoir and name in KMEANS_ITERS:
            a.setdefault("local_trials", greedy_local_trials(codebook_size))
            for key, value in measured_kmeans(name).items():
                a.setdefault(key, value)
        if scale != 1.0:
            for key in ("warmup_steps", "every", "until"):
                if key in a:
                    a[key] = scale_steps(a[key], scale, floor=0 if key == "warmup_steps" else 1)
    return q


# Lloyd iterations of the k-means strategies until 2026-12-06, when every row but the default
# was measured: k-means++ then these many iterations at every K (the library's defaults up to
# 8,192 codes, vqkit.quantize.default_kmeans_start)
KMEANS_ITERS = {
    "KMeansInit": KMeansInit.DEFAULT_ITERS,
    "KMeansReestimate": KMeansReestimate.DEFAULT_ITERS,
}


# The dead-code restart of every row but the default until 2026-12-06: no floor under its
# relative threshold (DeadCodeRestart's floor binds only below 1/4 token per code a step:
# K > 8,192 at the study's 2,048 tokens a step), and no limit on the codes restarted in a step
# (it binds only when the dead codes outnumber the batch's tokens)
MEASURED_RESTART = {"floor": 0.0, "limit": False}
# the rows of the restart sweep that kept the floor were measured without the limit too
UNLIMITED = {"limit": False}


# Every row but the default was measured with k-means that ends with a pass assigning the
# reservoir to the final centers, at every K (the default skips it past 8,192 codes since
# 2026-12-06, vqkit.quantize.default_reassign; the same k-means up to 8,192)
MEASURED_REASSIGN = {"reassign": True}


def measured_kmeans(strategy: str) -> dict[str, Any]:
    """The start of a k-means strategy (class name) as the stored rows ran it at every K."""
    return {"init": "k-means++", "iters": KMEANS_ITERS[strategy], **MEASURED_REASSIGN}


def build_from_config(qcfg: dict) -> VectorQuantizer:
    """Instantiate a ``class_path`` / ``init_args`` quantizer config with the CLI's parser."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--quantizer", type=VectorQuantizer)
    cfg = parser.parse_object({"quantizer": qcfg})
    return parser.instantiate_classes(cfg).quantizer


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


def _default_with(
    ctx: Ctx,
    *,
    latest: bool = False,
    pin_reservoir: bool = False,
    measured: bool = False,
    kmeans: dict | None = None,
    restart: dict | None = None,
    quantizer: dict | None = None,
    **reestimate: Any,
) -> VectorQuantizer:
    """The quickstart's quantizer, its schedules scaled by ``ctx.scale``, with ``reestimate``
    overriding its ``KMeansReestimate`` arguments and ``kmeans`` those of both its k-means
    strategies (none: the default row); ``pin_reservoir``: the study's reservoir rule instead
    of the YAML's (see ``_scaled_quantizer_config``); ``measured``: k-means++ and 50 / 20 Lloyd
    iterations at every K (``measured_kmeans``) under ``kmeans``. Either one also keeps the
    dead-code restart without its floor and limit (``MEASURED_RESTART``), as those rows were
    measured; ``restart`` then overrides the ``DeadCodeRestart`` arguments, ``quantizer`` the
    ``VectorQuantizer``'s own. Unless ``latest`` (the default row), k-means keeps its final
    assignment pass at every K (``MEASURED_REASSIGN``), as every other row was measured."""
    q = _scaled_quantizer_config(
        ctx.quickstart["quantizer"], ctx.codebook_size, ctx.scale, pin_reservoir=pin_reservoir
    )
    q["init_args"].update(quantizer or {})
    for m in q["init_args"].get("maintenance", []):
        name = m["class_path"].rsplit(".", 1)[-1]
        if name == "DeadCodeRestart":
            a = m.setdefault("init_args", {})
            if pin_reservoir or measured:
                a.update(MEASURED_RESTART)
            a.update(restart or {})
        if name in KMEANS_ITERS:
            a = m.setdefault("init_args", {})
            if not latest:
                a.update(MEASURED_REASSIGN)
            if measured:
                a.update(measured_kmeans(name))
            a.update(kmeans or {})
        if name == "KMeansReestimate":
            m["init_args"].update(reestimate)
    return build_from_config(q)


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
        lambda c: _default_with(c, latest=True),
        "the quantizer of configs/quickstart.yaml, read from the YAML by the CLI's parser "
        "(reservoirs of 4 vectors per code, at least 16,384; its runs with 2 per code, made "
        "before, are row 13; past 8,192 codes its k-means starts at random reservoir vectors "
        "for 1 Lloyd iteration, its runs with k-means++ and 50 / 20 iterations are row 16; "
        "its dead-code restart has a floor of 1/16 token per step, its runs without one are "
        "row 17; past 8,192 codes its k-means skips the final assignment pass, its runs with "
        "it are row 25)",
    ),
    "dead_restart": Row(
        12,
        "dead-mode re-estimation + restart (the default until 2026-11-29)",
        lambda c: _default_with(c, mode="dead", pin_reservoir=True),
        "row 11 with KMeansReestimate(mode='dead'): only codes unused since the last "
        "re-estimation are re-placed, dead-code restart in between; reservoirs of "
        "max(16,384, 2 per code) vectors, as the default had then",
    ),
    "full_res2": Row(
        13,
        "default with 2-per-code reservoirs (the default of commits 4d11768-49bf8b1)",
        lambda c: _default_with(c, pin_reservoir=True),
        "row 11 with reservoirs of max(16,384, 2 per code) vectors: the same quantizer as row "
        "11 up to K = 4,096 (16,384 vectors either way), half its reservoir beyond",
    ),
    "default_greedy": Row(
        14,
        "default with greedy k-means++ at every K (the default of commits 5ab8def-c2015f5)",
        lambda c: _default_with(
            c, measured=True, kmeans={"local_trials": greedy_local_trials(c.codebook_size)}
        ),
        "row 16 with local_trials=2 + ln K on KMeansInit and KMeansReestimate: scikit-learn's "
        "greedy k-means++ past 8,192 codes too, where row 16 seeds with one candidate per "
        "step; the same quantizer as row 11 up to K = 8,192",
    ),
    "default_random": Row(
        15,
        "default with a random k-means start",
        lambda c: _default_with(c, measured=True, kmeans={"init": "random"}),
        "row 16 with init='random' on KMeansInit and KMeansReestimate: Lloyd (50 / 20 "
        "iterations) starts from distinct random reservoir vectors, no k-means++ seeding",
    ),
    "default_pp": Row(
        16,
        "default with k-means++ and 50 / 20 Lloyd iterations at every K (the default of "
        "commits ddbfa0b-d67b169)",
        lambda c: _default_with(c, measured=True),
        "row 11 with init='k-means++' and iters=50 (KMeansInit) / 20 (KMeansReestimate): "
        "past 8,192 codes plain k-means++ seeding and Lloyd to convergence, where the default "
        "starts at random reservoir vectors for 1 Lloyd iteration; the same quantizer as row "
        "11 up to K = 8,192",
    ),
    "default_nofloor": Row(
        17,
        "default without the restart's floor (the default of commits 6c20a36-db53605)",
        lambda c: _default_with(c, restart=MEASURED_RESTART),
        "row 11 with DeadCodeRestart(floor=0): codes restart below 0.25 x the uniform rate "
        "alone, where row 11 also restarts every code below 1/16 token per step (they differ "
        "past 8,192 codes at 2,048 tokens a step)",
    ),
    # rows 18-22: the restart sweep at 65,536 codes that chose row 11's floor
    # (benchmarks/results/large_k_restart_sweep.json); row 11 is the floor of 1/16
    "restart_rel1": Row(
        18,
        "default, restart at 1 x the uniform rate, no floor",
        lambda c: _default_with(c, restart={**MEASURED_RESTART, "threshold": 1.0}),
        "row 17 with DeadCodeRestart(threshold=1.0, relative=True): a code restarts below the "
        "uniform rate, tokens per step / K",
    ),
    "restart_floor8": Row(
        19,
        "default with a restart floor of 1/8",
        lambda c: _default_with(c, restart={**UNLIMITED, "floor": 0.125}),
        "row 11 with DeadCodeRestart(floor=0.125): every code below 1/8 token per step restarts",
    ),
    "usage_decay95": Row(
        20,
        "default, usage average decay 0.95, no floor",
        lambda c: _default_with(c, restart=MEASURED_RESTART, quantizer={"usage_decay": 0.95}),
        "row 17 with VectorQuantizer(usage_decay=0.95): the EMA usage the restart reads "
        "averages about 20 steps instead of 100, so an unused code falls under the threshold "
        "about 5 times sooner",
    ),
    "restart_rel1_decay95": Row(
        21,
        "default, restart at 1 x the uniform rate and usage decay 0.95, no floor",
        lambda c: _default_with(
            c,
            restart={**MEASURED_RESTART, "threshold": 1.0},
            quantizer={"usage_decay": 0.95},
        ),
        "rows 18 and 20 together",
    ),
    "floor_decay95": Row(
        22,
        "default with usage average decay 0.95",
        lambda c: _default_with(c, restart=UNLIMITED, quantizer={"usage_decay": 0.95}),
        "row 11 with VectorQuantizer(usage_decay=0.95): the floor of 1/16 token per step and "
        "a usage average over about 20 steps (a change at every K, unlike the floor)",
    ),
    "restart_spread": Row(
        23,
        "default, dead codes restart at batch tokens drawn by k-means++",
        lambda c: _default_with(c, restart={**UNLIMITED, "pick": "k-means++"}),
        "row 11 with DeadCodeRestart(pick='k-means++'): the restarted codes are batch tokens "
        "drawn one at a time with probability proportional to their squared distance to the "
        "nearest code, instead of uniformly",
    ),
    "default_nolimit": Row(
        24,
        "default without the restart's limit (the default of commits 95ae08b-29c8e2a)",
        lambda c: _default_with(c, restart=UNLIMITED),
        "row 11 with DeadCodeRestart(limit=False): when the dead codes outnumber a step's "
        "tokens every one of them restarts, several on one token, where row 11 restarts the "
        "least used, one per token (they differ only when K > tokens per step)",
    ),
    "default_reassign": Row(
        25,
        "default with k-means' final assignment pass (the default until commit 1a18a3e)",
        lambda c: _default_with(c),
        "row 11 with reassign=True on KMeansInit and KMeansReestimate: past 8,192 codes "
        "the one-iteration k-means ends with a pass assigning the reservoir to the moved "
        "centers, whose counts start the new codes' usage, where row 11 takes the counts of "
        "the clusters the centers were averaged from (the same quantizer up to K = 8,192)",
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

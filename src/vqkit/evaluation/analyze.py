"""Codebook analysis: how a trained tokenizer uses its codes on a set of images.

Seed 002's tool and its training log disagreed: training showed "100% utilization" read from EMA
counts while every batch used two codes. ``analyze`` therefore reports three families of figures
side by side, each under its own name, and never calls an EMA figure utilization:

- ``whole_set``: counts of every token of every image (the codebook's real use on this data);
- ``per_batch``: mean / min / max over loader batches (what a training log's batch figure sees);
- ``ema_counts`` / ``ema_cluster_size``: the checkpoint's smoothed training history.

Everything runs under ``torch.no_grad`` in eval mode on the model's device (or ``device``). Under
``torch.distributed`` each process encodes its shard and the counts are summed over processes, so
every process returns the same report.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..fileio import atomic_save_npy, atomic_write_text
from ..models.vqmodel import VQModel
from ..quantize import distributed as D
from ..quantize.distance import nearest, pairwise_sqdist
from ..quantize.usage import EMAUsageStats, UsageStats, entropy, usage_stats

CODE_TABLE_COLUMNS = ("index", "count", "share", "mean_distance", "code_norm")


@dataclass(frozen=True)
class PerBatchUsage:
    """Usage of each loader batch on its own, summarized over batches (mean, min, max)."""

    batches: int
    used_codes_mean: float
    used_codes_min: int
    used_codes_max: int
    utilization_mean: float
    utilization_min: float
    utilization_max: float
    perplexity_mean: float
    perplexity_min: float
    perplexity_max: float


@dataclass
class UsageReport:
    """What ``analyze`` measured. ``summary()`` is the JSON-ready part; tensors are on the CPU.

    Attributes:
        whole_set: usage of all tokens of all images (``horizon="whole_set"``).
        per_batch: per-batch used codes, utilization and perplexity, summarized over batches.
        ema_counts: figures of the quantizer's EMA usage counts (what dead-code restart reads),
            or None if the quantizer never ran a training forward. ``codes_above_threshold``
            counts EMA counts >= ``ema_threshold`` (the quantizer's ``dead_below``).
        ema_cluster_size: figures of the EMA codebook's cluster sizes (EMA mode only, else
            None). Both are smoothed training history, not the use of these images.
        top1pct_share: share of the tokens taken by the ``ceil(K / 100)`` most used codes.
        gini: Gini coefficient of the K code counts (0: uniform; (K - 1) / K: one code).
        mean_quantization_error: mean over tokens of ``||z - c||^2``, the squared distance from
            a token to its code in the quantizer's code space (after ``project_in``).
        soft_entropy: mean over tokens of the entropy (nats) of softmax(-||z - c||^2 / tau);
            ``soft_normalized_entropy`` divides it by log K (0: decisive, 1: no preference).
        reconstruction_l1, psnr: of the reconstructions from the tokens, on images in [-1, 1]
            (PSNR per image on [0, 1], then averaged, as ``vqkit.evaluation.psnr``).
        counts, code_mean_distance, code_norm: the per-code table (``code_rows()``); the mean
            distance of an unused code is NaN.
        distinct_codes_per_position: (h, w) number of distinct codes seen at each token position.
        index_maps: (N, h, w) indices of every image in loader order (``keep_index_maps=True``;
            under DDP each process keeps its own shard's).
        examples: the first few (images, index maps, reconstructions) for pictures.
    """

    codebook_size: int
    images: int
    tokens: int
    token_grid: tuple[int, int]
    temperature: float
    whole_set: UsageStats
    per_batch: PerBatchUsage
    ema_counts: EMAUsageStats | None
    ema_cluster_size: EMAUsageStats | None
    ema_threshold: float
    top1pct_share: float
    gini: float
    mean_quantization_error: float
    soft_entropy: float
    soft_normalized_entropy: float
    reconstruction_l1: float
    psnr: float
    counts: Tensor
    code_mean_distance: Tensor
    code_norm: Tensor
    codebook: Tensor
    distinct_codes_per_position: Tensor
    index_maps: Tensor | None = None
    examples: dict[str, Tensor] = field(default_factory=dict)

    def summary(self) -> dict:
        """The figures as a JSON-ready dict with named sections."""
        whole = asdict(self.whole_set)
        whole.pop("horizon")
        whole.pop("codebook_size")
        whole.update(top1pct_share=self.top1pct_share, gini=self.gini)

        def ema(stats: EMAUsageStats | None) -> dict | None:
            if stats is None:
                return None
            d = asdict(stats)
            d.pop("codebook_size")
            d["threshold"] = self.ema_threshold
            d["note"] = "smoothed training history, not the use of these images"
            return d

        return {
            "codebook_size": self.codebook_size,
            "images": self.images,
            "tokens": self.tokens,
            "token_grid": list(self.token_grid),
            "whole_set": whole,
            "per_batch": asdict(self.per_batch),
            "ema_counts": ema(self.ema_counts),
            "ema_cluster_size": ema(self.ema_cluster_size),
            "mean_quantization_error": self.mean_quantization_error,
            "soft_assignment": {
                "temperature": self.temperature,
                "entropy": self.soft_entropy,
                "normalized_entropy": self.soft_normalized_entropy,
            },
            "reconstruction": {"l1": self.reconstruction_l1, "psnr": self.psnr},
            "distinct_codes_per_position": {
                "mean": float(self.distinct_codes_per_position.float().mean()),
                "min": int(self.distinct_codes_per_position.min()),
                "max": int(self.distinct_codes_per_position.max()),
            },
        }

    def code_rows(self) -> list[dict]:
        """One dict per code: index, count, share, mean_distance (NaN if unused), code_norm."""
        total = max(self.tokens, 1)
        return [
            {
                "index": i,
                "count": int(c),
                "share": int(c) / total,
                "mean_distance": float(md),
                "code_norm": float(n),
            }
            for i, (c, md, n) in enumerate(
                zip(
                    self.counts.tolist(),
                    self.code_mean_distance.tolist(),
                    self.code_norm.tolist(),
                    strict=True,
                )
            )
        ]

    def save(
        self,
        output_dir: str | Path,
        *,
        details: bool = False,
        names: list[str] | None = None,
        extra: dict | None = None,
    ) -> list[Path]:
        """Write ``summary.json`` (merged with ``extra``); with ``details`` also ``codes.csv``
        and, if index maps were kept, ``indices.npy`` ((N, h, w) int32, loader order) with
        ``indices.txt`` naming the image of each row (``names``, else its position)."""
        import numpy as np

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "summary.json"]
        atomic_write_text(
            written[0], json.dumps({**(extra or {}), **self.summary()}, indent=2) + "\n"
        )
        if not details:
            return written
        with open(out / "codes.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CODE_TABLE_COLUMNS)
            w.writeheader()
            w.writerows(self.code_rows())
        written.append(out / "codes.csv")
        if self.index_maps is not None:
            atomic_save_npy(out / "indices.npy", self.index_maps.numpy().astype(np.int32))
            n = self.index_maps.shape[0]
            if names is not None and len(names) != n:
                raise ValueError(f"names has {len(names)} entries for {n} index maps")
            lines = names if names is not None else [str(i) for i in range(n)]
            atomic_write_text(out / "indices.txt", "".join(f"{s}\n" for s in lines))
            written += [out / "indices.npy", out / "indices.txt"]
        return written


def gini(counts: Tensor) -> float:
    """Gini coefficient of non-negative counts: sum_i (2i - K - 1) x_(i) / (K sum x), x sorted
    ascending, i = 1..K. 0 for equal counts, (K - 1) / K when one code takes everything."""
    x = torch.sort(counts.double().flatten()).values
    k, total = x.numel(), float(x.sum())
    if k == 0 or total <= 0:
        return 0.0
    i = torch.arange(1, k + 1, dtype=torch.float64)
    return float(((2 * i - k - 1) * x).sum() / (k * total))


def top_share(counts: Tensor, fraction: float = 0.01) -> float:
    """Share of all counts held by the ``ceil(fraction * K)`` largest entries (at least one)."""
    total = float(counts.sum())
    if total <= 0:
        return 0.0
    n = max(1, math.ceil(fraction * counts.numel()))
    return float(torch.topk(counts.double(), n).values.sum()) / total


def soft_entropy_sum(z: Tensor, codes: Tensor, temperature: float, max_block: int) -> Tensor:
    """Sum over rows of ``z`` of the entropy (nats) of softmax(-||z - c||^2 / temperature)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows = max(1, max_block // max(codes.shape[0], 1))
    total = torch.zeros((), dtype=torch.float64, device=z.device)
    for s in range(0, z.shape[0], rows):
        logits = pairwise_sqdist(z[s : s + rows], codes).mul_(-1.0 / temperature)
        logp = torch.log_softmax(logits, dim=1)
        total += -(logp.exp() * logp).sum(1).double().sum()
    return total


def _ema_figures(counts: Tensor, threshold: float) -> EMAUsageStats:
    k = counts.numel()
    h = float(entropy(counts))
    return EMAUsageStats(
        codebook_size=k,
        codes_above_threshold=int((counts >= threshold).sum()),
        ema_perplexity=math.exp(h),
        ema_normalized_entropy=h / math.log(k),
    )


def _images(batch) -> Tensor:  # noqa: ANN001
    if isinstance(batch, dict):
        key = next((k for k in ("images", "image") if k in batch), None)
        if key is None:
            raise KeyError(f"a dict batch needs an 'images' or 'image' entry, got {sorted(batch)}")
        batch = batch[key]
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    if not isinstance(x, Tensor):
        raise TypeError(
            f"batches must be image tensors (or start with one), got {type(x).__name__}"
        )
    return x


def _progress(total: int | None, enabled: bool):  # noqa: ANN202
    """A rich progress bar (rank 0 only), or a no-op stand-in."""

    class _Off:
        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *exc) -> None:  # noqa: ANN002
            return None

        def advance(self, n: int) -> None:
            pass

    if not enabled or D.rank() != 0:
        return _Off()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    class _On:
        def __enter__(self):  # noqa: ANN204
            self.p = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),  # stdout stays for the results
            )
            self.p.__enter__()
            self.task = self.p.add_task("encoding images", total=total)
            return self

        def __exit__(self, *exc) -> None:  # noqa: ANN002
            self.p.__exit__(*exc)

        def advance(self, n: int) -> None:
            self.p.advance(self.task, n)

    return _On()


@torch.no_grad()
def analyze(
    model: VQModel,
    dataloader: Iterable,
    *,
    temperature: float = 1.0,
    device: str | torch.device | None = None,
    keep_index_maps: bool = False,
    num_examples: int = 8,
    progress: bool = True,
) -> UsageReport:
    """Encode every image of ``dataloader`` with ``model`` and measure its codebook use.

    Args:
        model: a ``VQModel``; put in eval mode for the pass (its mode is restored after) and
            moved to ``device`` when one is given (else it stays where it is).
        dataloader: batches of (B, 3, H, W) images in [-1, 1] (or tuples whose first item is).
            All images must give the same token grid.
        temperature: tau of the soft assignment softmax(-d / tau) whose entropy is reported.
        keep_index_maps: keep the (N, h, w) index maps (``report.index_maps``).
        num_examples: images kept with their token maps and reconstructions for pictures.
        progress: show a progress bar (rank 0 only).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not isinstance(model, VQModel):
        raise TypeError(f"model must be a vqkit VQModel, got {type(model).__name__}")
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    q = model.quantizer
    k = q.codebook_size
    was_training = model.training
    model.eval()
    try:
        codes = q.effective_codebook().detach()
        counts = torch.zeros(k, dtype=torch.long, device=dev)
        dist_sum = torch.zeros(k, dtype=torch.float64, device=dev)
        sums = torch.zeros(5, dtype=torch.float64, device=dev)  # images, err, soft H, l1, psnr
        presence: Tensor | None = None
        grid: tuple[int, int] | None = None
        batch_figures: list[tuple[float, float, float]] = []
        maps: list[Tensor] = []
        examples: dict[str, list[Tensor]] = {"images": [], "indices": [], "reconstructions": []}
        kept = 0
        try:
            total = len(dataloader)  # type: ignore[arg-type]
        except TypeError:
            total = None
        with _progress(total, progress) as bar:
            for batch in dataloader:
                x = _images(batch).to(dev, non_blocking=True).float()
                if x.dim() != 4:
                    raise ValueError(f"expected (B, C, H, W) image batches, got {tuple(x.shape)}")
                h = model.quant_conv(model.encoder(x))
                flat, lead = q._flatten(h)
                if q.check_finite:
                    q._check_finite(flat)
                z = q._to_code_space(flat.float())
                # The same call as VectorQuantizer.encode, so the indices are the model's.
                idx, _ = nearest(z, codes, max_block=q.max_block, return_distances=False)
                b, gh, gw = lead
                if grid is None:
                    grid = (gh, gw)
                    presence = torch.zeros(gh * gw, k, dtype=torch.bool, device=dev)
                elif grid != (gh, gw):
                    raise ValueError(
                        f"every image must give the same token grid; got {gh}x{gw} after {grid[0]}"
                        f"x{grid[1]} (use one image size)"
                    )
                sq = (z - codes[idx]).pow(2).sum(1)
                c = torch.bincount(idx, minlength=k)
                counts += c
                dist_sum.index_add_(0, idx, sq.double())
                pos = torch.arange(gh * gw, device=dev).repeat(b)
                presence[pos, idx] = True
                bs = usage_stats(c, horizon="batch")
                batch_figures.append((bs.used_codes, bs.utilization, bs.perplexity))

                idx_map = idx.view(lead)
                rec = model.decode_indices(idx_map).float()
                unit_err = ((rec.clamp(-1, 1) + 1) / 2 - (x.clamp(-1, 1) + 1) / 2).pow(2)
                mse = unit_err.flatten(1).mean(1)
                sums += torch.stack(
                    [
                        torch.tensor(float(b), device=dev, dtype=torch.float64),
                        sq.double().sum(),
                        soft_entropy_sum(z, codes, temperature, q.max_block),
                        (rec - x).abs().flatten(1).mean(1).double().sum(),
                        (10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))).double().sum(),
                    ]
                )
                if keep_index_maps:
                    maps.append(idx_map.cpu())
                if kept < num_examples:
                    take = min(num_examples - kept, b)
                    examples["images"].append(x[:take].cpu())
                    examples["indices"].append(idx_map[:take].cpu())
                    examples["reconstructions"].append(rec[:take].cpu())
                    kept += take
                bar.advance(1)
        if grid is None or presence is None:
            raise ValueError("the data loader yielded no images")

        # One process's view -> the global one (no-ops on a single process).
        D.all_reduce_sum_(counts)
        D.all_reduce_sum_(dist_sum)
        D.all_reduce_sum_(sums)
        if D.is_distributed():
            presence = D.all_reduce_sum_(presence.to(torch.int32)) > 0
        figs = torch.tensor(batch_figures, dtype=torch.float64, device=dev)
        figs = D.all_gather_variable(figs).cpu()
    finally:
        model.train(was_training)

    n_img = int(sums[0])
    n_tok = int(counts.sum())
    whole = usage_stats(counts, dead_below=q.usage.dead_below, horizon="whole_set")
    per_batch = PerBatchUsage(
        batches=figs.shape[0],
        used_codes_mean=float(figs[:, 0].mean()),
        used_codes_min=int(figs[:, 0].min()),
        used_codes_max=int(figs[:, 0].max()),
        utilization_mean=float(figs[:, 1].mean()),
        utilization_min=float(figs[:, 1].min()),
        utilization_max=float(figs[:, 1].max()),
        perplexity_mean=float(figs[:, 2].mean()),
        perplexity_min=float(figs[:, 2].min()),
        perplexity_max=float(figs[:, 2].max()),
    )
    usage = q.usage
    ema_counts = usage.ema_stats() if bool(usage.ema_started) else None
    ema_cluster = None
    if q.ema is not None:
        ema_cluster = _ema_figures(q.ema.cluster_size.detach().cpu(), usage.dead_below)
    counts_cpu = counts.cpu()
    mean_dist = (dist_sum.cpu() / counts_cpu.double()).float()  # NaN where unused (0 / 0)
    soft = float(sums[2]) / max(n_tok, 1)
    return UsageReport(
        codebook_size=k,
        images=n_img,
        tokens=n_tok,
        token_grid=grid,
        temperature=float(temperature),
        whole_set=whole,
        per_batch=per_batch,
        ema_counts=ema_counts,
        ema_cluster_size=ema_cluster,
        ema_threshold=float(usage.dead_below),
        top1pct_share=top_share(counts_cpu, 0.01),
        gini=gini(counts_cpu),
        mean_quantization_error=float(sums[1]) / max(n_tok, 1),
        soft_entropy=soft,
        soft_normalized_entropy=soft / math.log(k),
        reconstruction_l1=float(sums[3]) / max(n_img, 1),
        psnr=float(sums[4]) / max(n_img, 1),
        counts=counts_cpu,
        code_mean_distance=mean_dist,
        code_norm=torch.linalg.vector_norm(codes, dim=1).cpu(),
        codebook=codes.cpu(),
        distinct_codes_per_position=presence.sum(1).view(grid).cpu(),
        index_maps=torch.cat(maps) if keep_index_maps else None,
        examples={name: torch.cat(v) for name, v in examples.items() if v},
    )


__all__ = ["PerBatchUsage", "UsageReport", "analyze", "gini", "soft_entropy_sum", "top_share"]

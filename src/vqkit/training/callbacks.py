"""Callbacks: the end-of-fit summary (table, summary.json, pictures)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L

from ..evaluation.visual import labelled_grid, save_png, save_usage_plot
from ..fileio import atomic_write_text

log = logging.getLogger("vqkit.training")

SUMMARY_KEYS = {
    "val/l1": "val_l1",
    "val/psnr": "psnr",
    "val/ssim": "ssim",
    "val/utilization": "utilization",
    "val/used_codes": "used_codes",
    "val/perplexity": "perplexity",
    "val/normalized_entropy": "normalized_entropy",
    "val/dead_codes": "dead_codes",
    # the sparse SDF example (vqkit.training.sparse3d)
    "val/sdf_l1": "sdf_l1",
    "val/iou": "iou",
    "val/chamfer": "chamfer",
    "val/shape_used_codes": "shape_used_codes",
    "val/shape_perplexity": "shape_perplexity",
    "val/shape_used_per_token": "shape_used_per_token",
}


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (``platform.processor()`` is empty on
    Linux), e.g. "AMD EPYC"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def machine() -> str:
    """The machine a run's figures come from: CPU model, cores, torch threads, torch, GPU."""
    import os

    import torch

    line = (
        f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )
    if torch.cuda.is_available():
        line += f", {torch.cuda.get_device_name()}"
    return line


def run_dir(trainer: L.Trainer) -> Path:
    """The folder of this run: the logger's version folder, else the trainer's root dir."""
    d = trainer.log_dir if trainer.logger is not None else None
    return Path(d or trainer.default_root_dir)


def _reconstructions_title(summary: dict) -> str:
    """The title of the end-of-fit reconstructions.png: the last validation's PSNR (over the
    whole validation set, not only the images shown) and the run's length."""
    parts = ["last validation's reconstructions"]
    if "psnr" in summary:
        parts.append(f"PSNR {summary['psnr']:.1f} dB")
    parts.append(f"{summary['steps']} training steps")
    return ", ".join(parts)


class TrainTimer(L.Callback):
    """Seconds spent in training steps (validation excluded) and the items they processed over
    all processes (``count(batch)``: images by default), for the end-of-fit summaries."""

    def __init__(self) -> None:
        super().__init__()
        self._train_seconds = 0.0
        self._items = 0
        self._t0: float | None = None

    @staticmethod
    def count(batch) -> int:  # noqa: ANN001
        """Items in one process's training batch (images, or the shapes of a dict batch)."""
        if isinstance(batch, dict):
            return int(batch["batch_size"])
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        return int(first.shape[0])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if self._t0 is not None:
            self._train_seconds += time.perf_counter() - self._t0
            self._items += self.count(batch) * trainer.world_size
            self._t0 = None


class TrainingSummary(TrainTimer):
    """At the end of ``fit``: print a table of the last validation's figures and training speed,
    and write ``summary.json``, ``reconstructions.png`` and ``code_usage.png`` in the run folder.
    Images/s counts training steps only (validation excluded), over all processes."""

    def __init__(self, filename: str = "summary.json") -> None:
        super().__init__()
        self.filename = filename

    def summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        m = trainer.callback_metrics
        out: dict = {k: float(m[src]) for src, k in SUMMARY_KEYS.items() if src in m}
        q = pl_module.quantizer
        unit = getattr(pl_module, "summary_unit", "images")
        out.update(
            codebook_size=q.codebook_size,
            steps=trainer.global_step,
            **{
                f"train_{unit}": self._items,
                "train_seconds": round(self._train_seconds, 3),
                f"{unit}_per_second": (
                    self._items / self._train_seconds if self._train_seconds else 0.0
                ),
            },
            machine=machine(),
        )
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "skipped_count"):
            out["skipped_images"] = dm.skipped_count
        for key in ("used_codes", "dead_codes"):
            if key in out:
                out[key] = int(out[key])
        return out

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # trainer.log_dir is a broadcast under DDP: every process must ask for it.
        folder = run_dir(trainer)
        if trainer.global_rank != 0:
            return
        summary = self.summary(trainer, pl_module)
        folder.mkdir(parents=True, exist_ok=True)
        files = {"summary": folder / self.filename}
        batch = getattr(pl_module, "_val_batch", None)
        if hasattr(pl_module, "fit_report"):  # a module with pictures of its own (3D shapes)
            files.update(pl_module.fit_report(trainer, folder, summary))
        elif batch is not None:
            grid = labelled_grid(
                [batch[0], batch[1]],
                ["original", "reconstruction"],
                _reconstructions_title(summary),
            )
            files["reconstructions"] = save_png(grid, folder / "reconstructions.png")
        counts = pl_module.quantizer.usage.eval_counts
        if counts.sum() > 0:
            files["code_usage"] = save_usage_plot(
                counts, folder / "code_usage.png", title="validation code usage"
            )
        summary["files"] = {k: str(v) for k, v in files.items()}
        atomic_write_text(files["summary"], json.dumps(summary, indent=2) + "\n")
        self.print_table(summary)

    @staticmethod
    def print_table(summary: dict) -> None:
        from .console import print_summary  # the table `vqkit prior fit` prints too

        print_summary(summary, "vqkit fit summary")


class EvaluationCallback(L.Callback):
    """Evaluation metrics the training module does not log itself, on the validation set at
    the end of every ``every_n_val_epochs``-th validation run, logged as ``val/<metric>``.

    ``metrics``: "rfid" (reconstruction FID, :mod:`vqkit.evaluation.fid`) and/or "lpips"
    (needs the VGG weights). PSNR, SSIM and codebook usage are logged by the module already.
    Reconstructions go through tokens and back (``decode_indices(encode(x))``), which leaves
    the quantizer's usage statistics untouched. The originals' Inception statistics are
    computed on the first run (or read from the on-disk cache) and kept for the later ones.
    ``max_images`` caps the images used (over all processes); rFID on few images is biased
    upwards, so compare runs at the same cap. The sanity-check validation is skipped.
    """

    CHOICES = ("rfid", "lpips")

    def __init__(
        self,
        metrics: list[str] | tuple[str, ...] = ("rfid",),
        every_n_val_epochs: int = 1,
        max_images: int | None = None,
        fid_cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        metrics = tuple(metrics)
        bad = [m for m in metrics if m not in self.CHOICES]
        if bad or not metrics:
            raise ValueError(
                f"EvaluationCallback metrics must be a non-empty subset of {self.CHOICES}, got "
                f"{list(metrics)} (psnr, ssim and usage are logged by the module already)"
            )
        if every_n_val_epochs < 1:
            raise ValueError(f"every_n_val_epochs must be >= 1, got {every_n_val_epochs}")
        if max_images is not None and max_images < 2:
            raise ValueError(f"max_images must be >= 2 or None, got {max_images}")
        self.metrics = metrics
        self.every_n_val_epochs = every_n_val_epochs
        self.max_images = max_images
        self.fid_cache_dir = fid_cache_dir
        self.val_runs = 0
        self._active = False
        self._extractor = None
        self._lpips = None
        self._reference = None
        self._fid = None
        self._tracker = None
        self._images = 0
        self._lpips_sum = 0.0
        self._cache_key: str | None = None

    def state_dict(self) -> dict:
        return {"val_runs": self.val_runs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.val_runs = int(state_dict.get("val_runs", 0))

    def _loader(self, trainer: L.Trainer):  # noqa: ANN202
        loaders = trainer.val_dataloaders
        return loaders[0] if isinstance(loaders, (list, tuple)) else loaders

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from ..evaluation.fid import (
            InceptionFeatures,
            RFIDAccumulator,
            ShardTracker,
            load_cached_stats,
            loader_fingerprint,
        )

        self._active = False
        if trainer.sanity_checking:
            return
        self.val_runs += 1
        if self.val_runs % self.every_n_val_epochs:
            return
        self._active = True
        device = pl_module.device
        loader = self._loader(trainer)
        if "rfid" in self.metrics:
            if self._extractor is None:
                self._extractor = InceptionFeatures()
            self._extractor.to(device)
            if self._reference is None and self.max_images is None:
                self._cache_key = loader_fingerprint(loader)
                self._reference = load_cached_stats(self._cache_key, self.fid_cache_dir)
            self._fid = RFIDAccumulator(self._extractor, self._reference)
        if "lpips" in self.metrics:
            if self._lpips is None:
                from ..evaluation.evaluate import load_lpips

                self._lpips = load_lpips()
            self._lpips.to(device).eval()
        self._tracker = ShardTracker(loader)
        self._images = 0
        self._lpips_sum = 0.0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, *args) -> None:  # noqa: ANN001, ANN002
        import math

        from ..evaluation.evaluate import _lpips_per_image
        from ..evaluation.fid import batch_images, reconstruct
        from ..quantize import distributed as D

        dataloader_idx = args[1] if len(args) > 1 else 0  # (batch_idx, dataloader_idx)
        if not self._active or dataloader_idx != 0:
            return
        x = batch_images(batch)
        x = x[self._tracker.keep(x.shape[0]).to(x.device)]
        if self.max_images is not None:
            cap = math.ceil(self.max_images / D.world_size())
            x = x[: max(cap - self._images, 0)]
        if x.shape[0] == 0:
            return
        x = x.float()
        rec = reconstruct(pl_module.model, x)
        self._images += x.shape[0]
        if self._fid is not None:
            self._fid.update(x if self._fid.needs_originals else None, rec)
        if self._lpips is not None:
            self._lpips_sum += float(_lpips_per_image(self._lpips, rec, x).double().sum())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import torch

        from ..evaluation.fid import save_cached_stats
        from ..quantize import distributed as D

        if not self._active:
            return
        self._active = False
        t = torch.tensor([self._images, self._lpips_sum], dtype=torch.float64)
        n, lpips_sum = (float(v) for v in D.all_reduce_sum_(t))
        if n < 2:
            log.warning("EvaluationCallback: %d validation images, skipping", int(n))
            return
        if self._fid is not None:
            first = self._reference is None
            value = self._fid.compute()
            self._reference = self._fid.reference_stats()
            if first:
                save_cached_stats(self._cache_key, self._reference, self.fid_cache_dir)
            pl_module.log("val/rfid", value, sync_dist=True)
            self._fid = None
        if "lpips" in self.metrics:
            pl_module.log("val/lpips", lpips_sum / n, sync_dist=True)


class SaveOnSigterm(L.Callback):
    """SIGTERM (what schedulers send before they kill a job) saves ``last.ckpt`` and ends the
    run cleanly: Lightning stops after the current batch on SIGTERM but saves nothing. Every
    ``vqkit fit`` carries this callback; resume with ``--ckpt_path last``."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:  # noqa: ANN001
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException):
            return
        ckpt = trainer.checkpoint_callback
        dirpath = getattr(ckpt, "dirpath", None)
        folder = Path(dirpath) if dirpath else run_dir(trainer) / "checkpoints"
        path = folder / "last.ckpt"
        trainer.save_checkpoint(path)  # every process calls it; the first one writes
        if trainer.global_rank == 0:
            log.warning(
                "SIGTERM at step %d: saved %s; resume with --ckpt_path last",
                trainer.global_step,
                path,
            )

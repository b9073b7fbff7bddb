"""Callbacks: the end-of-fit summary (table, summary.json, pictures)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L

from ..evaluation.visual import image_grid, save_png, save_usage_plot

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
}


def run_dir(trainer: L.Trainer) -> Path:
    """The folder of this run: the logger's version folder, else the trainer's root dir."""
    d = trainer.log_dir if trainer.logger is not None else None
    return Path(d or trainer.default_root_dir)


class TrainingSummary(L.Callback):
    """At the end of ``fit``: print a table of the last validation's figures and training speed,
    and write ``summary.json``, ``reconstructions.png`` and ``code_usage.png`` in the run folder.
    Images/s counts training steps only (validation excluded), over all processes."""

    def __init__(self, filename: str = "summary.json") -> None:
        super().__init__()
        self.filename = filename
        self._train_seconds = 0.0
        self._images = 0
        self._t0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if self._t0 is not None:
            self._train_seconds += time.perf_counter() - self._t0
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            self._images += images.shape[0] * trainer.world_size

    def summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        m = trainer.callback_metrics
        out: dict = {k: float(m[src]) for src, k in SUMMARY_KEYS.items() if src in m}
        q = pl_module.quantizer
        out.update(
            codebook_size=q.codebook_size,
            steps=trainer.global_step,
            train_images=self._images,
            train_seconds=round(self._train_seconds, 3),
            images_per_second=self._images / self._train_seconds if self._train_seconds else 0.0,
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
        if batch is not None:
            files["reconstructions"] = save_png(
                image_grid([batch[0], batch[1]]), folder / "reconstructions.png"
            )
        counts = pl_module.quantizer.usage.eval_counts
        if counts.sum() > 0:
            files["code_usage"] = save_usage_plot(
                counts, folder / "code_usage.png", title="validation code usage"
            )
        summary["files"] = {k: str(v) for k, v in files.items()}
        files["summary"].write_text(json.dumps(summary, indent=2) + "\n")
        self.print_table(summary)

    @staticmethod
    def print_table(summary: dict) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="vqkit fit summary")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in summary.items():
            if k == "files":
                continue
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        console = Console()
        console.print(table)
        for k, v in summary.get("files", {}).items():
            console.print(f"{k}: {v}")

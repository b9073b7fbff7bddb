"""The end of ``vqkit prior fit``: a table of the last validation's figures and the training
speed, ``summary.json`` and a grid of samples in the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from ..fileio import atomic_write_text
from ..training.callbacks import TrainTimer, machine, run_dir

# what PriorModule logs -> the summary's key
SUMMARY_KEYS = {
    "val/nll": "val_nll",
    "val/bits_per_code": "bits_per_code",
    "val/perplexity": "perplexity",
    "val/unigram_bits": "unigram_bits",
}


def draw_samples(images: Tensor, path: Path, bits_per_code: float | None = None) -> Path:
    """The samples' picture: (N, 3, H, W) in [-1, 1] in labelled rows of 8 (tiles of at least
    128 px), titled with the prior's bits per code when known, as a PNG."""
    from ..evaluation.visual import sample_grid, save_png

    title = "prior samples"
    if bits_per_code is not None:
        title += f", {bits_per_code:.2f} bits per code (validation)"
    return save_png(sample_grid(images, title), path)


class PriorSummary(TrainTimer):
    """At the end of ``fit``: print the last validation's negative log-likelihood (nats per
    code), bits per code, perplexity and the unigram reference (the bits per code of a prior
    that ignores context), with the training speed; write them in ``summary.json`` with the
    machine, and ``num_samples`` grids sampled from the prior (seeded with ``seed``, at the
    module's temperature and top_k) and decoded by its tokenizer in ``samples.png``.

    Tokens/s counts the codes of the training batches over all processes, per second of
    training steps (validation excluded).

    Args:
        filename: name of the summary in the run folder.
        num_samples: grids in ``samples.png`` (0: no picture).
        seed: seed of the samples' draws.
    """

    def __init__(self, filename: str = "summary.json", num_samples: int = 16, seed: int = 0):
        super().__init__()
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.filename = filename
        self.num_samples = num_samples
        self.seed = seed

    @staticmethod
    def count(batch) -> int:  # noqa: ANN001
        """Codes in one process's training batch of grids."""
        codes = batch[0] if isinstance(batch, (list, tuple)) else batch
        return int(codes.numel())

    def summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        m = trainer.callback_metrics
        out: dict = {k: float(m[src]) for src, k in SUMMARY_KEYS.items() if src in m}
        transformer = pl_module.transformer
        seconds = self._train_seconds
        out.update(
            codebook_size=transformer.codebook_size,
            token_grid=list(transformer.grid),
            steps=trainer.global_step,
            train_codes=self._items,
            train_seconds=round(seconds, 3),
            tokens_per_second=self._items / seconds if seconds else 0.0,
            machine=machine(),
        )
        return out

    def samples(self, pl_module: L.LightningModule) -> Tensor:
        """``num_samples`` decoded samples (N, 3, H, W) in [-1, 1]."""
        from ..evaluation.sampling import decode_codes

        transformer, hp = pl_module.transformer, pl_module.hparams
        was_training = transformer.training
        transformer.eval()  # no dropout while sampling
        try:
            g = torch.Generator(device=pl_module.device).manual_seed(self.seed)
            codes = transformer.generate(
                self.num_samples, temperature=hp.temperature, top_k=hp.top_k, generator=g
            )
        finally:
            transformer.train(was_training)
        return decode_codes(pl_module.tokenizer_model, codes)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from ..training.console import print_summary

        # trainer.log_dir is a broadcast under DDP: every process must ask for it
        folder = run_dir(trainer)
        if trainer.global_rank != 0:
            return
        summary = self.summary(trainer, pl_module)
        files = {"summary": folder / self.filename}
        if self.num_samples:
            files["samples"] = draw_samples(
                self.samples(pl_module), folder / "samples.png", summary.get("bits_per_code")
            )
        summary["files"] = {k: str(v) for k, v in files.items()}
        atomic_write_text(files["summary"], json.dumps(summary, indent=2) + "\n")
        print_summary(summary, "vqkit prior fit summary")

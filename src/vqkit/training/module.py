"""The LightningModule that trains a VQModel. It only forwards, logs and, after a codebook reset
in gradient mode, resets the optimizer rows of the replaced codes: codebook maintenance runs
inside the quantizer on its own step counter."""

from __future__ import annotations

import inspect
import logging
import math
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from ..evaluation.metrics import psnr, ssim
from ..evaluation.visual import labelled_grid
from ..losses import VQLoss
from ..models import VQModel
from ..quantize import NonFiniteError, reset_optimizer_state
from ..quantize.usage import UsageStats
from .schedules import warmup_cosine

_log = logging.getLogger("vqkit.training")

_USAGE_FIELDS = ("utilization", "used_codes", "perplexity", "normalized_entropy", "dead_codes")


@torch.no_grad()
def codebook_stats(quantizer) -> dict[str, Tensor]:  # noqa: ANN001
    """min / max / mean / std of the codebook's entries and the mean norm of its codes."""
    c = quantizer.codebook.detach().float()
    return {
        "min": c.min(),
        "max": c.max(),
        "mean": c.mean(),
        "std": c.std(),
        "norm_mean": c.norm(dim=1).mean(),
    }


def _bad_terms(total: Tensor, terms: dict) -> str:
    """The loss and its first non-finite term, for the message of a skipped step."""
    bad = [k for k, v in terms.items() if not bool(torch.isfinite(v.detach()).all())]
    first = f"first non-finite term {bad[0]}" if bad else "every term finite, their sum not"
    return (
        f"training loss is {float(total)} ({first}; terms: "
        + ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
        + ")"
    )


def _images(batch) -> Tensor:  # noqa: ANN001
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _save_config(module: L.LightningModule) -> None:
    """Save the constructor arguments as hyperparameters.

    Under ``vqkit fit`` (LightningCLI) they arrive as the config itself, ``class_path`` and all,
    so a checkpoint rebuilds its whole model with ``load_from_checkpoint(path)`` and nothing else.
    Built in Python, the arguments that are modules are left out (they live in the state dict);
    such a checkpoint needs ``model=`` passed back when it is loaded.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
        module.save_hyperparameters(frame=inspect.currentframe().f_back)
    modules = [k for k, v in module.hparams.items() if isinstance(v, nn.Module)]
    for k in modules:
        del module.hparams[k]


class VQTokenizerModule(L.LightningModule):
    """Train a VQ-VAE tokenizer.

    Args:
        model: the ``VQModel`` (encoder, quantizer, decoder).
        loss: the objective; default L1 + the quantizer's loss.
        perceptual: a frozen module called as ``perceptual(reconstructions, images)`` that
            returns per-image distances, e.g. ``vqkit.losses.LPIPS`` (seed 004's phase 1:
            VQ-VAE + LPIPS). Its weights come from its own files, never from the checkpoint.
        perceptual_weight: its weight (seed 004: 0.5 for LPIPS).
        lr, betas, weight_decay: AdamW (2e-4, (0.9, 0.99), 0 as in the seed plan).
        warmup_steps, warmup_start_lr, min_lr: linear warm-up from ``warmup_start_lr`` then cosine
            decay to ``min_lr`` at the trainer's last optimizer step.
        usage_window_steps: log the ``window`` usage figures and start a new window this often.
        log_images_every_n_steps: reconstruction grids and usage histograms to TensorBoard.
        num_log_images: images per grid.
        max_bad_steps: a step whose loss, quantizer input or gradients are not finite is
            skipped and counted (``train/skipped_steps``); this many in a row stop the run with
            the step and the first non-finite term named. fp16 AMP overflows are the grad
            scaler's to skip and are not counted.
    """

    # Constructor arguments a checkpoint can be loaded without (see ``load_tokenizer``).
    inference_skips_args = ("perceptual",)

    def __init__(
        self,
        model: VQModel,
        loss: VQLoss | None = None,
        perceptual: nn.Module | None = None,
        *,
        perceptual_weight: float = 1.0,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        warmup_steps: int = 500,
        warmup_start_lr: float = 1e-6,
        min_lr: float = 1e-5,
        usage_window_steps: int = 100,
        log_images_every_n_steps: int = 500,
        num_log_images: int = 8,
        max_bad_steps: int = 10,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if perceptual_weight < 0:
            raise ValueError(f"perceptual_weight must be >= 0, got {perceptual_weight}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if usage_window_steps < 1:
            raise ValueError(f"usage_window_steps must be >= 1, got {usage_window_steps}")
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        _save_config(self)
        self.model = model
        self.loss = loss if loss is not None else VQLoss()
        self.perceptual = perceptual
        if perceptual is not None:
            perceptual.requires_grad_(False).eval()
        # The perceptual network's weights come from its own files: keep them out of the
        # checkpoint, and do not ask for them when one is loaded.
        self.register_state_dict_post_hook(_drop_perceptual_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_perceptual_keys)
        self._val_batch: Tensor | None = None
        # steps skipped for a non-finite loss, input or gradient (resumes with the checkpoint)
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self._bad_in_a_row = 0

    def train(self, mode: bool = True):  # noqa: ANN201
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.eval()  # a frozen loss network (dropout, batch norm) stays in eval
        return self

    def _reconstruction_terms(self, images: Tensor, out) -> tuple[Tensor, dict]:  # noqa: ANN001
        """The objective without any adversarial part: the loss, plus the perceptual term."""
        total, terms = self.loss(images, out.reconstructions, out.vq_losses)
        weight = self.hparams.perceptual_weight
        if self.perceptual is not None and weight > 0:
            terms["perceptual"] = weight * self.perceptual(out.reconstructions, images).mean()
            total = total + terms["perceptual"]
        return total, terms

    @property
    def quantizer(self):  # noqa: ANN201
        return self.model.quantizer

    # ------------------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx: int) -> Tensor | None:  # noqa: ANN001
        images = _images(batch)
        try:
            out = self.model(images)
        except NonFiniteError as e:
            return self._skip_step(str(e))
        total, terms = self._reconstruction_terms(images, out)
        if self._not_finite(total):
            return self._skip_step(_bad_terms(total, terms))
        self._bad_in_a_row = 0
        self._reset_replaced_rows()
        self._log_training(images, out, total, terms)
        return total

    def _log_training(self, images: Tensor, out, total: Tensor, terms: dict) -> None:  # noqa: ANN001
        bs = images.shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=bs)
        k = self.quantizer.codebook_size
        # 0 while the quantizer warms up (input passed through): batch usage then means nothing
        self.log("train/quantized", 0.0 if out.passthrough else 1.0, batch_size=bs)
        if not out.passthrough:
            self.log(
                "train/batch_utilization", out.used_codes.float() / k, prog_bar=True, batch_size=bs
            )
            self.log("train/batch_perplexity", out.perplexity, batch_size=bs)
        self.log("train/lr", self._generator_optimizer().param_groups[0]["lr"], batch_size=bs)
        every = getattr(self._trainer, "log_every_n_steps", 0) if self._trainer is not None else 0
        if self._every(every):
            # seed 001's codebook monitoring: a collapsing or exploding codebook shows here
            for name, value in codebook_stats(self.quantizer).items():
                self.log(f"codebook/{name}", value, batch_size=bs)
        usage = self.quantizer.usage
        if int(usage.window_forwards) >= self.hparams.usage_window_steps:
            self._log_usage("train_window", usage.stats("window"))
            usage.reset_window()
        if self._every(self.hparams.log_images_every_n_steps):
            self._log_pictures("train", images, out.reconstructions, usage.batch_counts)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # checkpoints from before the skipped-step counter
        state = checkpoint.get("state_dict")
        if state is not None and "skipped_steps" not in state:
            state["skipped_steps"] = torch.zeros((), dtype=torch.long)

    # ------------------------------------------------------------------------------ bad steps
    def _not_finite(self, total: Tensor) -> bool:
        """Whether the loss is not finite on any process (all decide together under DDP)."""
        bad = (~torch.isfinite(total.detach())).float()
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="max")
        return bool(bad)

    def _skip_step(self, reason: str) -> None:
        """Skip this step (no backward, no optimizer step), count it, and stop after
        ``max_bad_steps`` in a row. Returns None: Lightning skips a step whose training_step
        returns None."""
        self.skipped_steps += 1
        self._bad_in_a_row += 1
        step = self.global_step
        self.log("train/skipped_steps", self.skipped_steps.float(), rank_zero_only=True)
        limit = self.hparams.max_bad_steps
        if self._bad_in_a_row >= limit:
            raise FloatingPointError(
                f"{self._bad_in_a_row} training steps in a row were not finite (max_bad_steps="
                f"{limit}), the last at step {step}: {reason}"
            )
        if self.global_rank == 0:
            _log.warning("step %d skipped (%d so far): %s", step, int(self.skipped_steps), reason)
        return None

    def on_before_optimizer_step(self, optimizer) -> None:  # noqa: ANN001
        """Non-finite gradients (a NaN that reached the loss only through backward): drop them
        all so the optimizer skips the step, and count it. Under fp16 AMP the grad scaler
        already skips overflowing steps while it calibrates its scale; those are its own, not
        counted (a run would otherwise stop during the first steps' calibration)."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        # one fused reduction per step (a non-finite entry makes its tensor's norm non-finite)
        norms = torch.stack(torch._foreach_norm(grads))
        if bool(torch.isfinite(norms).all()):
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        names = {id(p): n for n, p in self.named_parameters()}
        first = names.get(id(params[int((~torch.isfinite(norms)).nonzero()[0])]), "?")
        for g in optimizer.param_groups:
            for p in g["params"]:
                p.grad = None  # AdamW leaves a parameter without a gradient untouched
        self._skip_step(f"non-finite gradient, first in {first}")

    def _generator_optimizer(self):  # noqa: ANN202
        """The optimizer of the autoencoder and codebook (a subclass may add others)."""
        return self.optimizers()

    def _reset_replaced_rows(self) -> None:
        if self.quantizer.uses_ema or not self.quantizer.replaced_mask.any():
            return
        opt = self._generator_optimizer()
        n = reset_optimizer_state(getattr(opt, "optimizer", opt), self.quantizer)
        self.log("train/codes_reset", float(n), reduce_fx="sum")

    def _every(self, n: int) -> bool:
        return n > 0 and self.global_step % n == 0

    # ------------------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self.quantizer.usage.reset_eval()
        self._val_batch = None

    def validation_step(self, batch, batch_idx: int) -> None:  # noqa: ANN001
        images = _images(batch)
        out = self.model(images)
        rec = out.reconstructions
        bs = images.shape[0]
        self.log("val/l1", F.l1_loss(rec, images), prog_bar=True, sync_dist=True, batch_size=bs)
        self.log("val/mse", F.mse_loss(rec, images), sync_dist=True, batch_size=bs)
        self.log("val/psnr", psnr(rec, images), sync_dist=True, batch_size=bs)
        if min(images.shape[-2:]) >= 11:
            self.log("val/ssim", ssim(rec, images), sync_dist=True, batch_size=bs)
        self.log("val/vq_loss", out.vq_loss, sync_dist=True, batch_size=bs)
        if batch_idx == 0:
            n = self.hparams.num_log_images
            self._val_batch = torch.stack([images[:n].detach(), rec[:n].detach()])

    def on_validation_epoch_end(self) -> None:
        usage = self.quantizer.usage
        stats = usage.stats("eval", sync=True)
        if stats.tokens == 0:
            return
        self._log_usage("val", stats, prog_bar=True)
        if self._val_batch is not None and not self.trainer.sanity_checking:
            self._log_pictures("val", self._val_batch[0], self._val_batch[1], usage.eval_counts)

    def _log_usage(self, prefix: str, stats: UsageStats, prog_bar: bool = False) -> None:
        for name in _USAGE_FIELDS:
            self.log(
                f"{prefix}/{name}",
                float(getattr(stats, name)),
                prog_bar=prog_bar and name == "utilization",
                # every process already holds the global figure
                sync_dist=False,
                rank_zero_only=False,
            )

    def _log_pictures(self, prefix: str, images: Tensor, recs: Tensor, counts: Tensor) -> None:
        exp = getattr(self.logger, "experiment", None)
        if exp is None or not hasattr(exp, "add_image") or self.global_rank != 0:
            return
        n = min(self.hparams.num_log_images, images.shape[0])
        images, recs = images[:n].detach(), recs[:n].detach()
        # the PSNR of the images shown: the validation set's mean would need a collective call
        # that only this process makes
        what = "validation" if prefix == "val" else "training"
        title = (
            f"{what} reconstructions, PSNR {float(psnr(recs, images)):.1f} dB (these {n}), "
            f"step {self.global_step}"
        )
        grid = labelled_grid([images, recs], ["original", "reconstruction"], title)
        exp.add_image(f"{prefix}/reconstructions", grid, self.global_step)
        counts = counts.detach().float().cpu()
        if counts.sum() > 0:
            # One sample per token of the code it took: TensorBoard shows the index histogram.
            idx = torch.repeat_interleave(torch.arange(counts.numel()), counts.long())
            exp.add_histogram(
                f"{prefix}/code_usage", idx, self.global_step, bins=min(256, counts.numel())
            )

    # ------------------------------------------------------------------------------ optim
    def configure_optimizers(self):  # noqa: ANN201
        hp = self.hparams
        params = [p for p in self._generator_parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay
        )
        total = self._total_optimizer_steps()

        def factor(step: int) -> float:
            return (
                warmup_cosine(
                    step,
                    base_lr=hp.lr,
                    warmup_steps=hp.warmup_steps,
                    total_steps=total,
                    start_lr=hp.warmup_start_lr,
                    min_lr=hp.min_lr,
                )
                / hp.lr
            )

        sched = LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _generator_parameters(self):  # noqa: ANN202
        return self.parameters()

    def _total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run, where the cosine ends."""
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        if total and math.isfinite(total):
            return int(total)
        return max(self.hparams.warmup_steps * 10, 1)


def _drop_perceptual_keys(module, state_dict, prefix, local_metadata) -> None:  # noqa: ANN001
    for key in [k for k in state_dict if k.startswith(prefix + "perceptual.")]:
        del state_dict[key]


def _ignore_missing_perceptual_keys(module, incompatible) -> None:  # noqa: ANN001
    missing = incompatible.missing_keys
    missing[:] = [k for k in missing if not k.startswith("perceptual.")]

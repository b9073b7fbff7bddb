"""VQ-GAN training: the VQ-VAE module plus a PatchGAN discriminator on its own optimizer.

Lightning manual optimization, one batch = one generator forward, then:

1. generator loss (reconstruction + quantizer + optional perceptual + lambda_gan * [adaptive
   weight] * GAN loss) -> backward; the discriminator is frozen during it;
2. from ``disc_start`` on: discriminator loss on the real images and the detached
   reconstructions of the same forward (no second generator forward) -> backward;
3. every ``accumulate_grad_batches`` batches: discriminator step, then generator step.

**Steps.** ``trainer.global_step`` counts generator optimizer steps only, as in a VQ-VAE run:
the discriminator's optimizer is stepped outside Lightning's step counter (Lightning 2.x would
otherwise count both optimizers' steps, and ``max_steps``, checkpoint intervals and the
schedules would mean half of what they say). ``max_steps``, ``disc_start``, ``ramp_steps``,
``warmup_steps`` and ``every_n_train_steps`` are all in generator steps; the quantizer's
maintenance keeps its own counter of training forwards (micro-batches).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..losses import AdversarialLoss, VQLoss
from ..losses.adversarial import adaptive_weight
from ..models import VQModel
from ..quantize import NonFiniteError
from .module import VQTokenizerModule, _bad_terms, _images


class VQGANModule(VQTokenizerModule):
    """Train a VQ-GAN tokenizer (seed 004 phase 2; taming-transformers' recipe).

    Args beyond ``VQTokenizerModule``'s (whose ``lr``, ``betas``, warm-up and cosine schedule
    drive the generator: encoder, quantizer, decoder):
        adversarial: the discriminator and its loss, schedule and regularizers.
        perceptual: a frozen module called as ``perceptual(reconstructions, images)`` that
            returns a distance (a scalar or per-image values, averaged), e.g.
            ``vqkit.losses.LPIPS``. It is never trained, stays in eval mode and is left out of
            checkpoints (it is rebuilt from its own weight files, and ``load_tokenizer`` does
            not need it).
        perceptual_weight: its weight (seed 004: 0.5 for LPIPS).
        disc_lr, disc_betas, disc_weight_decay: the discriminator's AdamW (2e-4, (0.5, 0.9),
            0); its learning rate is constant, as in taming.
        gradient_clip_val: clip each optimizer's gradient norm to this (None: no clipping).
            Under manual optimization ``Trainer(gradient_clip_val=...)`` is rejected by
            Lightning; set it here.
        accumulate_grad_batches: step both optimizers every N batches (the trainer's own
            ``accumulate_grad_batches`` must stay 1 under manual optimization).
    """

    def __init__(
        self,
        model: VQModel,
        loss: VQLoss | None = None,
        adversarial: AdversarialLoss | None = None,
        perceptual: nn.Module | None = None,
        *,
        perceptual_weight: float = 1.0,
        disc_lr: float = 2e-4,
        disc_betas: tuple[float, float] = (0.5, 0.9),
        disc_weight_decay: float = 0.0,
        gradient_clip_val: float | None = None,
        accumulate_grad_batches: int = 1,
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
        if disc_lr <= 0:
            raise ValueError(f"disc_lr must be > 0, got {disc_lr}")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(
                f"gradient_clip_val must be > 0 or None (no clipping), got {gradient_clip_val}"
            )
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        super().__init__(
            model,
            loss,
            perceptual,
            perceptual_weight=perceptual_weight,
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            warmup_start_lr=warmup_start_lr,
            min_lr=min_lr,
            usage_window_steps=usage_window_steps,
            log_images_every_n_steps=log_images_every_n_steps,
            num_log_images=num_log_images,
            max_bad_steps=max_bad_steps,
        )
        self.automatic_optimization = False
        self.adversarial = adversarial if adversarial is not None else AdversarialLoss()

    @property
    def discriminator(self) -> nn.Module:
        return self.adversarial.discriminator

    def setup(self, stage: str) -> None:
        # Each step runs two backward passes (generator, then discriminator) inside one DDP
        # forward; DDP must re-prepare its reducer per backward, which it only does when it
        # looks for unused parameters. Say so before the first step instead of DDP's error.
        strategy = getattr(self._trainer, "strategy", None)
        kwargs = getattr(strategy, "_ddp_kwargs", None)
        if stage == "fit" and kwargs is not None and not kwargs.get("find_unused_parameters"):
            raise ValueError(
                "VQGANModule under DDP needs find_unused_parameters=True: use "
                "--trainer.strategy=ddp_find_unused_parameters_true or "
                "DDPStrategy(find_unused_parameters=True)"
            )

    # ------------------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx: int) -> Tensor:  # noqa: ANN001
        hp = self.hparams
        adv = self.adversarial
        g_opt, d_opt = self.optimizers()
        images = _images(batch)
        bs = images.shape[0]
        step = self.global_step  # generator optimizer steps so far
        n = hp.accumulate_grad_batches
        boundary = (batch_idx + 1) % n == 0 or self.trainer.is_last_batch

        # ---- generator
        try:
            out = self.model(images)
        except NonFiniteError as e:
            return self._skip_step(str(e))
        rec = out.reconstructions
        total, terms = self._reconstruction_terms(images, out)
        gan_w = adv.gan_weight(step)
        self.log("train/gan_weight", gan_w, batch_size=bs)
        if gan_w > 0:
            g_loss, _ = adv.generator_loss(rec)
            if adv.adaptive_weight:
                rec_loss = sum(v for k, v in terms.items() if not k.startswith("vq_"))
                aw = adaptive_weight(
                    rec_loss,
                    g_loss,
                    self.last_layer(),
                    max_weight=adv.adaptive_weight_max,
                    scale=self._loss_scale(),
                )
            else:
                aw = torch.ones((), device=rec.device)
            terms["gan"] = gan_w * aw * g_loss
            total = total + terms["gan"]
            self.log("train/g_loss", g_loss.detach(), batch_size=bs)
            self.log("train/adaptive_weight", aw, batch_size=bs)
        if self._not_finite(total):
            return self._skip_step(_bad_terms(total, terms))
        self._bad_in_a_row = 0
        self._reset_replaced_rows()
        self.manual_backward(total / n)

        # ---- discriminator (trained from disc_start on)
        d_active = adv.discriminator_active(step)
        if d_active:
            r1 = adv.r1_weight > 0 and int(adv.disc_steps) % adv.r1_every == 0
            d_total, d_terms = adv.discriminator_loss(images, rec, r1=r1)
            self.manual_backward(d_total / n)
            for name, value in d_terms.items():
                self.log(f"train/{name}", value, batch_size=bs)

        # ---- steps: discriminator first, then the generator, whose step updates the AMP
        # scaler once for both (every backward of the cycle ran under the same loss scale)
        if boundary:
            if d_active:
                self._discriminator_step(d_opt)
            g_opt.step()
            g_opt.zero_grad(set_to_none=True)
            self.lr_schedulers().step()
        self._log_training(images, out, total.detach(), {k: v.detach() for k, v in terms.items()})
        return total.detach()

    def _discriminator_step(self, d_opt) -> None:  # noqa: ANN001
        """Step the discriminator outside Lightning's step counter (see the module docstring).
        Under fp16 AMP: unscale, clip, ``scaler.step`` (skipped on inf); the scaler's update
        comes with the generator's step."""
        opt = getattr(d_opt, "optimizer", d_opt)
        scaler = self._scaler()
        if scaler is not None:
            scaler.unscale_(opt)
        self._clip(opt)
        if scaler is not None:
            scaler.step(opt)
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        self.adversarial.disc_steps += 1

    def on_before_optimizer_step(self, optimizer) -> None:  # noqa: ANN001
        # The generator's step: Lightning calls this after unscaling fp16 gradients.
        self._clip(optimizer)

    def _clip(self, optimizer) -> None:  # noqa: ANN001
        clip = self.hparams.gradient_clip_val
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def _scaler(self):  # noqa: ANN202
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def _loss_scale(self) -> float:
        scaler = self._scaler()
        return float(scaler.get_scale()) if scaler is not None else 1.0

    def last_layer(self) -> Tensor:
        """The decoder's output conv weight, where the adaptive weight compares gradients."""
        conv = getattr(self.model.decoder, "conv_out", None)
        if not isinstance(conv, nn.Conv2d):
            raise AttributeError(
                f"adaptive_weight needs the decoder's last conv as `decoder.conv_out`; "
                f"{type(self.model.decoder).__name__} has none (set adaptive_weight=False)"
            )
        return conv.weight

    # ------------------------------------------------------------------------------ optim
    def _generator_optimizer(self):  # noqa: ANN202
        return self.optimizers()[0]

    def _generator_parameters(self):  # noqa: ANN202
        yield from self.model.parameters()
        yield from self.loss.parameters()

    def _total_optimizer_steps(self) -> int:
        t = self._trainer
        est = t.estimated_stepping_batches if t is not None else 0
        if not est or not math.isfinite(est):
            return max(self.hparams.warmup_steps * 10, 1)
        # Lightning's estimate is in batches unless max_steps binds; steps come every N batches.
        if t.max_steps < 0 or est < t.max_steps:
            est = math.ceil(est / self.hparams.accumulate_grad_batches)
        return int(est)

    def configure_optimizers(self):  # noqa: ANN201
        hp = self.hparams
        gen = super().configure_optimizers()
        d_params = [p for p in self.discriminator.parameters() if p.requires_grad]
        d_opt = torch.optim.AdamW(
            d_params, lr=hp.disc_lr, betas=tuple(hp.disc_betas), weight_decay=hp.disc_weight_decay
        )
        return [gen["optimizer"], d_opt], [gen["lr_scheduler"]]

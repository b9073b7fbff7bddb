"""The adversarial part of a VQ-GAN: PatchGAN losses, the lambda_gan schedule, taming's adaptive
weight, and the LeCAM and R1 regularizers of the discriminator.

Plain torch: the training module (``vqkit.training.VQGANModule``) decides when each network
steps; this object owns the discriminator and computes the numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.discriminator import PatchDiscriminator

LOSSES = ("hinge", "non_saturating")


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]) (taming's ``hinge_d_loss``)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (E[softplus(-D(x))] + E[softplus(D(G(z)))]): binary cross-entropy on logits
    (taming's ``vanilla_d_loss``)."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """-E[D(G(z))] (taming's generator loss for both discriminator losses)."""
    return -logits_fake.mean()


def non_saturating_g_loss(logits_fake: Tensor) -> Tensor:
    """E[softplus(-D(G(z)))] = -E[log sigmoid(D(G(z)))], Goodfellow's non-saturating loss."""
    return F.softplus(-logits_fake).mean()


def adaptive_weight(
    rec_loss: Tensor,
    g_loss: Tensor,
    last_layer: Tensor,
    *,
    max_weight: float = 1e4,
    scale: float = 1.0,
) -> Tensor:
    """taming's ``calculate_adaptive_weight``: ||grad rec_loss|| / (||grad g_loss|| + 1e-4) at
    ``last_layer`` (the decoder's output conv weight), clamped to [0, max_weight], detached.

    ``scale``: both losses are multiplied by it before differentiating (the AMP loss scale, so
    fp16 gradients do not underflow); the ratio does not change, the epsilon is scaled with it.
    The graph is kept for the real backward pass.
    """
    rec_grad = torch.autograd.grad(rec_loss * scale, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss * scale, last_layer, retain_graph=True)[0]
    w = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4 * scale)
    # A non-finite ratio (overflowed fp16 gradients) gives no adversarial push this step; the
    # scaler skips such a step anyway.
    return torch.nan_to_num(w, nan=0.0, posinf=0.0).clamp(0.0, max_weight).detach()


class AdversarialLoss(nn.Module):
    """The adversarial term of a VQ-GAN and its schedule.

    Args:
        discriminator: the network that scores images (default ``PatchDiscriminator()``).
        loss: ``"hinge"`` (taming, seed 004) or ``"non_saturating"``.
        weight: lambda_gan at the end of the ramp (seed 004: 0.1; tune within 0.05-0.2).
        disc_start: generator step from which the discriminator trains (before it: a pure
            VQ-VAE, and the discriminator is not even evaluated).
        ramp_steps: lambda_gan rises linearly from 0 at ``disc_start`` to ``weight`` at
            ``disc_start + ramp_steps`` (0: jumps to ``weight`` at ``disc_start``). Seed 004:
            ``disc_start=20000, ramp_steps=20000``.
        adaptive_weight: multiply the generator loss by taming's ratio of gradient norms at the
            decoder's last layer (see ``adaptive_weight``), so the GAN term never dominates.
        adaptive_weight_max: the clamp of that ratio (taming: 1e4).
        lecam_weight: LeCAM regularization (Tseng et al. 2021) of the discriminator,
            E[relu(D(x) - ema_fake)^2] + E[relu(ema_real - D(G(z)))^2]; 0 turns it off.
        lecam_decay: decay of the EMAs of the mean real and fake logits (buffers; they resume).
        r1_weight: gamma of the R1 penalty gamma/2 * E[||grad_x D(x)||^2] on real images; 0 off.
        r1_every: lazy R1 (StyleGAN2): computed on every ``r1_every``-th discriminator step and
            multiplied by ``r1_every``, computed in fp32 outside autocast.
    """

    def __init__(
        self,
        discriminator: nn.Module | None = None,
        loss: str = "hinge",
        weight: float = 0.1,
        disc_start: int = 0,
        ramp_steps: int = 0,
        adaptive_weight: bool = False,
        adaptive_weight_max: float = 1e4,
        lecam_weight: float = 0.0,
        lecam_decay: float = 0.99,
        r1_weight: float = 0.0,
        r1_every: int = 16,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        for name, v in (
            ("weight", weight),
            ("disc_start", disc_start),
            ("ramp_steps", ramp_steps),
            ("lecam_weight", lecam_weight),
            ("r1_weight", r1_weight),
        ):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if adaptive_weight_max <= 0:
            raise ValueError(f"adaptive_weight_max must be > 0, got {adaptive_weight_max}")
        if not 0 <= lecam_decay < 1:
            raise ValueError(f"lecam_decay must be in [0, 1), got {lecam_decay}")
        if r1_every < 1:
            raise ValueError(f"r1_every must be >= 1, got {r1_every}")
        self.discriminator = discriminator if discriminator is not None else PatchDiscriminator()
        self.loss = loss
        self.weight = weight
        self.disc_start = disc_start
        self.ramp_steps = ramp_steps
        self.adaptive_weight = adaptive_weight
        self.adaptive_weight_max = adaptive_weight_max
        self.lecam_weight = lecam_weight
        self.lecam_decay = lecam_decay
        self.r1_weight = r1_weight
        self.r1_every = r1_every
        self._d_loss = hinge_d_loss if loss == "hinge" else non_saturating_d_loss
        self._g_loss = hinge_g_loss if loss == "hinge" else non_saturating_g_loss
        # State that must resume: the LeCAM anchors and the discriminator's step count (R1 phase).
        self.register_buffer("lecam_ema_real", torch.zeros(()))
        self.register_buffer("lecam_ema_fake", torch.zeros(()))
        self.register_buffer("lecam_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("disc_steps", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------------------ schedule
    def gan_weight(self, step: int) -> float:
        """lambda_gan at generator step ``step``: 0 before ``disc_start``, then a linear ramp."""
        if step < self.disc_start:
            return 0.0
        if self.ramp_steps == 0:
            return float(self.weight)
        return float(self.weight) * min(1.0, (step - self.disc_start) / self.ramp_steps)

    def discriminator_active(self, step: int) -> bool:
        """Whether the discriminator trains at generator step ``step``."""
        return step >= self.disc_start

    # ------------------------------------------------------------------------------ generator
    def generator_loss(self, reconstructions: Tensor) -> tuple[Tensor, Tensor]:
        """(generator loss, fake logits). The discriminator's parameters get no gradient."""
        d = self.discriminator
        flags = [p.requires_grad for p in d.parameters()]
        d.requires_grad_(False)
        try:
            logits_fake = d(reconstructions)
        finally:
            for p, f in zip(d.parameters(), flags, strict=True):
                p.requires_grad_(f)
        return self._g_loss(logits_fake), logits_fake

    # ------------------------------------------------------------------------------ discriminator
    def discriminator_loss(
        self, images: Tensor, reconstructions: Tensor, *, r1: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Discriminator loss on real ``images`` and (detached) ``reconstructions``.

        Returns the total and a dict with ``d_loss`` (the plain GAN loss), ``logits_real``,
        ``logits_fake`` and, when on, ``lecam`` and ``r1`` (weighted, as added to the total).
        ``r1=True`` adds the lazy R1 term (the module asks every ``r1_every`` steps).
        """
        fake = reconstructions.detach()
        logits_real = self.discriminator(images.detach())
        logits_fake = self.discriminator(fake)
        d_loss = self._d_loss(logits_real, logits_fake)
        terms = {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().float().mean(),
            "logits_fake": logits_fake.detach().float().mean(),
        }
        total = d_loss
        if self.lecam_weight > 0:
            lecam = self.lecam_weight * self.lecam_penalty(logits_real, logits_fake)
            terms["lecam"] = lecam.detach()
            total = total + lecam
        if r1 and self.r1_weight > 0:
            r1_term = self.r1_weight / 2 * self.r1_penalty(images) * self.r1_every
            terms["r1"] = r1_term.detach()
            total = total + r1_term
        return total, terms

    def lecam_penalty(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        """Update the logit EMAs (the first call sets them), then
        E[relu(D(x) - ema_fake)^2] + E[relu(ema_real - D(G(z)))^2]."""
        real = logits_real.detach().float().mean()
        fake = logits_fake.detach().float().mean()
        with torch.no_grad():
            if int(self.lecam_updates) == 0:
                self.lecam_ema_real.copy_(real)
                self.lecam_ema_fake.copy_(fake)
            else:
                self.lecam_ema_real.lerp_(real, 1 - self.lecam_decay)
                self.lecam_ema_fake.lerp_(fake, 1 - self.lecam_decay)
            self.lecam_updates += 1
        return lecam_penalty(logits_real, logits_fake, self.lecam_ema_real, self.lecam_ema_fake)

    def r1_penalty(self, images: Tensor) -> Tensor:
        """E[||grad_x D(x)||^2] over real images, in fp32 with autocast off."""
        x = images.detach().float().requires_grad_(True)
        with torch.autocast(x.device.type, enabled=False):
            logits = self.discriminator(x)
            (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
        return grad.square().sum(dim=(1, 2, 3)).mean()


def lecam_penalty(
    logits_real: Tensor, logits_fake: Tensor, ema_real: Tensor, ema_fake: Tensor
) -> Tensor:
    """LeCAM regularizer: E[relu(D(x) - ema_fake)^2] + E[relu(ema_real - D(G(z)))^2]."""
    real = logits_real.float()
    fake = logits_fake.float()
    return F.relu(real - ema_fake).square().mean() + F.relu(ema_real - fake).square().mean()

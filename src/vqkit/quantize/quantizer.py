"""VectorQuantizer: nearest-code assignment, straight-through gradients, losses and usage.

The quantizer owns its step counter (a buffer incremented once per training forward), so every
schedule of its maintenance strategies runs inside it: no trainer has to thread a step in, which
was the pain point of wiring VQFR's re-estimation into another training loop (seed 001).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configurable import Configurable, to_config
from ..pretrained import PretrainedMixin, inference_quantizer_config
from . import distributed as D
from .distance import DEFAULT_MAX_BLOCK, nearest, pairwise_sqdist, sample_nearest
from .interface import MaintenanceEvent
from .maintenance import EMAUpdate, Maintenance
from .regularizers import Regularizer
from .reservoir import ReservoirSampler
from .usage import CodeUsage

log = logging.getLogger("vqkit.quantize")


class NonFiniteError(ValueError):
    """A quantizer input with NaN or Inf values, or values so large that their squared
    distances overflow float32: raised before anything reaches the codebook, the reservoirs or
    the statistics (the training module skips such a step)."""


@dataclass
class QuantizerOutput:
    """What a forward returns.

    ``losses`` holds the weighted terms, so ``loss == sum(losses.values())``. ``used_codes`` and
    ``perplexity`` describe this batch (summed over processes in training under DDP).
    ``passthrough`` is True on a warm-up step: the input went through unquantized, so the
    indices were assigned but used by nothing (and not counted in the usage statistics).
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    used_codes: Tensor | None = None
    perplexity: Tensor | None = None
    passthrough: bool = False


class _MSETo(torch.autograd.Function):
    """``mse(a, b)`` whose value is computed once outside and whose gradient flows to ``a`` only.

    Commitment (gradient to z) and codebook (gradient to q) losses have the same value; sharing
    it and writing each gradient in one pass saves memory traffic on large token batches.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, value: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(a, b)
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        a, b = ctx.saved_tensors
        return torch.sub(a, b).mul_(grad * (2.0 / max(a.numel(), 1))), None, None


class _StraightThrough(torch.autograd.Function):
    """Forward returns the codes ``q``; backward hands the gradient to the inputs ``z``."""

    @staticmethod
    def forward(ctx, z: Tensor, q: Tensor) -> Tensor:  # noqa: ANN001
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        return grad, None


class VectorQuantizer(Configurable, PretrainedMixin, nn.Module):
    """Vector quantizer for any autoencoder: image maps, sequences, or flat token lists.

    Args:
        dim: channels of the input.
        codebook_size: number of codes K (>= 2).
        codebook_dim: dimension of the code space; ``< dim`` adds linear projections in and out
            (low-dimensional factorized codes, as in ViT-VQGAN / LlamaGen).
        distance: ``"l2"`` or ``"cosine"`` (inputs and codes L2-normalized).
        commitment_weight: beta of the commitment loss ``||z - sg[q]||^2`` (0.25 as in VQFR).
        commitment_warmup_steps: ramp beta linearly from 0 over this many quantized training
            forwards, counted from when quantization begins (after any ``KMeansInit`` warm-up);
            seed 002's commitment warm-up. 0: the full weight from the start.
        codebook_weight: weight of the codebook loss ``||sg[z] - q||^2`` (gradient mode only).
        ema: an ``EMAUpdate`` to learn the codebook by moving averages instead of gradients.
        maintenance: strategies that keep the codebook alive (``KMeansInit``,
            ``KMeansReestimate``, ``DeadCodeRestart``), run in order every training forward.
        regularizers: extra loss terms on the soft assignment (``EntropyPenalty``).
        sample_temperature: > 0 samples codes from softmax(-d / tau) in training (seed 002);
            evaluation always takes the nearest code.
        channel_first: True for (B, D, *spatial) maps, False for (..., D) tokens, including
            flat (N, D) lists. Stated, never guessed.
        codebook_init: ``"normal"`` (N(0, 1)) or ``"uniform"`` (U(-1/K, 1/K), taming's).
        max_block: bound on the elements of any M x K distance block.
        check_finite: raise on NaN/Inf input before anything reaches the codebook (one sync).
        usage_decay: decay of the EMA usage counts that dead-code restart reads.
        dead_below: a code counts as dead in usage figures when used fewer times than this.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        codebook_dim: int | None = None,
        distance: str = "l2",
        commitment_weight: float = 0.25,
        commitment_warmup_steps: int = 0,
        codebook_weight: float = 1.0,
        ema: EMAUpdate | None = None,
        maintenance: Sequence[Maintenance] = (),
        regularizers: Sequence[Regularizer] = (),
        sample_temperature: float = 0.0,
        channel_first: bool = False,
        codebook_init: str = "normal",
        max_block: int = DEFAULT_MAX_BLOCK,
        check_finite: bool = True,
        usage_decay: float = 0.99,
        dead_below: float = 1.0,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        if not 1 <= codebook_dim <= dim:
            raise ValueError(f"codebook_dim must be in [1, dim={dim}], got {codebook_dim}")
        if distance not in ("l2", "cosine"):
            raise ValueError(f"distance must be 'l2' or 'cosine', got {distance!r}")
        if commitment_weight < 0 or codebook_weight < 0:
            raise ValueError(
                f"loss weights must be >= 0, got commitment_weight={commitment_weight}, "
                f"codebook_weight={codebook_weight}"
            )
        if commitment_warmup_steps < 0:
            raise ValueError(f"commitment_warmup_steps must be >= 0, got {commitment_warmup_steps}")
        if sample_temperature < 0:
            raise ValueError(f"sample_temperature must be >= 0, got {sample_temperature}")
        if codebook_init not in ("normal", "uniform"):
            raise ValueError(f"codebook_init must be 'normal' or 'uniform', got {codebook_init!r}")
        if max_block < 1:
            raise ValueError(f"max_block must be >= 1, got {max_block}")
        if ema is not None and not isinstance(ema, EMAUpdate):
            raise TypeError(f"ema must be an EMAUpdate or None, got {type(ema).__name__}")
        for m in maintenance:
            if not isinstance(m, Maintenance):
                raise TypeError(f"maintenance items must be Maintenance modules, got {m!r}")
        for r in regularizers:
            if not isinstance(r, Regularizer):
                raise TypeError(f"regularizers must be Regularizer modules, got {r!r}")

        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.distance = distance
        self.commitment_weight = commitment_weight
        self.commitment_warmup_steps = commitment_warmup_steps
        self.codebook_weight = codebook_weight
        self.sample_temperature = sample_temperature
        self.channel_first = channel_first
        self.max_block = max_block
        self.check_finite = check_finite

        if codebook_dim != dim:
            self.project_in: nn.Module = nn.Linear(dim, codebook_dim)
            self.project_out: nn.Module = nn.Linear(codebook_dim, dim)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()

        if codebook_init == "uniform":
            init = torch.empty(codebook_size, codebook_dim).uniform_(
                -1.0 / codebook_size, 1.0 / codebook_size
            )
        else:
            init = torch.randn(codebook_size, codebook_dim)
        if distance == "cosine":
            init = F.normalize(init, dim=1)
        if ema is None:
            self.codebook = nn.Parameter(init)
        else:
            # EMA codes are statistics, not parameters: no optimizer may touch them.
            self.register_buffer("codebook", init)

        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # training forwards that quantized (not warm-up pass-throughs)
        self.register_buffer("quantized_steps", torch.zeros((), dtype=torch.long))
        self._quantized_cache: int | None = None
        # Codes replaced since reset_optimizer_state last ran (gradient mode's stale Adam rows).
        self.register_buffer("replaced_mask", torch.zeros(codebook_size, dtype=torch.bool))
        self.register_buffer("num_replacements", torch.zeros((), dtype=torch.long))
        self._step_cache: int | None = None
        self._last_tokens = 0  # global tokens of the last training forward, for EMA-count units
        self._last_min_dist: Tensor | None = None
        # What the strategies did, newest last, until someone drains it (not state: a resumed run
        # starts with none). Bounded, so a loop that never drains it does not grow.
        self.events: deque[MaintenanceEvent] = deque(maxlen=1024)

        self.usage = CodeUsage(codebook_size, ema_decay=usage_decay, dead_below=dead_below)
        # Reservoirs of encoder outputs, one per (size, dtype, device, seed): strategies that
        # ask for the same one share it (k-means init and re-estimation fill one reservoir, and
        # a checkpoint holds it once).
        self.reservoirs = nn.ModuleDict()
        self.ema = ema
        self.maintenance = nn.ModuleList(maintenance)
        self.regularizers = nn.ModuleList(regularizers)
        for m in (ema, *maintenance, *regularizers):
            if m is not None:
                m.bind(self)

    # ----------------------------------------------------------------------------- state
    @property
    def current_step(self) -> int:
        """Training forwards done so far. A Python mirror of the ``step`` buffer avoids a device
        sync every step; it is refreshed whenever a state dict is loaded."""
        if self._step_cache is None:
            self._step_cache = int(self.step)
        return self._step_cache

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        self._step_cache = None
        self._quantized_cache = None
        self._move_old_reservoir_keys(state_dict, prefix)
        key = prefix + "quantized_steps"
        if key not in state_dict and prefix + "step" in state_dict:
            # a checkpoint from before quantized_steps: its warm-up, if any, is long over
            state_dict[key] = state_dict[prefix + "step"].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def shared_reservoir(
        self, size: int, dtype: torch.dtype, device: str | None, seed: int
    ) -> ReservoirSampler:
        """The reservoir of this spec, created on first request (see ``reservoirs``)."""
        name = str(dtype).removeprefix("torch.")
        key = f"r{size}_{name}_{(device or 'codebook').replace(':', '')}_s{seed}"
        if key not in self.reservoirs:
            self.reservoirs[key] = ReservoirSampler(
                size, self.codebook_dim, dtype=dtype, device=device, seed=seed
            )
        return self.reservoirs[key]

    def _move_old_reservoir_keys(self, state_dict: dict, prefix: str) -> None:
        """Checkpoints from before shared reservoirs kept one per strategy, under
        ``maintenance.<i>.reservoir.``: move each to the shared one it now uses (strategies
        that share one filled it identically; the last in the list wins)."""
        for i, m in enumerate(self.maintenance):
            old = f"{prefix}maintenance.{i}.reservoir."
            res = m.__dict__.get("reservoir")
            keys = [k for k in state_dict if k.startswith(old)]
            if res is None or not keys:
                continue
            name = next(n for n, r in self.reservoirs.items() if r is res)
            for k in keys:
                state_dict[f"{prefix}reservoirs.{name}.{k[len(old) :]}"] = state_dict.pop(k)

    @property
    def last_tokens(self) -> int:
        """Tokens of the last training forward, summed over processes (``CodebookOwner``)."""
        return self._last_tokens

    @property
    def last_min_dist(self) -> Tensor | None:
        """Each token's squared distance to its code in the last training forward, kept only
        when a strategy needs it (``CodebookOwner``)."""
        return self._last_min_dist

    def commitment_scale(self) -> float:
        """The share of ``commitment_weight`` in force (the warm-up ramp; 1 in eval)."""
        if not self.training or self.commitment_warmup_steps == 0:
            return 1.0
        if self._quantized_cache is None:
            self._quantized_cache = int(self.quantized_steps)
        return min(1.0, (self._quantized_cache + 1) / self.commitment_warmup_steps)

    # ------------------------------------------------------------------------- pretrained
    pretrained_kind = "quantizer"

    def pretrained_config(self) -> dict:
        """This quantizer's config without EMA, maintenance and regularizers (training only):
        ``from_pretrained`` gives a quantizer that assigns and decodes the same codes."""
        return inference_quantizer_config(to_config(self, type(self).__name__))

    def pretrained_facts(self, **facts):  # noqa: ANN003, ANN201
        out = {
            "dim": self.dim,
            "codebook_size": self.codebook_size,
            "codebook_dim": self.codebook_dim,
            "distance": self.distance,
        }
        out.update({k: v for k, v in facts.items() if v is not None})
        return out

    @property
    def uses_ema(self) -> bool:
        return self.ema is not None

    def pop_events(self) -> list[MaintenanceEvent]:
        """The maintenance events since the last call, oldest first."""
        out = list(self.events)
        self.events.clear()
        return out

    def describe_schedule(self) -> list[str]:
        """What keeps this codebook alive and when, one line per part (printed at the start of a
        run; steps are the quantizer's training forwards)."""
        k, d = self.codebook_size, self.codebook_dim
        lines = [f"codebook: {k} codes of dimension {d}, {self.distance} distance"]
        if self.ema is not None:
            lines.append(self.ema.describe(self))
        else:
            lines.append(
                f"gradient codebook: codebook loss weight {self.codebook_weight:g}, commitment "
                f"weight {self.commitment_weight:g}"
            )
        if self.commitment_warmup_steps:
            lines.append(
                f"commitment weight {self.commitment_weight:g} ramped up from 0 over the first "
                f"{self.commitment_warmup_steps} quantized steps"
            )
        lines += [m.describe(self) for m in self.maintenance]
        if not self.maintenance:
            lines.append("no codebook maintenance (no k-means, re-estimation or restart)")
        return lines

    def effective_codebook(self) -> Tensor:
        """The codes as used for assignment (normalized in cosine mode), in fp32."""
        c = self.codebook.float()
        return F.normalize(c, dim=1) if self.distance == "cosine" else c

    # ----------------------------------------------------------------------------- layout
    def _flatten(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        if self.channel_first:
            if x.dim() < 3:
                raise ValueError(
                    f"channel_first=True expects (B, D, *spatial) with D={self.dim}, "
                    f"got shape {tuple(x.shape)}"
                )
            if x.shape[1] != self.dim:
                raise ValueError(
                    f"input has {x.shape[1]} channels at dim 1, quantizer dim is {self.dim} "
                    f"(shape {tuple(x.shape)})"
                )
            x = x.movedim(1, -1)
        else:
            if x.dim() < 2:
                raise ValueError(
                    f"channel_first=False expects (..., D) with D={self.dim}, got shape "
                    f"{tuple(x.shape)}"
                )
            if x.shape[-1] != self.dim:
                raise ValueError(
                    f"input has {x.shape[-1]} channels in the last dim, quantizer dim is "
                    f"{self.dim} (shape {tuple(x.shape)}); pass channel_first=True for (B, D, ...)"
                )
        lead = tuple(x.shape[:-1])
        return x.reshape(-1, self.dim), lead

    def _unflatten(self, flat: Tensor, lead: tuple[int, ...]) -> Tensor:
        # For channel-first maps this returns a channels-last strided view rather than copying:
        # convolutions accept it (and are faster with it on CPU).
        x = flat.reshape(*lead, flat.shape[-1])
        return x.movedim(-1, 1) if self.channel_first else x

    def _check_finite(self, x: Tensor) -> None:
        # One reduction decides the common case: a finite fp32 sum of squares means no NaN/Inf
        # and no value whose squared distance to a code overflows fp32 (|x| up to ~1e19 is
        # fine; an encoder output that large is a diverged run, not data).
        together = self.training and D.is_distributed()
        # (fp64 is narrowed first: the quantizer computes in fp32, where 1e200 is Inf)
        xs = x.float() if x.dtype == torch.float64 else x
        if not x.numel():
            norm = None
        elif xs.dtype == torch.float32 and xs.is_contiguous():
            flat = xs.view(-1)
            norm = torch.dot(flat, flat)  # BLAS: 2.6x faster than vector_norm on CPU
        else:
            norm = torch.linalg.vector_norm(xs, dtype=torch.float32)
        if not together and (norm is None or bool(torch.isfinite(norm))):
            return
        bad = (~torch.isfinite(x)).sum(dtype=torch.float32)
        huge = x.new_zeros((), dtype=torch.float32) if norm is None else (~norm.isfinite()).float()
        if together:
            # every process decides together (training forwards are collective): one that
            # raised alone would leave the others waiting in the next all-reduce
            both = D.all_reduce_sum_(torch.stack([bad, huge]))
            bad, huge = both[0], both[1]
        bad, huge = int(bad), int(huge)
        where = " (over all processes)" if together else ""
        unchanged = (
            "; nothing was quantized and the codebook, reservoirs and statistics are unchanged"
        )
        if bad:
            raise NonFiniteError(
                f"quantizer input has {bad} non-finite values (NaN or Inf) out of {x.numel()}"
                + where
                + unchanged
            )
        if huge:
            top = float(x.detach().abs().max()) if x.numel() else 0.0
            raise NonFiniteError(
                f"quantizer input is too large (max |value| {top:.3g}{where}): its squared "
                "distances overflow float32" + unchanged
            )

    def _to_code_space(self, flat: Tensor) -> Tensor:
        z = self.project_in(flat).float()
        return F.normalize(z, dim=1) if self.distance == "cosine" else z

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> QuantizerOutput:
        if self.check_finite:
            self._check_finite(x)
        flat, lead = self._flatten(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self._quantize(flat.float() if flat.dtype != torch.float32 else flat)
        quantized, indices, loss, losses, used, ppl, passthrough = out
        quantized = self._unflatten(quantized.to(x.dtype), lead)
        return QuantizerOutput(
            quantized=quantized,
            indices=indices.view(lead),
            loss=loss,
            losses=losses,
            used_codes=used,
            perplexity=ppl,
            passthrough=passthrough,
        )

    def _quantize(self, flat: Tensor):  # noqa: ANN202
        z = self._to_code_space(flat)
        training = self.training
        passthrough = False
        step = self.current_step
        if training:
            zd = z.detach()
            for m in self.maintenance:
                # Every strategy sees every step (reservoirs keep filling) even once one of
                # them has asked for a pass-through.
                passthrough = m.before_quantize(self, zd) or passthrough

        codes = self.effective_codebook()
        zd = z.detach()
        if training and self.sample_temperature > 0:
            indices = sample_nearest(
                zd, codes.detach(), self.sample_temperature, max_block=self.max_block
            )
            self._last_min_dist = None
        else:
            # Only dead-code restart reads the distances; skipping them saves passes over z.
            want = training and any(m.needs_min_distances for m in self.maintenance)
            indices, self._last_min_dist = nearest(
                zd, codes.detach(), max_block=self.max_block, return_distances=want
            )

        counts, sums = self._batch_stats(zd, indices, with_sums=training and self.uses_ema)
        if training:
            self._last_tokens = int(counts.sum().item()) if D.is_distributed() else z.shape[0]
            if not passthrough:
                # a warm-up step's assignments are used by nothing: they count for no code
                self.usage.update_train(counts.long())
            if self.ema is not None and not passthrough:
                self.ema.update(self, counts, sums)
                codes = self.effective_codebook()
        else:
            self.usage.update_eval(counts.long())

        zero = z.new_zeros(())
        if passthrough:
            # VQFR's warm-up: the decoder sees the encoder's output unquantized while the
            # reservoir fills; no VQ loss since there is no code to commit to yet.
            quantized, losses = z, {}
            if not self.uses_ema and torch.is_grad_enabled():
                # A gradient codebook must still be in the graph (with a zero gradient): DDP
                # fails on a parameter that produced no gradient in a step.
                losses["codebook"] = 0.0 * self.codebook.sum()
        else:
            q = F.embedding(indices, codes)
            qd = q.detach()
            with torch.no_grad():
                mse = F.mse_loss(zd, qd) if z.numel() else z.new_zeros(())
            # A process may hold no tokens in a step (sparse inputs, uneven shards): its loss is
            # then 0, not the NaN of an empty mean, and it still joins every collective.
            beta = self.commitment_weight * self.commitment_scale()
            losses = {"commitment": beta * _MSETo.apply(z, qd, mse)}
            if not self.uses_ema:
                losses["codebook"] = self.codebook_weight * _MSETo.apply(q, zd, mse)
            for r in self.regularizers:
                losses[r.name] = r(self, z)
            # Straight-through: forward uses q, backward copies the gradient to z.
            quantized = _StraightThrough.apply(z, q)
        loss = sum(losses.values(), zero)

        if training:
            if not passthrough:
                for m in self.maintenance:
                    m.after_assign(self, zd, indices, counts)
                self.quantized_steps.add_(1)
                if self._quantized_cache is not None:
                    self._quantized_cache += 1
            self.step.add_(1)
            self._step_cache = step + 1

        used = (counts > 0).sum()
        p = counts / counts.sum().clamp_min(1)
        ppl = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
        return self.project_out(quantized), indices, loss, losses, used, ppl, passthrough

    def _batch_stats(self, z: Tensor, indices: Tensor, *, with_sums: bool):
        """Per-code counts (and sums of assigned vectors for EMA), summed over processes in
        training in a single all-reduce."""
        k = self.codebook_size
        counts = torch.bincount(indices, minlength=k).float()
        sums = None
        if with_sums:
            sums = torch.zeros(k, z.shape[1], dtype=torch.float32, device=z.device)
            sums.index_add_(0, indices, z)
        if self.training and D.is_distributed():
            if sums is None:
                D.all_reduce_sum_(counts)
            else:
                packed = torch.cat([counts[:, None], sums], dim=1)
                D.all_reduce_sum_(packed)
                counts, sums = packed[:, 0].contiguous(), packed[:, 1:].contiguous()
        return counts, sums

    # ----------------------------------------------------------------------------- maintenance API
    @torch.no_grad()
    def replace_codes(self, mask: Tensor, new_codes: Tensor, new_counts: Tensor) -> int:
        """Replace the codes in ``mask`` (K,) bool by ``new_codes`` (n, codebook_dim).

        ``new_counts`` (n,) are the expected per-step token counts of the new codes; the EMA
        cluster sizes and sums of the replaced codes are set from them (consistently: code =
        sum / size) instead of being left stale or zeroed. Under DDP, rank 0's new codes and
        counts are broadcast so every process holds the same codebook. Returns the number of
        codes replaced.
        """
        mask = mask.to(self.codebook.device)
        n = int(mask.sum())
        if n == 0:
            return 0
        new_codes = new_codes.to(self.codebook.device, torch.float32).contiguous()
        new_counts = new_counts.to(self.codebook.device, torch.float32).contiguous()
        if new_codes.shape != (n, self.codebook_dim) or new_counts.shape != (n,):
            raise ValueError(
                f"replace_codes: {n} codes masked but got new_codes {tuple(new_codes.shape)} "
                f"and new_counts {tuple(new_counts.shape)}"
            )
        D.broadcast_(new_codes, src=0)
        D.broadcast_(new_counts, src=0)
        if self.distance == "cosine":
            new_codes = F.normalize(new_codes, dim=1)
        self.codebook.data[mask] = new_codes.to(self.codebook.dtype)
        full_counts = torch.zeros(self.codebook_size, device=self.codebook.device)
        full_counts[mask] = new_counts
        if self.ema is not None:
            self.ema.on_codes_replaced(self, mask, full_counts)
        self.usage.on_codes_replaced(mask, full_counts)
        self.replaced_mask |= mask
        self.num_replacements.add_(1)
        return n

    # ----------------------------------------------------------------------------- encode/decode
    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Indices of the nearest codes; deterministic, touches no statistics."""
        flat, lead = self._flatten(x)
        # the input checks read data: torch.export / torch.compile trace without them
        if self.check_finite and not torch.compiler.is_compiling():
            self._check_finite(flat)
        # fp32 under AMP; an exported program runs without autocast (and cannot save its node)
        exporting = torch.compiler.is_exporting()
        with nullcontext() if exporting else torch.autocast(x.device.type, enabled=False):
            z = self._to_code_space(flat.float())
            idx, _ = nearest(
                z, self.effective_codebook(), max_block=self.max_block, return_distances=False
            )
        return idx.view(lead)

    def decode(self, indices: Tensor) -> Tensor:
        """Code vectors for ``indices``, projected back to ``dim``, in the quantizer's layout."""
        if indices.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        checked = indices.numel() and not torch.compiler.is_compiling()
        if checked and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"indices must be in [0, {self.codebook_size}), got range "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        v = self.project_out(F.embedding(indices.long(), self.effective_codebook()))
        if self.channel_first:
            if indices.dim() < 2:
                raise ValueError(
                    "channel_first decode expects (B, *spatial) indices, got "
                    f"{tuple(indices.shape)}"
                )
            v = v.movedim(-1, 1)
        return v

    def distances(self, z: Tensor) -> Tensor:
        """Full (M, K) squared distances from code-space vectors ``z``; differentiable."""
        return pairwise_sqdist(z, self.effective_codebook())

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, "
            f"codebook_dim={self.codebook_dim}, "
            f"distance={self.distance!r}, mode={'ema' if self.uses_ema else 'gradient'}"
        )


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, quantizer: VectorQuantizer) -> int:
    """Reset the optimizer moments of the codebook rows replaced since the last call.

    After a reset in gradient mode, Adam's moments of the replaced rows describe the old codes.
    A dead row's second moment has decayed towards zero, so leaving it would make the revived
    code's first steps huge. The first moment of those rows is zeroed and the second set to the
    mean of the rows that were kept (their typical scale); momentum buffers (SGD) are zeroed.
    Returns the number of rows reset (0 in EMA mode, where the codebook is not a parameter).
    """
    mask = quantizer.replaced_mask
    n = int(mask.sum())
    if n == 0 or quantizer.uses_ema:
        quantizer.replaced_mask.zero_()
        return 0
    param = quantizer.codebook
    state = optimizer.state.get(param)
    if state:
        keep = ~mask
        for key in ("exp_avg", "momentum_buffer"):
            if isinstance(state.get(key), Tensor):
                state[key][mask] = 0
        for key in ("exp_avg_sq", "max_exp_avg_sq"):
            t = state.get(key)
            if isinstance(t, Tensor):
                ref = t[keep] if bool(keep.any()) else t
                t[mask] = ref.mean(0, keepdim=True).to(t.dtype)
    quantizer.replaced_mask.zero_()
    return n

"""Strategies that keep a codebook alive, each a small module with its state in buffers.

They are handed to the quantizer (``maintenance=[KMeansReestimate(every=2000)]``) and driven by
its step counter: ``before_quantize`` sees every training batch before assignment (reservoirs
fill, schedules fire), ``after_assign`` sees the assignment (usage-based restarts).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configurable import Configurable
from . import distributed as D
from .distance import nearest
from .interface import CodebookOwner, MaintenanceEvent
from .kmeans import check_local_trials, kmeans, kmeans_plusplus
from .reservoir import ReservoirSampler

log = logging.getLogger("vqkit.quantize")


def _emit(quantizer: CodebookOwner, event: MaintenanceEvent, level: int = logging.INFO) -> None:
    quantizer.events.append(event)
    if D.rank() == 0:
        log.log(level, "%s", event.message())


class EMAUpdate(Configurable, nn.Module):
    """Learn the codebook as moving averages of its assigned vectors (VQ-VAE appendix, Sonnet).

    ``cluster_size`` and ``embed_sum`` start consistent with the initial codes (one pseudo-count
    at each code) so unused codes neither blow up nor jump; cluster sizes are Laplace-smoothed.
    """

    def __init__(self, decay: float = 0.99, eps: float = 1e-5) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.decay = decay
        self.eps = eps
        self._bound = False

    def bind(self, quantizer: CodebookOwner) -> None:
        if self._bound:
            raise ValueError(
                "this EMAUpdate is already bound to a quantizer; make one per quantizer"
            )
        self._bound = True
        k = quantizer.codebook_size
        self.register_buffer("cluster_size", torch.ones(k))
        self.register_buffer("embed_sum", quantizer.codebook.detach().clone().float())

    @torch.no_grad()
    def update(self, quantizer: CodebookOwner, counts: Tensor, sums: Tensor) -> None:
        d = self.decay
        self.cluster_size.mul_(d).add_(counts, alpha=1.0 - d)
        self.embed_sum.mul_(d).add_(sums, alpha=1.0 - d)
        n = self.cluster_size.sum()
        k = self.cluster_size.numel()
        smoothed = (self.cluster_size + self.eps) / (n + k * self.eps) * n
        codes = self.embed_sum / smoothed[:, None]
        if quantizer.distance == "cosine":
            codes = F.normalize(codes, dim=1)
        quantizer.codebook.copy_(codes.to(quantizer.codebook.dtype))

    @torch.no_grad()
    def on_codes_replaced(self, quantizer: CodebookOwner, mask: Tensor, counts: Tensor) -> None:
        self.cluster_size[mask] = counts[mask]
        self.embed_sum[mask] = quantizer.codebook.float()[mask] * counts[mask, None]

    def extra_repr(self) -> str:
        return f"decay={self.decay}, eps={self.eps}"

    def describe(self, quantizer: CodebookOwner) -> str:
        return f"EMA codebook: moving averages of the assigned vectors, decay {self.decay}"


class Maintenance(Configurable, nn.Module):
    """Base class of codebook-maintenance strategies."""

    #: set by strategies that read ``quantizer.last_min_dist`` (each token's squared distance
    #: to its code); the quantizer computes it only when some strategy asks.
    needs_min_distances = False

    def bind(self, quantizer: CodebookOwner) -> None:
        """Called once by the owning quantizer: create buffers sized to its codebook."""

    def before_quantize(self, quantizer: CodebookOwner, z: Tensor) -> bool:
        """Training forwards only, before assignment. Return True to pass ``z`` through
        unquantized this step (warm-up)."""
        return False

    def after_assign(
        self, quantizer: CodebookOwner, z: Tensor, indices: Tensor, counts: Tensor
    ) -> None:
        """Training forwards only, after assignment; ``counts`` are global per-code counts."""

    def describe(self, quantizer: CodebookOwner) -> str:
        """One line saying what this strategy will do and when (printed at the start of a run)."""
        return repr(self)


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


_RESERVOIR_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# reservoir_size=None: RESERVOIR_PER_CODE vectors per code, at least MIN_RESERVOIR
MIN_RESERVOIR = 16384
RESERVOIR_PER_CODE = 4


def default_reservoir_size(codebook_size: int) -> int:
    """The reservoir a strategy keeps when ``reservoir_size`` is None: 4 vectors per code, at
    least 16,384. On 2 per code, whole-codebook k-means puts codes on single training vectors:
    65.7% of 8,192 codes used on the emoji set against 68.5% on 4 per code; 8 per code gave what
    4 did (docs/quantizer.md)."""
    return max(MIN_RESERVOIR, RESERVOIR_PER_CODE * codebook_size)


# Up to this many codes the k-means strategies run the k-means every figure of the shipped
# configs was measured with: greedy k-means++ (scikit-learn's best of 2 + ln K candidates per
# step), then Lloyd to convergence. Above it their defaults (``init``, ``iters`` and
# ``local_trials`` None) run a cheap one: see ``default_kmeans_start``.
FULL_KMEANS_MAX_CODES = 8192
# Lloyd iterations past FULL_KMEANS_MAX_CODES codes when ``iters`` is None
LARGE_CODEBOOK_ITERS = 1


def default_local_trials(codebook_size: int) -> int | None:
    """The k-means++ candidates per step of ``KMeansInit`` / ``KMeansReestimate`` when their
    ``local_trials`` is None: None (the greedy ``2 + ln K``) up to 8,192 codes, 1 (plain
    k-means++) above. Greedy seeding costs ``K * (2 + ln K)`` passes over a reservoir of 4 x K
    vectors, so it grows as K^2 ln K: at 16,384 codes it was two thirds of a CPU study run (431 s
    against 228 s with plain seeding) for the same codes used (99.6% and 99.55%) and PSNR
    (17.13 and 17.14 dB, docs/avatars.md). Past 8,192 codes the strategies start at random
    reservoir vectors by default (:func:`default_kmeans_start`), so this applies there only to
    an explicit ``init="k-means++"``."""
    return None if codebook_size <= FULL_KMEANS_MAX_CODES else 1


def default_kmeans_start(codebook_size: int, iters: int) -> tuple[str, int]:
    """(init, Lloyd iterations) of ``KMeansInit`` / ``KMeansReestimate`` when their ``init`` /
    ``iters`` are None; ``iters`` is the strategy's own count (50 for the init, 20 for the
    re-estimation). Up to 8,192 codes: k-means++ and ``iters``. Above: ``"random"`` (distinct
    reservoir vectors) and 1 Lloyd iteration. With 2-4 reservoir vectors per code, seeding and
    further iterations barely move the codes but cost a pass over the reservoir each (N x K x D):
    on the avatar study this start used as many codes with the same PSNR as plain k-means++ and
    20 iterations, at a fraction of the k-means time (docs/quantizer.md, "Large codebooks")."""
    if codebook_size <= FULL_KMEANS_MAX_CODES:
        return "k-means++", iters
    return "random", LARGE_CODEBOOK_ITERS


def default_reassign(codebook_size: int) -> bool:
    """Whether the k-means of ``KMeansInit`` / ``KMeansReestimate`` ends with a pass that
    assigns the reservoir to the final centers when their ``reassign`` is None: up to 8,192
    codes yes (the k-means every figure of the shipped configs was measured with), above no.
    There the default k-means is one Lloyd iteration from a random start, and that last pass
    is half its work; without it the new codes' counts are the sizes of the clusters they
    were averaged from, the same counts the EMA's sums hold (:func:`vqkit.quantize.kmeans`)."""
    return codebook_size <= FULL_KMEANS_MAX_CODES


def _check_reassign(reassign: bool | None) -> bool | None:
    if reassign is not None and not isinstance(reassign, bool):
        raise TypeError(f"reassign must be a bool or None, got {reassign!r}")
    return reassign


def _check_reservoir_size(size: int | None) -> None:
    if size is not None:
        _check_positive("reservoir_size", size)


def _make_reservoir(
    quantizer: CodebookOwner,
    size: int | None,
    owner: str,
    dtype: str,
    device: str | None,
    seed: int,
) -> ReservoirSampler:
    if size is None:
        size = default_reservoir_size(quantizer.codebook_size)
    if dtype not in _RESERVOIR_DTYPES:
        raise ValueError(
            f"{owner}: reservoir_dtype must be one of {sorted(_RESERVOIR_DTYPES)}, got {dtype!r}"
        )
    if size < quantizer.codebook_size:
        raise ValueError(
            f"{owner}: reservoir_size ({size}) must be >= codebook_size "
            f"({quantizer.codebook_size}), or k-means could never run"
        )
    return quantizer.shared_reservoir(size, _RESERVOIR_DTYPES[dtype], device, seed)


def _hold(strategy: Maintenance, reservoir: ReservoirSampler) -> None:
    """Keep a reference to a reservoir the quantizer owns (``quantizer.reservoirs``) without
    registering it as this strategy's submodule: a shared reservoir is saved once."""
    strategy.__dict__["reservoir"] = reservoir


def _feed(quantizer: CodebookOwner, reservoir: ReservoirSampler, z: Tensor) -> None:
    """Add this step's batch once, however many strategies share the reservoir."""
    step = quantizer.current_step
    if getattr(reservoir, "_fed_step", None) == step:
        return
    reservoir.add(z)
    reservoir._fed_step = step


_INITS = ("k-means++", "random")


def _check_init(init: str | None) -> str | None:
    if init is not None and init not in _INITS:
        raise ValueError(f"init must be one of {_INITS} or None, got {init!r}")
    return init


def _check_iters(iters: int | None) -> int | None:
    if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 0):
        raise ValueError(f"iters must be an int >= 0 or None, got {iters!r}")
    return iters


class _KMeansStart:
    """``start`` of the k-means strategies: their ``init`` / ``iters`` where set, else
    :func:`default_kmeans_start` with the class's ``DEFAULT_ITERS``."""

    DEFAULT_ITERS: int
    init: str | None
    iters: int | None
    reassign: bool | None

    def start(self, codebook_size: int) -> tuple[str, int]:
        """(init, Lloyd iterations) this strategy runs at ``codebook_size`` codes."""
        init, iters = default_kmeans_start(codebook_size, self.DEFAULT_ITERS)
        return (init if self.init is None else self.init), (
            iters if self.iters is None else self.iters
        )

    def reassigns(self, codebook_size: int) -> bool:
        """Whether this strategy's k-means ends with a pass assigning the reservoir to the
        final centers (``reassign``, else :func:`default_reassign`)."""
        return default_reassign(codebook_size) if self.reassign is None else self.reassign


def _trials(local_trials: int | None, codebook_size: int) -> int | None:
    return default_local_trials(codebook_size) if local_trials is None else local_trials


def _start_text(init: str, local_trials: int | None) -> str:
    """How k-means starts, for ``describe`` (empty for the default greedy k-means++)."""
    if init != "k-means++":
        return f", {init} start"
    if local_trials is not None:
        return f", k-means++ with {local_trials} candidate{'s' * (local_trials > 1)} per step"
    return ""


def _iters_text(iters: int, reassign: bool = True) -> str:
    text = f"{iters} iteration{'s' * (iters != 1)}"
    return text if reassign or iters == 0 else text + " without a final assignment pass"


def _tokens_per_step(quantizer: CodebookOwner, z: Tensor) -> int:
    return quantizer.last_tokens or z.shape[0] * D.world_size()


def _kmeans_on_rank0(
    quantizer: CodebookOwner, x: Tensor, step: int, seed: int, iters: int, **kw
) -> tuple[Tensor, Tensor, float]:
    """Run k-means once (rank 0) and return (centers, per-center counts, inertia); other ranks
    get placeholders that ``replace_codes`` overwrites by broadcast."""
    k = quantizer.codebook_size
    dev = quantizer.codebook.device
    if D.rank() == 0:
        res = kmeans(x.to(dev, torch.float32), k, iters=iters, seed=seed + step, **kw)
        counts = torch.bincount(res.assignments, minlength=k).float()
        return res.centers, counts, res.inertia
    return (
        torch.zeros(k, quantizer.codebook_dim, device=dev),
        torch.zeros(k, device=dev),
        float("nan"),
    )


class _Cached(Maintenance):
    """Keeps Python mirrors of scalar buffers to avoid a device sync per step."""

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003
        self._cache_valid = False
        super()._load_from_state_dict(*args, **kwargs)


class KMeansInit(_KMeansStart, _Cached):
    """Warm up unquantized while a reservoir fills, then set the codebook to its k-means centers.

    ``warmup_steps=0`` initializes from the first batch(es), like ``kmeans_init`` elsewhere; if
    the reservoir still holds fewer vectors than codes, it keeps filling and retries each step.
    ``init``: how k-means starts, ``"k-means++"`` or ``"random"`` (distinct reservoir vectors,
    no seeding); ``iters``: Lloyd iterations at most. None (the default) is
    :func:`default_kmeans_start`: k-means++ and 50 iterations up to 8,192 codes, a random start
    and 1 iteration above, where every pass over the reservoir costs N x K x D.
    ``local_trials``: candidates per k-means++ step; None is :func:`default_local_trials`:
    scikit-learn's greedy best of ``2 + ln K`` up to 8,192 codes, plain k-means++ (1) above,
    where greedy seeding (``K * (2 + ln K)`` passes over the reservoir) would dominate the run.
    ``reassign``: whether k-means ends with a pass assigning the reservoir to the final centers
    (their counts start the new codes' usage); None is :func:`default_reassign`: yes up to
    8,192 codes, no above, where that pass is half the work of the one-iteration k-means and
    the counts of the clusters the centers were averaged from are used instead.
    ``reservoir_size``: vectors kept (None: :func:`default_reservoir_size`,
    4 per code, at least 16,384); strategies with the same size, dtype, device and seed share one.
    """

    DEFAULT_ITERS = 50  # Lloyd iterations up to 8,192 codes when ``iters`` is None

    def __init__(
        self,
        warmup_steps: int = 0,
        reservoir_size: int | None = None,
        *,
        iters: int | None = None,
        init: str | None = None,
        local_trials: int | None = None,
        reassign: bool | None = None,
        seed: int = 0,
        reservoir_dtype: str = "float32",
        reservoir_device: str | None = None,
    ) -> None:
        super().__init__()
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        _check_reservoir_size(reservoir_size)
        self.warmup_steps = warmup_steps
        self.reservoir_size = reservoir_size
        self.iters = _check_iters(iters)
        self.init = _check_init(init)
        self.local_trials = check_local_trials(local_trials)
        self.reassign = _check_reassign(reassign)
        self.seed = seed
        self._res_args = (reservoir_dtype, reservoir_device)
        self.register_buffer("done", torch.zeros((), dtype=torch.bool))
        self._cache_valid = False
        self._done = False

    def bind(self, quantizer: CodebookOwner) -> None:
        dtype, device = self._res_args
        _hold(
            self,
            _make_reservoir(quantizer, self.reservoir_size, "KMeansInit", dtype, device, self.seed),
        )

    def is_done(self) -> bool:
        if not self._cache_valid:
            self._done, self._cache_valid = bool(self.done), True
        return self._done

    def before_quantize(self, quantizer: CodebookOwner, z: Tensor) -> bool:
        if self.is_done():
            return False
        _feed(quantizer, self.reservoir, z)
        step = quantizer.current_step
        if step < self.warmup_steps:
            return True
        x = self.reservoir.contents()
        k = quantizer.codebook_size
        if x.shape[0] < k:
            detail = f"{x.shape[0]} samples < {k} codes; retrying next step"
            _emit(
                quantizer,
                MaintenanceEvent(step, "k-means init", "skipped", x.shape[0], 0, detail=detail),
            )
            return False
        t0 = time.perf_counter()
        init, iters = self.start(k)
        centers, counts, inertia = _kmeans_on_rank0(
            quantizer,
            x,
            step,
            self.seed,
            iters,
            init=init,
            local_trials=_trials(self.local_trials, k),
            reassign=self.reassigns(k),
        )
        counts = counts * _tokens_per_step(quantizer, z) / x.shape[0]
        mask = torch.ones(k, dtype=torch.bool, device=quantizer.codebook.device)
        replaced = quantizer.replace_codes(mask, centers, counts)
        self.reservoir.reset()
        self.done.fill_(True)
        self._done = True
        ms = (time.perf_counter() - t0) * 1e3
        event = MaintenanceEvent(step, "k-means init", "done", x.shape[0], replaced, inertia, ms)
        _emit(quantizer, event)
        return False

    def describe(self, quantizer: CodebookOwner) -> str:
        k = quantizer.codebook_size
        if self.warmup_steps == 0:
            when = "from the first batches"
        else:
            when = f"at step {self.warmup_steps} (steps before it pass through unquantized)"
        init, iters = self.start(k)
        start = _start_text(init, _trials(self.local_trials, k))
        iters_text = _iters_text(iters, self.reassigns(k))
        return (
            f"k-means init: all {k} codes set to the k-means centers ({iters_text}"
            f"{start}) of a {self.reservoir.size}-vector reservoir {when}"
        )

    def extra_repr(self) -> str:
        return f"warmup_steps={self.warmup_steps}, reservoir_size={self.reservoir_size}"


class KMeansReestimate(_KMeansStart, Maintenance):
    """Periodic k-means re-estimation from a reservoir of encoder outputs (VQFR), fixed.

    ``mode="full"`` replaces the whole codebook by the k-means centers of the reservoir, as VQFR
    does. ``mode="dead"`` keeps every code used at least ``min_usage`` times since the last
    re-estimation and re-places only the others: new centers are seeded by k-means++ among the
    reservoir vectors the live codes serve worst, then refined by Lloyd steps in which the live
    codes stay frozen. Runs at steps ``every, 2*every, ...`` below ``until`` (``None``: to the
    end of the run); the reservoir fills on every training step below ``until``. A scheduled
    step with no quantized step since quantization began (or since the last re-estimation) is
    skipped: during a ``KMeansInit`` warm-up and on its init step every code would look dead.
    ``init="random"`` starts the new centers at distinct random reservoir vectors instead of
    k-means++. ``init`` and ``iters`` None (the default) are :func:`default_kmeans_start`:
    k-means++ and 20 Lloyd iterations up to 8,192 codes, a random start and 1 iteration above.
    ``local_trials``, ``reassign`` and ``reservoir_size`` as :class:`KMeansInit`'s.
    """

    DEFAULT_ITERS = 20  # Lloyd iterations up to 8,192 codes when ``iters`` is None

    def __init__(
        self,
        every: int = 2000,
        until: int | None = 30000,
        reservoir_size: int | None = None,
        *,
        mode: str = "full",
        min_usage: int = 1,
        reset_reservoir: bool = True,
        warm_start: bool = False,
        iters: int | None = None,
        init: str | None = None,
        local_trials: int | None = None,
        reassign: bool | None = None,
        seed: int = 0,
        reservoir_dtype: str = "float32",
        reservoir_device: str | None = None,
    ) -> None:
        super().__init__()
        _check_positive("every", every)
        if until is not None:
            _check_positive("until", until)
        _check_reservoir_size(reservoir_size)
        _check_iters(iters)
        if mode not in ("full", "dead"):
            raise ValueError(f"mode must be 'full' or 'dead', got {mode!r}")
        self.init = _check_init(init)
        self.local_trials = check_local_trials(local_trials)
        self.reassign = _check_reassign(reassign)
        if min_usage < 1:
            raise ValueError(f"min_usage must be >= 1, got {min_usage}")
        self.every = every
        self.until = until  # None: for the whole run
        self.reservoir_size = reservoir_size
        self.mode = mode
        self.min_usage = min_usage
        self.reset_reservoir = reset_reservoir
        self.warm_start = warm_start
        self.iters = iters
        self.seed = seed
        self._res_args = (reservoir_dtype, reservoir_device)

    def bind(self, quantizer: CodebookOwner) -> None:
        dtype, device = self._res_args
        _hold(
            self,
            _make_reservoir(
                quantizer, self.reservoir_size, "KMeansReestimate", dtype, device, self.seed
            ),
        )
        self.register_buffer("counts_since", torch.zeros(quantizer.codebook_size, dtype=torch.long))
        # quantized training forwards counted in counts_since: 0 before quantization begins
        self.register_buffer("counted_steps", torch.zeros((), dtype=torch.long))

    def before_quantize(self, quantizer: CodebookOwner, z: Tensor) -> bool:
        step = quantizer.current_step
        if step >= self._end:
            return False
        _feed(quantizer, self.reservoir, z)
        if step > 0 and step % self.every == 0:
            if int(self.counted_steps) == 0:
                # Nothing was quantized since quantization began or since the last
                # re-estimation: on the k-means init step (or during the warm-up) every code
                # would look dead, and a second k-means would overwrite the first.
                detail = "no quantized step yet (warm-up, or k-means init at this step)"
                event = MaintenanceEvent(step, "k-means re-estimation", "skipped", detail=detail)
                _emit(quantizer, event)
            else:
                self.reestimate(quantizer, step, _tokens_per_step(quantizer, z))
        return False

    def after_assign(
        self, quantizer: CodebookOwner, z: Tensor, indices: Tensor, counts: Tensor
    ) -> None:
        if quantizer.current_step < self._end:
            self.counted_steps.add_(1)
            if self.mode == "dead":
                self.counts_since.add_(counts.long())

    @torch.no_grad()
    def reestimate(self, quantizer: CodebookOwner, step: int, tokens_per_step: int) -> int:
        """Run one re-estimation now; returns the number of codes replaced (0 when skipped)."""
        x = self.reservoir.contents()
        k = quantizer.codebook_size
        n = x.shape[0]
        name = "k-means re-estimation"
        if n < k:
            # The reservoir is replicated, so every rank takes this branch together: no hang.
            detail = f"too few samples ({n} < {k} codes)"
            _emit(quantizer, MaintenanceEvent(step, name, "skipped", n, 0, detail=detail))
            return 0
        dev = quantizer.codebook.device
        t0 = time.perf_counter()
        if self.mode == "full":
            init, iters = self.start(k)
            if self.warm_start:
                init = quantizer.effective_codebook().detach()
            centers, counts, inertia = _kmeans_on_rank0(
                quantizer,
                x,
                step,
                self.seed,
                iters,
                init=init,
                local_trials=_trials(self.local_trials, k),
                reassign=self.reassigns(k),
            )
            mask = torch.ones(k, dtype=torch.bool, device=dev)
            detail = "whole codebook"
        else:
            mask = self.counts_since < self.min_usage
            n_dead = int(mask.sum())
            if n_dead == 0:
                detail = f"no code used < {self.min_usage} times since the last one"
                _emit(quantizer, MaintenanceEvent(step, name, "skipped", n, 0, detail=detail))
                self._after(quantizer)
                return 0
            centers, counts, inertia = self._dead_centers(quantizer, x, mask, step)
            detail = f"{n_dead} of {k} codes used < {self.min_usage} times since the last one"
        counts = counts * tokens_per_step / n
        replaced = quantizer.replace_codes(mask, centers[mask], counts[mask])
        self._after(quantizer)
        ms = (time.perf_counter() - t0) * 1e3
        _emit(quantizer, MaintenanceEvent(step, name, "done", n, replaced, inertia, ms, detail))
        return replaced

    def _dead_centers(
        self, quantizer: CodebookOwner, x: Tensor, dead: Tensor, step: int
    ) -> tuple[Tensor, Tensor, float]:
        k = quantizer.codebook_size
        dev = quantizer.codebook.device
        if D.rank() != 0:
            return (
                torch.zeros(k, quantizer.codebook_dim, device=dev),
                torch.zeros(k, device=dev),
                0.0,
            )
        x = x.to(dev, torch.float32)
        codes = quantizer.effective_codebook().detach().clone()
        seed = self.seed + step
        n_dead = int(dead.sum())
        init, iters = self.start(k)
        if init == "random":  # distinct reservoir vectors
            g = torch.Generator(device=x.device).manual_seed(seed)
            codes[dead] = x[torch.randperm(x.shape[0], generator=g, device=x.device)[:n_dead]]
        else:
            codes[dead] = kmeans_plusplus(
                x,
                n_dead,
                seed=seed,
                existing=codes[~dead],
                local_trials=_trials(self.local_trials, k),
            )
        res = kmeans(
            x, k, init=codes, frozen=~dead, iters=iters, seed=seed, reassign=self.reassigns(k)
        )
        return res.centers, torch.bincount(res.assignments, minlength=k).float(), res.inertia

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        key = prefix + "counted_steps"
        if key not in state_dict and prefix + "counts_since" in state_dict:
            # a checkpoint from before counted_steps: it counted if any code was counted
            counted = state_dict[prefix + "counts_since"].sum() > 0
            state_dict[key] = counted.to(torch.long).reshape(())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _after(self, quantizer: CodebookOwner) -> None:
        self.counts_since.zero_()
        self.counted_steps.zero_()
        if self.reset_reservoir:
            self.reservoir.reset()

    def extra_repr(self) -> str:
        return (
            f"every={self.every}, until={self.until}, reservoir_size={self.reservoir_size}, "
            f"mode={self.mode!r}, min_usage={self.min_usage}"
        )

    @property
    def _end(self) -> int:
        """The first step with no re-estimation (``until``, or never)."""
        return self.until if self.until is not None else 2**62

    def describe(self, quantizer: CodebookOwner) -> str:
        k = quantizer.codebook_size
        what = (
            "the whole codebook replaced by"
            if self.mode == "full"
            else f"codes used < {self.min_usage} times since the last one re-placed by"
        )
        fires = range(self.every, self._end, self.every)
        if self.until is None:
            steps = f"steps {self.every}, {2 * self.every}, ... (to the end of the run)"
        elif len(fires) == 0:
            steps = "no step (until <= every)"
        elif len(fires) <= 3:
            steps = "step " if len(fires) == 1 else "steps "
            steps += ", ".join(str(s) for s in fires)
        else:
            steps = f"steps {fires[0]}, {fires[1]}, ..., {fires[-1]}"
        init, iters = self.start(k)
        if self.warm_start and self.mode == "full":
            init = "warm"  # Lloyd starts from the current codes
        start = _start_text(init, _trials(self.local_trials, k))
        return (
            f"k-means re-estimation ({self.mode}) at {steps}: {what} k-means "
            f"({_iters_text(iters, self.reassigns(k))}{start}) on a {self.reservoir.size}-vector"
            " reservoir"
        )


class DeadCodeRestart(Maintenance):
    """Restart codes whose EMA usage count falls below ``threshold`` (Jukebox / SoundStream).

    The EMA count is ``quantizer.usage.ema_counts``: an average of per-batch global counts. Dead
    codes restart at randomly drawn encoder outputs, from this batch (rank 0's, broadcast) or
    from a replicated reservoir. A restarted code's EMA count is set to the number of this
    batch's tokens it now captures, floored at the threshold, so it is not re-killed at once.

    ``relative=True`` reads ``threshold`` as a share of the uniform rate, tokens per step / K
    (0.25: a code used a quarter as often as a uniform codebook's), so one value fits any
    codebook and batch size; with more codes than tokens per step an absolute threshold of 1
    or 2 would read every code as dead.

    ``floor`` (tokens per step, 0: off) is a lower bound on the threshold. It matters only when
    a step holds few tokens per code, as with a large codebook on a small batch: there a quarter
    of the uniform rate is far below one use per usage window, so a code that the encoder has
    drifted away from keeps looking alive for a hundred steps or more, and restarts come too late.
    With ``floor=1/16`` a code used less than once every 16 steps on average (about 6 times in
    the default 100-step usage window) is dead at any codebook size; at 1,024 codes and 2,048
    tokens per step the relative threshold (0.5 per step) is above it and nothing changes.

    ``limit=True`` restarts at most as many codes in a step as the source holds vectors, the
    least used first; the rest wait for the next step. Without it, when the dead codes outnumber
    the vectors (a codebook larger than a batch, right after a k-means pass) several land on one
    vector, and all but one of them capture nothing and restart again at the next step: at
    65,536 codes and 2,048 tokens a step that was 4.0 million restarts in a 300-step run instead
    of 262,000, for as many codes used (96.0%, 2 seeds) and 13% more training time. It can bind
    only with more codes than a step has tokens (the shipped image configs set it).

    ``pick`` chooses the vectors: ``"random"`` draws them uniformly; ``"k-means++"`` (batch
    source only) draws them one at a time with probability proportional to their squared
    distance to the nearest code, the codebook's and those drawn before, so the restarted codes
    go where the codebook covers the batch worst and never two onto one spot. It reuses the
    distances of this step's assignment, so it costs no pass over the codebook. On the avatar
    study (16,384 and 65,536 codes) it kept no more codes than the uniform pick; see
    ``docs/quantizer.md``.
    """

    def __init__(
        self,
        threshold: float = 2.0,
        source: str = "batch",
        *,
        every: int = 1,
        relative: bool = False,
        floor: float = 0.0,
        pick: str = "random",
        limit: bool = False,
        reservoir_size: int | None = None,
        seed: int = 0,
        reservoir_dtype: str = "float32",
        reservoir_device: str | None = None,
    ) -> None:
        super().__init__()
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if not floor >= 0:  # also rejects NaN
            raise ValueError(f"floor must be >= 0 (tokens per step), got {floor}")
        if source not in ("batch", "reservoir"):
            raise ValueError(f"source must be 'batch' or 'reservoir', got {source!r}")
        if pick not in ("random", "k-means++"):
            raise ValueError(f"pick must be 'random' or 'k-means++', got {pick!r}")
        if pick == "k-means++" and source != "batch":
            raise ValueError(
                "pick='k-means++' needs source='batch': it weights the batch's tokens by their "
                "distance to the codebook, which the reservoir's vectors have not been measured to"
            )
        if not isinstance(limit, bool):
            raise TypeError(f"limit must be true or false, got {limit!r}")
        _check_positive("every", every)
        _check_reservoir_size(reservoir_size)
        self.threshold = threshold
        self.source = source
        self.every = every
        self.relative = relative
        self.floor = floor
        self.pick = pick
        self.limit = limit
        self.reservoir_size = reservoir_size
        self.seed = seed
        self._res_args = (reservoir_dtype, reservoir_device)

    needs_min_distances = True

    def bind(self, quantizer: CodebookOwner) -> None:
        if self.source == "reservoir":
            dtype, device = self._res_args
            _hold(
                self,
                _make_reservoir(
                    quantizer, self.reservoir_size, "DeadCodeRestart", dtype, device, self.seed
                ),
            )

    def before_quantize(self, quantizer: CodebookOwner, z: Tensor) -> bool:
        if self.source == "reservoir":
            _feed(quantizer, self.reservoir, z)
        return False

    @torch.no_grad()
    def after_assign(
        self, quantizer: CodebookOwner, z: Tensor, indices: Tensor, counts: Tensor
    ) -> None:
        step = quantizer.current_step
        if step % self.every:
            return
        threshold = self.threshold
        if self.relative:  # counts are this step's, over every process
            threshold *= float(counts.sum()) / quantizer.codebook_size
        threshold = max(threshold, self.floor)
        dead = quantizer.usage.ema_counts < threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        pool = z if self.source == "batch" else self.reservoir.contents().to(z.device, z.dtype)
        # rank 0's pool supplies the vectors: every process must restart the same codes
        size = D.all_gather_sizes(pool.shape[0], z.device)[0] if self.limit else n_dead
        if n_dead > size:
            if size == 0:
                return
            usage = quantizer.usage.ema_counts.masked_fill(~dead, float("inf"))
            keep = torch.topk(usage, size, largest=False).indices
            dead = torch.zeros_like(dead).index_fill_(0, keep, True)
            n_dead = size
        new = torch.zeros(n_dead, z.shape[1], device=z.device, dtype=torch.float32)
        if D.rank() == 0 and pool.shape[0] > 0:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            if self.pick == "k-means++":
                new = self._spread(quantizer, z, n_dead, step, g)
            else:
                if pool.shape[0] >= n_dead:
                    pick = torch.randperm(pool.shape[0], generator=g)[:n_dead]
                else:
                    pick = torch.randint(pool.shape[0], (n_dead,), generator=g)
                new = pool[pick.to(pool.device)].float()
        D.broadcast_(new, src=0)
        if quantizer.distance == "cosine":
            new = F.normalize(new, dim=1)
        counts_new = self._captured(quantizer, z, new)
        usage = quantizer.usage.ema_counts[dead]
        mean, top = float(usage.mean()), float(usage.max())
        detail = (
            f"EMA usage {mean:.3g} on average, at most {top:.4g}, below {threshold:.3g}; "
            f"restarted at {self.source} vectors"
            + (" (k-means++)" if self.pick == "k-means++" else "")
        )
        n = quantizer.replace_codes(dead, new, counts_new.clamp_min(threshold))
        # every step may restart a few: one DEBUG line each; the training console sums them up
        event = MaintenanceEvent(
            step, "dead-code restart", "done", 0, n, detail=detail, usage_mean=mean, usage_max=top
        )
        _emit(quantizer, event, logging.DEBUG)

    @staticmethod
    def _old_distances(quantizer: CodebookOwner, z: Tensor) -> Tensor:
        """Each token's squared distance to its code: this step's, unless not kept."""
        d_old = quantizer.last_min_dist
        if d_old is None or d_old.shape[0] != z.shape[0]:
            _, d_old = nearest(z, quantizer.effective_codebook().detach())
        return d_old

    def _spread(
        self, quantizer: CodebookOwner, z: Tensor, n_dead: int, step: int, g: torch.Generator
    ) -> Tensor:
        """``n_dead`` batch tokens by k-means++ against the codebook (``pick='k-means++'``);
        past the batch's size (``limit=False``) the rest are uniform draws from ``g``."""
        x = z.detach().float()
        m = min(n_dead, x.shape[0])
        new = kmeans_plusplus(
            x,
            m,
            seed=self.seed * 1_000_003 + step,
            closest=self._old_distances(quantizer, z),
            local_trials=1,
        )
        if m < n_dead:
            extra = torch.randint(x.shape[0], (n_dead - m,), generator=g).to(x.device)
            new = torch.cat([new, x[extra]])
        return new

    def _captured(self, quantizer: CodebookOwner, z: Tensor, new: Tensor) -> Tensor:
        """Global count of this batch's tokens that would pick each new code."""
        d_old = self._old_distances(quantizer, z)
        idx, d_new = nearest(z, new)
        won = d_new < d_old
        counts = torch.bincount(idx[won], minlength=new.shape[0]).float()
        return D.all_reduce_sum_(counts)

    def extra_repr(self) -> str:
        rel = ", relative=True" if self.relative else ""
        rel += f", floor={self.floor:g}" if self.floor else ""
        pick = f", pick={self.pick!r}" if self.pick != "random" else ""
        pick += ", limit=True" if self.limit else ""
        return f"threshold={self.threshold}{rel}, source={self.source!r}{pick}, every={self.every}"

    def describe(self, quantizer: CodebookOwner) -> str:
        when = "every step" if self.every == 1 else f"every {self.every} steps"
        pool = (
            "the batch" if self.source == "batch" else f"a {self.reservoir.size}-vector reservoir"
        )
        below = (
            f"{self.threshold:g} x the uniform rate (tokens per step / {quantizer.codebook_size})"
            if self.relative
            else f"{self.threshold:g}"
        )
        if self.floor:
            below = f"the larger of {below} and {self.floor:g} tokens per step"
        how = (
            "encoder outputs drawn by k-means++ against the codebook"
            if self.pick == "k-means++"
            else "random encoder outputs"
        )
        return (
            f"dead-code restart {when}: codes whose EMA usage falls below {below} "
            f"restart at {how} from {pool}"
        )


class LowUsageReset(Maintenance):
    """Seed 002's low-usage reset: every ``every`` steps the ``fraction`` of codes least used
    since the last reset restart at random encoder outputs of the batch (seed 002: 30% every
    epoch, so ``every`` is the steps per epoch).

    Unlike :class:`DeadCodeRestart` it replaces a fixed share whatever the usage, so it also
    moves codes that are used, only rarely. Ties (often many never-used codes) are broken at
    random, not by index. Counts are global under DDP and the draw is seeded by the step, so
    every process picks the same codes; rank 0's batch vectors are broadcast.
    """

    def __init__(self, fraction: float = 0.3, every: int = 1000, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        _check_positive("every", every)
        self.fraction = fraction
        self.every = every
        self.seed = seed

    def bind(self, quantizer: CodebookOwner) -> None:
        self.register_buffer("counts_since", torch.zeros(quantizer.codebook_size))

    @torch.no_grad()
    def after_assign(
        self, quantizer: CodebookOwner, z: Tensor, indices: Tensor, counts: Tensor
    ) -> None:
        self.counts_since += counts
        step = quantizer.current_step + 1  # the quantizer counts this step after the hooks
        if step % self.every:
            return
        k = quantizer.codebook_size
        n = max(1, int(self.fraction * k))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        noise = torch.rand(k, generator=g).to(counts.device) * 1e-3
        low = torch.argsort(self.counts_since + noise)[:n]
        mask = torch.zeros(k, dtype=torch.bool, device=counts.device)
        mask[low] = True
        usage = self.counts_since[low]
        new = torch.zeros(n, z.shape[1], device=z.device, dtype=torch.float32)
        if D.rank() == 0 and z.shape[0] > 0:
            pick = torch.randint(z.shape[0], (n,), generator=g).to(z.device)
            new = z[pick].float()
        if quantizer.distance == "cosine":
            new = F.normalize(new, dim=1)
        tokens = _tokens_per_step(quantizer, z)
        share = torch.full((n,), tokens / k, device=z.device)
        replaced = quantizer.replace_codes(mask, new, share)
        self.counts_since.zero_()
        detail = (
            f"the {self.fraction:.0%} least used codes, used {float(usage.mean()):.3g} times on "
            f"average (at most {float(usage.max()):.3g}) in the last {self.every} steps"
        )
        _emit(
            quantizer,
            MaintenanceEvent(step - 1, "low-usage reset", "done", 0, replaced, detail=detail),
        )

    def describe(self, quantizer: CodebookOwner) -> str:
        n = max(1, int(self.fraction * quantizer.codebook_size))
        return (
            f"low-usage reset every {self.every} steps: the {n} least used codes "
            f"({self.fraction:.0%}) restart at random encoder outputs from the batch"
        )

    def extra_repr(self) -> str:
        return f"fraction={self.fraction}, every={self.every}"

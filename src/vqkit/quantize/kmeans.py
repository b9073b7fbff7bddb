"""Torch k-means on the input's device: greedy k-means++ seeding and bounded Lloyd iterations.

Everything runs in fp32 with autocast disabled. Every distance block is bounded (by
``distance.DEFAULT_MAX_BLOCK`` floats, or ``chunk_size`` rows against all k centers), so the memory
beyond the data stays O(N + k*D) plus a block, whatever N and k are.

Two things make it fast without changing what it computes:

* Greedy k-means++ (scikit-learn's algorithm) needs, at every one of the k steps, the squared
  distances of ``2 + int(ln k)`` candidate points to all N points: k skinny, memory-bound
  matmuls. Here candidates are drawn ahead of time in pools and checked by rejection sampling
  (exact, because the sampling weights only ever decrease), so the distances come from a few
  large matmuls, and each step only touches the handful of points a candidate would take over.
* Lloyd's E-step keeps Hamerly's bounds per point and recomputes distances only for the points
  whose bounds fail; the few centers that moved a lot are checked with a thin matmul instead of
  invalidating every bound. Assignments are those of a full recomputation (up to fp32 ties).
  k-means++ already knows every point's nearest seed, so the first E-step is free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .distance import DEFAULT_MAX_BLOCK, _rows_per_chunk, nearest

__all__ = ["KMeansResult", "kmeans", "kmeans_plusplus"]

# Slack on squared-distance bounds, relative to ||x||^2 + max ||c||^2: ``||x||^2 - 2 x.c + ||c||^2``
# in fp32 is off by about eps * (||x||^2 + ||c||^2), and a bound tighter than the truth by that
# much could keep a point in a cluster a full recomputation would move it out of. The slack only
# costs a few extra recomputed rows.
_BOUND_SLACK = 1e-5

# Up to this many (point, center) pairs, a Lloyd update recomputes all distances: the bounds
# would save less than their bookkeeping costs.
_SMALL = 2**16

# Largest k-means++ candidate pool. Past a few hundred columns the matmul is no faster per
# candidate, while more of the pool goes stale (is rejected) before it is used; measured on
# N=16384, D=256, k=1024: 256 beats 128 and 1024 by 10-20%.
_MAX_POOL = 256


@dataclass
class KMeansResult:
    """Result of :func:`kmeans`."""

    centers: Tensor  # (k, D) fp32, on x's device
    assignments: Tensor  # (N,) long: index of each point's nearest center
    inertia: float  # sum of squared distances of the points to their assigned centers
    iterations: int  # Lloyd iterations (center updates) run


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_x(x: Tensor, k: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N, D), got shape {tuple(x.shape)}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = x.shape[0]
    if k > n:
        raise ValueError(f"k ({k}) > number of points ({n})")
    if x.is_complex():
        raise TypeError(f"x must be real, got dtype {x.dtype}")
    x = x.detach()
    x = x if x.dtype == torch.float32 else x.float()
    # One sum is finite unless some value is not (or the sum overflows): count only then.
    bad = 0 if bool(torch.isfinite(x.sum())) else int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(
            f"x has {bad} non-finite values (NaN or inf) out of {x.numel()}; "
            "k-means needs finite inputs"
        )
    return x


def _check_chunk(chunk_size: int | None) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_centers(name: str, c: Tensor, shape: tuple[int, ...], x: Tensor) -> Tensor:
    if not isinstance(c, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(c).__name__}")
    if c.dim() != len(shape) or any(e >= 0 and e != s for e, s in zip(shape, c.shape, strict=True)):
        want = ", ".join("M" if e < 0 else str(e) for e in shape)
        raise ValueError(f"{name} must have shape ({want}), got {tuple(c.shape)}")
    c = c.detach().to(x.device, torch.float32)
    bad = int((~torch.isfinite(c)).sum())
    if bad:
        raise ValueError(f"{name} has {bad} non-finite values (NaN or inf)")
    return c


def check_local_trials(local_trials: int | None) -> int | None:
    """``local_trials`` itself, after checking it is None or an int >= 1."""
    if local_trials is not None and (
        isinstance(local_trials, bool) or not isinstance(local_trials, int) or local_trials < 1
    ):
        raise ValueError(f"local_trials must be an int >= 1 or None, got {local_trials!r}")
    return local_trials


def greedy_local_trials(k: int) -> int:
    """Candidates per step of greedy k-means++ (scikit-learn's): 2 + ln k."""
    return 2 + int(math.log(k))


def _check_trials(local_trials: int | None, k: int) -> int:
    """Candidates per k-means++ step: ``local_trials``, or the greedy 2 + ln k."""
    trials = check_local_trials(local_trials)
    return greedy_local_trials(k) if trials is None else trials


def _generator(device: torch.device, seed: int) -> torch.Generator:
    # A generator on x's device keeps the draws there (no host round trip on CUDA) and makes the
    # result a function of the seed alone, not of the global RNG state.
    return torch.Generator(device=device).manual_seed(int(seed))


def _budget(k: int, chunk_size: int | None) -> int:
    # Floats per distance block: the Lloyd blocks are (chunk_size, k); k-means++ uses the same
    # budget for its (N, pool) candidate distances.
    return DEFAULT_MAX_BLOCK if chunk_size is None else chunk_size * k


def _sparse_nonzero(mask: Tensor) -> Tensor:
    """Flat indices of the True entries of a 1-D bool ``mask`` whose length is a multiple of 8,
    for masks that are mostly False: the scan runs over 8-byte words, and only the few nonzero
    words are looked at byte by byte (several times faster than ``nonzero`` on the bytes)."""
    words = mask.view(torch.int64).nonzero().squeeze(1)
    hits = mask.view(-1, 8).index_select(0, words).nonzero()
    return words.index_select(0, hits[:, 0]).mul_(8).add_(hits[:, 1])


def _acc(device: torch.device) -> torch.dtype:
    # Sums over all points accumulate in fp64, except where the device has none (MPS).
    return torch.float32 if device.type == "mps" else torch.float64


def _gather_rows(d: int) -> int:
    # Rows per gathered (rows, D) temporary, so gathers are bounded like the distance blocks.
    return max(1, DEFAULT_MAX_BLOCK // max(d, 1))


# --------------------------------------------------------------------------------------------
# k-means++
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def kmeans_plusplus(
    x: Tensor,
    k: int,
    *,
    seed: int = 0,
    existing: Tensor | None = None,
    closest: Tensor | None = None,
    chunk_size: int | None = None,
    local_trials: int | None = None,
) -> Tensor:
    """Greedy k-means++ seeding (as scikit-learn): ``k`` new centers, shape (k, D), fp32.

    Each step draws ``local_trials`` (None: ``2 + int(ln k)``, scikit-learn's) candidate points
    with probability proportional to their squared distance to the nearest center so far and
    keeps the one that lowers the potential (the sum of those squared distances) the most;
    ``local_trials=1`` is plain k-means++ (Arthur and Vassilvitskii), about ``2 + ln k`` times
    cheaper. Without ``existing`` the first center is a
    uniform draw. With ``existing`` (M, D), distances are measured to those fixed centers too, so
    the new centers go where ``existing`` covers the data worst; only the ``k`` new centers are
    returned. ``closest`` (N,) instead of ``existing``: each point's squared distance to the
    nearest of centers the caller holds, when it has them already (a quantizer's last
    assignment), which saves the pass over those centers. ``chunk_size`` bounds the distance
    blocks as in :func:`kmeans`. Deterministic for a given ``seed``.
    """
    x = _check_x(x, k)
    _check_chunk(chunk_size)
    trials = _check_trials(local_trials, k)
    if existing is not None and closest is not None:
        raise ValueError("pass existing or closest, not both")
    if existing is not None:
        existing = _check_centers("existing", existing, (-1, x.shape[1]), x)
    if closest is not None:
        if closest.shape != (x.shape[0],):
            raise ValueError(
                f"closest must have shape ({x.shape[0]},) (one distance per point of x), "
                f"got {tuple(closest.shape)}"
            )
        if not bool(torch.isfinite(closest).all()) or bool((closest < 0).any()):
            raise ValueError("closest must be finite squared distances >= 0")
        closest = closest.to(x.device, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        gen = _generator(x.device, seed)
        return _kmeans_plusplus(x, k, gen, existing, chunk_size, trials=trials, closest=closest)[0]


def _kmeans_plusplus(
    x: Tensor,
    k: int,
    gen: torch.Generator,
    existing: Tensor | None,
    chunk_size: int | None,
    xsq: Tensor | None = None,
    *,
    trials: int,
    closest: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(centers, index of each point's nearest center among them or ``existing``, squared
    distance to it). With ``closest`` (squared distances to centers held by the caller) in
    place of ``existing``, points nearest to those have index -1."""
    n, d = x.shape
    dev = x.device
    xsq = x.pow(2).sum(1) if xsq is None else xsq
    centers = torch.empty(k, d, dtype=torch.float32, device=dev)
    start = 0
    if closest is not None:
        closest = closest.clone()
        owner = torch.full((n,), -1, dtype=torch.long, device=dev)
        offset = 0
    elif existing is not None and existing.shape[0] > 0:
        owner, closest = nearest(x, existing, chunk_size=chunk_size)
        offset = existing.shape[0]
    else:
        first = torch.randint(n, (1,), generator=gen, device=dev)
        centers[0] = x[first[0]]
        closest = (x - centers[0]).pow_(2).sum(1)
        owner = torch.zeros(n, dtype=torch.long, device=dev)
        offset, start = 0, 1
    # The pool sizes depend on N only, not on chunk_size, so that chunking never changes the
    # draws; chunk_size only bounds the score blocks.
    max_pool = max(2 * trials, min(_MAX_POOL, DEFAULT_MAX_BLOCK // n))
    pool = _CandidatePool(x, xsq, gen, trials, max_pool, _budget(k, chunk_size))
    for c in range(start, k):
        picked = pool.draw(closest, k - c)
        if picked is None:
            # Every point sits on a center: any choice leaves the potential at zero.
            rest = torch.randperm(n, generator=gen, device=dev)[: k - c]
            centers[c:] = x.index_select(0, rest)
            break
        point, idx, dist = picked
        closest.index_put_((idx,), dist)
        owner.index_put_((idx,), torch.full_like(idx, offset + c))
        centers[c] = x[point]
    return centers, owner, closest


class _CandidatePool:
    """Greedy k-means++ steps from pools of pre-drawn candidates.

    A step needs ``trials`` points drawn with probability proportional to the current squared
    distances ``closest``, and for each the decrease of the potential, ``sum_i max(0, closest_i
    - ||x_i - c||^2)``. Drawn and scored one step at a time, that is one skinny matmul over all
    of x per step. Instead a pool of candidates is drawn at once from ``closest`` as it is at
    fill time, their distances to all points come from large matmuls, and each step takes pool
    entries in order by rejection sampling: an entry drawn with weight ``w_fill`` is accepted
    with probability ``w_now / w_fill`` (<= 1 since ``closest`` only decreases), which makes the
    accepted entries exact independent draws from the current distribution. Only points that a
    candidate was closer to than their nearest center at fill time can gain from it later, so
    the pool keeps just those (point, distance) pairs and a step costs O(pairs), not O(N).
    """

    def __init__(
        self, x: Tensor, xsq: Tensor, gen: torch.Generator, trials: int, max_size: int, block: int
    ) -> None:
        self.x, self.xsq, self.gen, self.trials = x, xsq, gen, trials
        self.max_size, self.block = max_size, block
        # Start small: early on the potential falls fast and most of a big pool would be
        # rejected; each refill doubles the pool while it is still being used up.
        self.size = min(4 * trials, max_size)
        self.ptr = 0
        self.points: Tensor | None = None

    def _fill(self, closest: Tensor, steps_left: int) -> bool:
        x, xsq, dev = self.x, self.xsq, self.x.device
        n = x.shape[0]
        # fp64: in an fp32 cumsum over many points the small weights at the tail vanish.
        cum = torch.cumsum(closest, 0, dtype=_acc(dev))
        total = float(cum[-1])
        if total <= 0.0:
            return False
        # No bigger than what the remaining steps can use (plus rejections).
        size = max(1, min(self.size, steps_left * self.trials * 5 // 4 + self.trials))
        r = torch.rand(size, generator=self.gen, device=dev, dtype=cum.dtype) * total
        # side="right" gives the first point whose cumsum exceeds r: never a zero-weight point.
        points = torch.searchsorted(cum, r, right=True).clamp_(max=n - 1)
        weight = closest.index_select(0, points)
        # Entry q is accepted while u_q * w_fill < w_now, i.e. with probability w_now / w_fill.
        self.threshold = torch.rand(size, generator=self.gen, device=dev) * weight
        cand = x.index_select(0, points)
        csq = xsq.index_select(0, points)
        limit = closest - xsq
        step = max(1, min(n, self.block // size))
        mask = torch.empty(-(-step * size // 8) * 8, dtype=torch.bool, device=dev)
        ii, pp, dd = [], [], []
        for s in range(0, n, step):
            # ||c||^2 - 2 x.c < closest - ||x||^2  <=>  ||x - c||^2 < closest
            scores = torch.addmm(csq, x[s : s + step], cand.t(), alpha=-2.0)
            rows = scores.shape[0]
            near = mask[: rows * size].view(rows, size)
            torch.lt(scores, limit[s : s + step, None], out=near)
            mask[rows * size :] = False
            flat = _sparse_nonzero(mask)
            i, p = flat // size, flat % size
            dd.append(scores.view(-1).index_select(0, flat))
            ii.append(i + s)
            pp.append(p)
        p, order = torch.cat(pp).sort(stable=True)  # group the pairs by candidate
        i = torch.cat(ii).index_select(0, order)
        self.idx = i
        self.dist = (torch.cat(dd).index_select(0, order) + xsq.index_select(0, i)).clamp_min_(0)
        counts = torch.bincount(p, minlength=size)
        self.offsets = [0, *torch.cumsum(counts, 0).tolist()]
        self.points = points
        self.size = size
        self.ptr = 0
        return True

    def draw(self, closest: Tensor, steps_left: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """The best of ``trials`` candidates drawn for the current ``closest``: (its point index,
        the points it takes over, their squared distances to it); None when every weight is
        zero."""
        taken: list[int] = []
        while len(taken) < self.trials:
            if self.points is None or self.ptr >= self.size:
                if self.points is not None:
                    self.size = min(2 * self.size, self.max_size)
                if not self._fill(closest, steps_left):
                    return None
                # Entries taken from the old pool refer to its arrays; dropping them keeps the
                # draws exact (whether a pool runs out does not depend on which entries it held).
                taken = []
            a, b = self.ptr, min(self.size, self.ptr + 2 * self.trials)
            now = closest.index_select(0, self.points[a:b])
            for j, accept in enumerate((self.threshold[a:b] < now).tolist()):
                self.ptr += 1
                if accept:
                    taken.append(a + j)
                    if len(taken) == self.trials:
                        break
        segs = [(self.offsets[q], self.offsets[q + 1]) for q in taken]
        if taken[-1] - taken[0] == len(taken) - 1:
            # Consecutive entries (nothing rejected in between): their pairs are contiguous.
            idx = self.idx[segs[0][0] : segs[-1][1]]
            dist = self.dist[segs[0][0] : segs[-1][1]]
        else:
            idx = torch.cat([self.idx[a:b] for a, b in segs])
            dist = torch.cat([self.dist[a:b] for a, b in segs])
        gain = (closest.index_select(0, idx) - dist).clamp_min_(0.0)
        lens = [b - a for a, b in segs]
        sums = torch.segment_reduce(gain, "sum", lengths=torch.tensor(lens, device=gain.device))
        best = int(sums.argmax())
        a, b = segs[best]
        start = sum(lens[:best])
        # The points the winner actually takes over: those it is strictly closer to now.
        won = gain[start : start + lens[best]] > 0
        return self.points[taken[best]], self.idx[a:b][won], self.dist[a:b][won]


# --------------------------------------------------------------------------------------------
# Lloyd
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def kmeans(
    x: Tensor,
    k: int,
    *,
    iters: int = 50,
    tol: float = 1e-4,
    init: str | Tensor = "k-means++",
    seed: int = 0,
    chunk_size: int | None = None,
    frozen: Tensor | None = None,
    local_trials: int | None = None,
    reassign: bool = True,
) -> KMeansResult:
    """Lloyd's k-means of the rows of ``x`` (N, D) into ``k`` clusters, on x's device, in fp32.

    init: ``"k-means++"`` (greedy, as scikit-learn), ``"random"`` (k distinct points) or a
    (k, D) tensor of starting centers (warm start). Stops after ``iters`` center updates, when
    the total squared center shift is <= ``tol`` * the mean per-feature variance of x
    (scikit-learn's rule), or when no assignment changes. Empty clusters are reseeded with the
    points farthest from their centers. ``frozen``: optional bool mask (k,) of centers that never
    move and are never reseeded (needs a tensor ``init``). ``chunk_size``: rows per (rows, k)
    distance block (default: blocks of ``distance.DEFAULT_MAX_BLOCK`` floats). ``local_trials``:
    candidates per k-means++ step, as in :func:`kmeans_plusplus`. Deterministic for
    a given ``seed`` (on CUDA, bitwise only under ``torch.use_deterministic_algorithms``, as the
    center sums use ``index_add_``). The returned assignments are the nearest returned centers,
    unless ``reassign`` is False: then a run that ends by its iteration count stops at its last
    center update, without the pass over x that assigns the points to the moved centers, and
    returns the assignments the centers were averaged from (``inertia`` measured against them).
    One full pass fewer: half the distance work of a 1-iteration run from a random start.
    """
    x = _check_x(x, k)
    _check_chunk(chunk_size)
    trials = _check_trials(local_trials, k)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if not tol >= 0:  # also rejects NaN
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if not isinstance(reassign, bool):
        raise TypeError(f"reassign must be a bool, got {reassign!r}")
    n, d = x.shape
    centers: Tensor | None = None
    if isinstance(init, Tensor):
        centers = _check_centers("init", init, (k, d), x).clone()
    elif not (isinstance(init, str) and init in ("k-means++", "random")):
        raise ValueError(f"init must be 'k-means++', 'random' or a ({k}, {d}) tensor, got {init!r}")
    if frozen is not None:
        if centers is None:
            raise ValueError(f"frozen needs a tensor init holding the frozen centers, got {init!r}")
        if not isinstance(frozen, Tensor) or tuple(frozen.shape) != (k,):
            shape = tuple(frozen.shape) if isinstance(frozen, Tensor) else type(frozen).__name__
            raise ValueError(f"frozen must be a bool mask of shape ({k},), got {shape}")
        if frozen.dtype != torch.bool:
            raise ValueError(
                f"frozen must be a bool mask of shape ({k},), got dtype {frozen.dtype}"
            )
        frozen = frozen.to(x.device)
        if not bool(frozen.any()):
            frozen = None

    gen = _generator(x.device, seed)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xsq = x.pow(2).sum(1)
        seeded = None
        if centers is None:
            if init == "random":
                pick = torch.randperm(n, generator=gen, device=x.device)[:k]
                centers = x.index_select(0, pick)
            else:
                # k-means++ ends knowing every point's nearest center: the first assignment.
                centers, seeded, _ = _kmeans_plusplus(
                    x, k, gen, None, chunk_size, xsq, trials=trials
                )
        state = _Assigner(x, xsq, k, chunk_size)
        # The start's bounds serve only a later assignment pass.
        state.start(centers, seeded, bounds=iters > 1 or (iters == 1 and reassign))
        return _lloyd(x, centers, state, frozen, iters, _tolerance(x, xsq, tol), reassign)


def _tolerance(x: Tensor, xsq: Tensor, tol: float) -> float:
    # scikit-learn's rule: tol is relative to the mean per-feature variance of the data.
    if tol == 0:
        return 0.0
    n = x.shape[0]
    acc = _acc(x.device)
    mean = x.mean(0).to(acc)
    total = xsq.sum(dtype=acc)
    offset = n * mean.pow(2).sum()
    if bool(offset < 0.5 * total):
        # sum ||x - mean||^2 = sum ||x||^2 - n ||mean||^2: accurate while the mean does not
        # dominate the spread.
        var = total - offset
    else:
        # Far from the origin the difference cancels; a centered pass does not.
        var = torch.zeros((), dtype=acc, device=x.device)
        step, mean32 = _gather_rows(x.shape[1]), mean.float()
        for s in range(0, n, step):
            var += (x[s : s + step] - mean32).pow_(2).sum(dtype=acc)
    return float(var) / x.numel() * tol


def _lloyd(
    x: Tensor,
    centers: Tensor,
    state: _Assigner,
    frozen: Tensor | None,
    iters: int,
    tol_abs: float,
    reassign: bool = True,
) -> KMeansResult:
    n, d = x.shape
    k = centers.shape[0]
    assign = state.assign
    it = 0
    while it < iters:
        it += 1
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros(k, d, dtype=torch.float32, device=x.device).index_add_(0, assign, x)
        empty = counts == 0
        if frozen is not None:
            empty &= ~frozen
        n_empty = int(empty.sum())
        if n_empty:
            stolen = _farthest(x, centers, assign, counts, frozen, n_empty)
            targets = empty.nonzero().squeeze(1)
            old = assign.index_select(0, stolen)
            moved = x.index_select(0, stolen)
            sums.index_add_(0, old, moved, alpha=-1.0)
            counts.index_add_(0, old, torch.full_like(old, -1))
            sums[targets] = moved
            counts[targets] = 1
            assign[stolen] = targets
            state.invalidate(stolen)
        new = sums / counts.clamp_min(1).to(sums.dtype)[:, None]
        # Frozen centers stay bitwise; a cluster that is still empty keeps its center.
        keep = counts == 0
        if frozen is not None:
            keep |= frozen
        new = torch.where(keep[:, None], centers, new)
        delta = (new - centers).pow(2).sum(1)
        shift = float(delta.sum())
        centers = new
        if it == iters and not reassign:
            break
        changed = state.update(centers, delta.sqrt_())
        if shift <= tol_abs or changed == 0:
            break
    return KMeansResult(
        centers=centers, assignments=assign, inertia=_inertia(x, centers, assign), iterations=it
    )


class _Assigner:
    """Nearest-center assignments kept up to date across center updates with few distance rows.

    Per point, ``upper`` >= the distance to its own center and ``lower`` <= the distance to every
    other center (Hamerly's bounds). When the centers move by ``delta``, ``upper += delta[own]``
    and ``lower -= max(delta)`` stay valid by the triangle inequality, and a point whose upper
    bound stays below its lower bound cannot change cluster. A few fast-moving centers would drag
    every lower bound down, so the ``m`` fastest movers can be taken out of it: the lower bound
    then shrinks only by the largest move among the other centers, and the exact distances to
    the fast movers come from one thin (rows, m) matmul. ``m`` is picked per update from a few
    sizes by the work each would cost; rows that still fail are recomputed against all centers.
    """

    def __init__(self, x: Tensor, xsq: Tensor, k: int, chunk_size: int | None) -> None:
        n = x.shape[0]
        self.x, self.xsq, self.k, self.chunk_size = x, xsq, k, chunk_size
        self.rows = _rows_per_chunk(k, chunk_size, DEFAULT_MAX_BLOCK)
        self.budget = _budget(k, chunk_size)
        dev = x.device
        self.assign = torch.zeros(n, dtype=torch.long, device=dev)
        self.upper = torch.empty(n, dtype=torch.float32, device=dev)
        self.lower = torch.empty(n, dtype=torch.float32, device=dev)

    def _set(self, centers: Tensor) -> None:
        self.centers = centers
        self.csq = centers.pow(2).sum(1)
        self.csq_max = self.csq.max()

    def _slack(self, xq: Tensor) -> Tensor:
        return (xq + self.csq_max).mul_(_BOUND_SLACK)

    def start(self, centers: Tensor, seeded: Tensor | None, bounds: bool = True) -> None:
        """Initial assignment: a full pass, or ``seeded`` (each point's nearest center, known
        from k-means++), which comes without bounds, so the first update is a full pass.
        ``bounds=False``: the full pass is a plain nearest-center search without bounds
        (:func:`~vqkit.quantize.distance.nearest`, in its column tiles past 16,384 codes), after
        which an ``update`` is a full pass again."""
        self._set(centers)
        self.unbounded = seeded is not None or not bounds
        if seeded is not None:
            self.assign.copy_(seeded)
        elif bounds:
            self._scan(None)
        else:
            idx, _ = nearest(
                self.x,
                centers,
                chunk_size=self.chunk_size,
                return_distances=False,
                c_sqnorm=self.csq,
            )
            self.assign.copy_(idx)

    def invalidate(self, idx: Tensor) -> None:
        # Reassigned by hand: the lower bound no longer covers the old center, so force a full
        # row (a zero lower bound fails unless the point sits exactly on its center).
        self.upper[idx] = float("inf")
        self.lower[idx] = 0.0

    def _scan(self, idx: Tensor | None) -> int:
        """Recompute the assignment and bounds of rows ``idx`` (all when None) against every
        center; returns how many assignments changed."""
        x, xsq, rows = self.x, self.xsq, self.rows
        m = x.shape[0] if idx is None else idx.shape[0]
        ct = self.centers.t()
        changed = torch.zeros((), dtype=torch.long, device=x.device)
        for s in range(0, m, rows):
            if idx is None:
                sel = slice(s, s + rows)
                xs, xq = x[sel], xsq[sel]
            else:
                sel = idx[s : s + rows]
                xs, xq = x.index_select(0, sel), xsq.index_select(0, sel)
            scores = torch.addmm(self.csq, xs, ct, alpha=-2.0)
            best, a = scores.min(1)
            changed += (a != self.assign[sel]).sum()
            self.assign[sel] = a
            slack = self._slack(xq)
            self.upper[sel] = (best + xq + slack).clamp_min_(0.0).sqrt_()
            if self.k > 1:
                second = scores.scatter_(1, a[:, None], float("inf")).min(1).values
                self.lower[sel] = (second + xq - slack).clamp_min_(0.0).sqrt_()
            else:
                self.lower[sel] = float("inf")
        return int(changed)

    def update(self, centers: Tensor, delta: Tensor) -> int:
        """Move to ``centers``, which moved by ``delta`` (distances); returns how many
        assignments changed."""
        self._set(centers)
        a, k = self.assign, self.k
        if self.unbounded or a.numel() * k <= _SMALL:
            # No bounds yet, or a full pass so small that bookkeeping would cost more ops than
            # it saves.
            self.unbounded = False
            return self._scan(None)
        self.upper += delta.index_select(0, a)
        if k == 1:
            return 0
        moves, order = delta.sort(descending=True)
        lower_old = self.lower
        # Largest move among the centers other than the point's own.
        self.lower = lower_old - torch.where(a == order[0], moves[1], moves[0])
        need = (self.upper > self.lower).nonzero().squeeze(1)
        if need.numel() == 0:
            return 0
        # Most failing points fail only because of a few fast movers, and their own center
        # barely moved, so the loose upper bound usually does: choose m with it first, and
        # tighten (a gather per point) only the points it does not settle.
        m = self._pick(need, lower_old, moves)
        if m == 0:
            need = self._tighten(need)
            if need.numel() == 0:
                return 0
            m = self._pick(need, lower_old, moves)
            if m == 0:
                return self._scan(need)
            changed, rest = self._fast_movers(need, order[:m], lower_old, moves[m])
        else:
            changed, rest = self._fast_movers(need, order[:m], lower_old, moves[m])
            if rest.numel():
                rest = self._tighten(rest)
                more, rest = self._fast_movers(rest, order[:m], lower_old, moves[m])
                changed += more
        return changed + (self._scan(rest) if rest.numel() else 0)

    def _pick(self, need: Tensor, lower_old: Tensor, moves: Tensor) -> int:
        """How many of the fastest movers to take out of the lower bounds of ``need`` (0:
        none, recompute the rows), by the work, in distance evaluations, of the failing rows
        against m columns plus full rows for those that would still fail."""
        k = self.k
        u = self.upper.index_select(0, need)
        lo = lower_old.index_select(0, need)
        m_best, cost_best = 0, need.numel() * k
        for m in sorted({k // 64, k // 16, k // 4} - {0}):
            cost = need.numel() * m + int((u > lo - moves[m]).sum()) * k
            if cost < cost_best:
                m_best, cost_best = m, cost
        return m_best

    def _tighten(self, need: Tensor) -> Tensor:
        # The exact distance to the own center is a gather, not a matmul; it settles most points
        # whose upper bound only failed because it had drifted loose.
        x, c, a = self.x, self.centers, self.assign
        step = _gather_rows(x.shape[1])
        keep = torch.empty(need.shape[0], dtype=torch.bool, device=x.device)
        for s in range(0, need.shape[0], step):
            sel = need[s : s + step]
            diff = x.index_select(0, sel) - c.index_select(0, a.index_select(0, sel))
            u = diff.pow_(2).sum(1).add_(self._slack(self.xsq.index_select(0, sel))).sqrt_()
            self.upper[sel] = u
            keep[s : s + step] = u > self.lower.index_select(0, sel)
        return need[keep]

    def _fast_movers(
        self, need: Tensor, cols: Tensor, lower_old: Tensor, move_rest: Tensor
    ) -> tuple[int, Tensor]:
        """Settle the rows of ``need`` whose own center is closer than every center outside
        ``cols`` (which moved by at most ``move_rest``) with exact distances to ``cols`` only.
        Returns (assignments changed, the rows this could not settle)."""
        lower_rest = lower_old.index_select(0, need) - move_rest
        ok = self.upper.index_select(0, need) <= lower_rest
        idx, rest = need[ok], need[~ok]
        if idx.numel() == 0:
            return 0, rest
        lower_rest = lower_rest[ok]
        inf = float("inf")
        m = cols.numel()
        cc, ccsq = self.centers.index_select(0, cols), self.csq.index_select(0, cols)
        changed = torch.zeros((), dtype=torch.long, device=idx.device)
        rows = max(1, self.budget // m)
        for s in range(0, idx.numel(), rows):
            sel = idx[s : s + rows]
            xs, xq = self.x.index_select(0, sel), self.xsq.index_select(0, sel)
            own = self.assign.index_select(0, sel)
            d2 = torch.addmm(ccsq, xs, cc.t(), alpha=-2.0)
            d2.add_(xq[:, None]).masked_fill_(own[:, None] == cols[None, :], inf)
            slack = self._slack(xq)
            first, arg = d2.min(1)
            u = self.upper.index_select(0, sel)
            # Where a fast mover may beat the own center, decide as a full pass would: compare
            # the same expansion of the squared distance to the own center.
            maybe = (first < u.pow(2) + slack).nonzero().squeeze(1)
            moved = torch.zeros_like(first, dtype=torch.bool)
            own_lo = u  # a lower bound on the distance to the own center, used if it moves
            if maybe.numel():
                c_own = self.centers.index_select(0, own.index_select(0, maybe))
                own_d2 = (
                    (xs.index_select(0, maybe) * c_own).sum(1).mul_(-2.0)
                    + xq.index_select(0, maybe)
                    + self.csq.index_select(0, own.index_select(0, maybe))
                )
                sl = slack.index_select(0, maybe)
                moved = moved.index_put((maybe,), first.index_select(0, maybe) < own_d2)
                u = u.index_put((maybe,), (own_d2 + sl).clamp_min_(0.0).sqrt_())
                own_lo = u.index_put((maybe,), (own_d2 - sl).clamp_min_(0.0).sqrt_())
            if m > 1:
                second = d2.scatter_(1, arg[:, None], inf).min(1).values
            else:
                second = torch.full_like(first, inf)
            # Staying: the other centers are the rest and the fast movers. Moving: the rest, the
            # other fast movers, and the old own center.
            other = torch.where(moved, second, first).sub_(slack).clamp_min_(0.0).sqrt_()
            lower = torch.minimum(lower_rest[s : s + rows], other)
            lower = torch.where(moved, torch.minimum(lower, own_lo), lower)
            new_u = (first + slack).clamp_min_(0.0).sqrt_()
            self.upper[sel] = torch.where(moved, new_u, u)
            self.lower[sel] = lower
            self.assign[sel] = torch.where(moved, cols.index_select(0, arg), own)
            changed += moved.sum()
        return int(changed), rest


def _farthest(
    x: Tensor,
    centers: Tensor,
    assign: Tensor,
    counts: Tensor,
    frozen: Tensor | None,
    n_pick: int,
) -> Tensor:
    """The ``n_pick`` distinct points farthest from their assigned centers, never the only point
    of a movable cluster (taking it would just empty another cluster)."""
    dist = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    step = _gather_rows(x.shape[1])
    for s in range(0, x.shape[0], step):
        a = assign[s : s + step]
        dist[s : s + step] = (x[s : s + step] - centers.index_select(0, a)).pow_(2).sum(1)
    alone = counts.index_select(0, assign) <= 1
    if frozen is not None:
        alone &= ~frozen.index_select(0, assign)
    dist[alone] = -1.0
    return dist.topk(n_pick).indices


def _inertia(x: Tensor, centers: Tensor, assign: Tensor) -> float:
    acc = _acc(x.device)
    total = torch.zeros((), dtype=acc, device=x.device)
    step = _gather_rows(x.shape[1])
    for s in range(0, x.shape[0], step):
        diff = x[s : s + step] - centers.index_select(0, assign[s : s + step])
        total += diff.pow_(2).sum(dtype=acc)
    return float(total)

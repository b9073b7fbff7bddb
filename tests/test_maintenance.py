import copy
import logging
import sys

import pytest
import torch
from torch import Tensor

from vqkit import (
    DeadCodeRestart,
    EMAUpdate,
    KMeansInit,
    KMeansReestimate,
    VectorQuantizer,
    kmeans,
)
from vqkit.quantize import default_kmeans_start, default_reassign, default_reservoir_size


def blobs(n, k, d, seed=0, spread=0.05):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 3
    lab = torch.randint(k, (n,), generator=g)
    return centers[lab] + spread * torch.randn(n, d, generator=g), centers


def test_kmeans_init_warmup_passthrough_then_centers():
    torch.manual_seed(0)
    data, _ = blobs(2000, 16, 4)
    vq = VectorQuantizer(
        4, 16, ema=EMAUpdate(), maintenance=[KMeansInit(warmup_steps=3, reservoir_size=64)]
    )
    vq.train()
    for i in range(3):
        x = data[i * 100 : (i + 1) * 100]
        out = vq(x)
        assert torch.equal(out.quantized, x), "warm-up must pass inputs through"
        assert out.loss.item() == 0.0
    assert not vq.maintenance[0].is_done()
    # What k-means will see at step 3: the reservoir after this step's batch is added (a copy
    # with the same random stream).
    twin = copy.deepcopy(vq.maintenance[0].reservoir)
    twin.add(data[300:400])
    ref = kmeans(twin.contents(), 16, iters=50, seed=0 + 3)  # seeded by seed + step
    ema_update = vq.ema.update
    vq.ema.update = lambda *args: None  # this step's EMA move would hide the centers
    out = vq(data[300:400])
    vq.ema.update = ema_update
    assert vq.maintenance[0].is_done()
    # The codebook is the k-means of the reservoir, and this step already quantized with it.
    torch.testing.assert_close(vq.codebook, ref.centers)
    assert not out.passthrough and not torch.equal(out.quantized, data[300:400])
    assert torch.equal(out.quantized, ref.centers[out.indices])
    # EMA stats of all codes were set consistently: code == embed_sum / cluster_size.
    torch.testing.assert_close(
        vq.ema.embed_sum / vq.ema.cluster_size[:, None], vq.codebook, rtol=1e-5, atol=1e-6
    )
    assert (vq.ema.cluster_size > 0).all()


def test_kmeans_init_codebook_equals_kmeans_of_reservoir():
    torch.manual_seed(0)
    data, _ = blobs(400, 8, 3)
    init = KMeansInit(warmup_steps=1, reservoir_size=400)
    vq = VectorQuantizer(3, 8, maintenance=[init]).train()
    vq(data[:200])
    res = init.reservoir.contents().clone()
    vq(data[200:400])  # step 1: reservoir now holds both batches
    full = torch.cat([res, data[200:400]])
    ref = kmeans(full, 8, iters=50, seed=1)
    torch.testing.assert_close(vq.codebook.detach(), ref.centers)


def test_random_start_for_very_large_codebooks():
    """init="random" (k-means from distinct reservoir vectors, no k-means++ seeding: hours at
    65,536 codes on a CPU) gives kmeans(init="random") exactly, and dead-mode re-estimation
    re-places only the dead codes from reservoir vectors; a bad value names the choices."""
    torch.manual_seed(0)
    data, _ = blobs(400, 8, 3)
    init = KMeansInit(warmup_steps=1, reservoir_size=400, init="random")
    vq = VectorQuantizer(3, 8, maintenance=[init]).train()
    vq(data[:200])
    res = init.reservoir.contents().clone()
    vq(data[200:400])
    ref = kmeans(torch.cat([res, data[200:400]]), 8, iters=50, seed=1, init="random")
    torch.testing.assert_close(vq.codebook.detach(), ref.centers)
    assert "random start" in init.describe(vq)

    re = KMeansReestimate(every=2, until=None, reservoir_size=256, mode="dead", init="random")
    vq = VectorQuantizer(3, 16, maintenance=[re]).train()
    before = vq.codebook.detach().clone()
    events = []
    for i in range(3):  # 8 blobs for 16 codes: some codes go unused and are re-placed at step 2
        vq(data[i * 100 : (i + 1) * 100])
        events += vq.pop_events()
    assert [e.strategy for e in events if e.status == "done"] == ["k-means re-estimation"]
    moved = (vq.codebook.detach() - before).abs().sum(1) > 0
    assert 0 < int(moved.sum()) < 16
    for bad in (KMeansInit, KMeansReestimate):
        with pytest.raises(ValueError, match=r"init must be one of \('k-means\+\+', 'random'\)"):
            bad(init="kmeans++")


def test_local_trials_reach_every_kmeans_call(monkeypatch):
    """local_trials=1 (plain k-means++) is what KMeansInit and both re-estimation modes seed
    with: the init equals kmeans(local_trials=1) and differs from the greedy seeding, the
    describe lines say so, and a bad value fails at construction."""
    torch.manual_seed(0)
    data, _ = blobs(400, 8, 3)
    init = KMeansInit(warmup_steps=1, reservoir_size=400, local_trials=1)
    vq = VectorQuantizer(3, 8, maintenance=[init]).train()
    vq(data[:200])
    full = torch.cat([init.reservoir.contents().clone(), data[200:400]])
    vq(data[200:400])
    plain = kmeans(full, 8, iters=50, seed=1, local_trials=1)
    greedy = kmeans(full, 8, iters=50, seed=1)
    assert torch.equal(vq.codebook.detach(), plain.centers)
    assert not torch.equal(plain.centers, greedy.centers)
    assert "k-means++ with 1 candidate per step" in init.describe(vq)

    mod = sys.modules["vqkit.quantize.maintenance"]
    seen: dict[str, list] = {"kmeans": [], "kmeans_plusplus": []}
    for name in seen:
        real = getattr(mod, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen[_name].append(kwargs.get("local_trials"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, name, spy)
    for mode in ("full", "dead"):
        re = KMeansReestimate(every=2, until=None, reservoir_size=256, mode=mode, local_trials=3)
        vq = VectorQuantizer(3, 16, maintenance=[re]).train()
        assert "k-means++ with 3 candidates per step" in re.describe(vq)
        for v in seen.values():
            v.clear()
        events = []
        for i in range(3):
            vq(data[i * 100 : (i + 1) * 100])
            events += vq.pop_events()
        assert [e.strategy for e in events if e.status == "done"] == ["k-means re-estimation"]
        # full mode seeds inside kmeans; dead mode seeds the dead codes with kmeans_plusplus,
        # then refines with kmeans from those centers
        want = (
            {"kmeans": [3], "kmeans_plusplus": []}
            if mode == "full"
            else {"kmeans": [None], "kmeans_plusplus": [3]}
        )
        assert seen == want, (mode, seen)
    for bad in (KMeansInit, KMeansReestimate):
        with pytest.raises(ValueError, match="local_trials must be an int >= 1 or None, got 0"):
            bad(local_trials=0)


def test_large_codebooks_start_at_random_vectors_for_one_iteration(monkeypatch):
    """Past FULL_KMEANS_MAX_CODES codes (8,192; lowered here to 8 to keep the test small) the
    k-means strategies' defaults (init, iters None) run a random start and 1 Lloyd iteration:
    the init equals kmeans(init="random", iters=1), every re-estimation call gets them, the
    describe lines say so, and explicit values still win."""
    mod = sys.modules["vqkit.quantize.maintenance"]
    assert default_kmeans_start(8192, 50) == ("k-means++", 50)
    assert default_kmeans_start(8193, 20) == ("random", 1)
    assert KMeansInit().start(1024) == ("k-means++", 50)
    assert KMeansReestimate().start(1024) == ("k-means++", 20)
    assert KMeansReestimate(init="k-means++", iters=7).start(65536) == ("k-means++", 7)
    assert default_reassign(8192) and not default_reassign(8193)
    assert KMeansInit().reassigns(1024) and not KMeansReestimate().reassigns(16384)
    assert KMeansReestimate(reassign=True).reassigns(65536)
    assert not KMeansInit(reassign=False).reassigns(16)
    for bad in (KMeansInit, KMeansReestimate):
        with pytest.raises(TypeError, match="reassign must be a bool or None, got 'no'"):
            bad(reassign="no")
    monkeypatch.setattr(mod, "FULL_KMEANS_MAX_CODES", 8)
    torch.manual_seed(0)
    data, _ = blobs(400, 8, 3)
    init = KMeansInit(warmup_steps=1, reservoir_size=400)
    vq = VectorQuantizer(3, 16, maintenance=[init]).train()
    replaced: list = []
    real_replace = vq.replace_codes

    def record(mask, codes, counts):
        replaced.append(counts.clone())
        return real_replace(mask, codes, counts)

    vq.replace_codes = record
    vq(data[:200])
    full = torch.cat([init.reservoir.contents().clone(), data[200:400]])
    vq(data[200:400])
    ref = kmeans(full, 16, iters=1, seed=1, init="random")
    assert torch.equal(vq.codebook.detach(), ref.centers)
    assert not torch.equal(ref.centers, kmeans(full, 16, iters=50, seed=1, init="random").centers)
    # and no final assignment pass: the new codes' usage is the size of the cluster each was
    # averaged from (tokens per step / reservoir size of it), not of the reassigned one
    cheap = kmeans(full, 16, iters=1, seed=1, init="random", reassign=False)
    start = torch.bincount(cheap.assignments, minlength=16).float() * 200 / 400
    assert not torch.equal(start, torch.bincount(ref.assignments, minlength=16).float() / 2)
    assert len(replaced) == 1 and torch.equal(replaced[0], start)
    assert "(1 iteration without a final assignment pass, random start)" in init.describe(vq)

    seen: list = []
    real = mod.kmeans

    def spy(*args, **kwargs):
        init = kwargs.get("init")
        kind = init if isinstance(init, str) else "tensor"
        seen.append((kind, kwargs.get("iters"), kwargs.get("reassign")))
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "kmeans", spy)
    for mode, want in (("full", [("random", 1, False)]), ("dead", [("tensor", 1, False)])):
        re = KMeansReestimate(every=2, until=None, reservoir_size=256, mode=mode)
        vq = VectorQuantizer(3, 16, maintenance=[re]).train()
        assert "(1 iteration without a final assignment pass, random start)" in re.describe(vq)
        seen.clear()
        for i in range(3):
            vq(data[i * 100 : (i + 1) * 100])
        # dead mode starts the dead codes at random reservoir vectors, then one Lloyd step
        assert seen == want, (mode, seen)
    re = KMeansReestimate(
        every=2, until=None, reservoir_size=256, init="k-means++", iters=4, reassign=True
    )
    vq = VectorQuantizer(3, 16, maintenance=[re]).train()
    assert "(4 iterations, k-means++ with 1 candidate per step)" in re.describe(vq)
    seen.clear()
    for i in range(3):
        vq(data[i * 100 : (i + 1) * 100])
    assert seen == [("k-means++", 4, True)]
    # iters=0: the codes are the start itself, K distinct reservoir vectors
    zero = KMeansInit(warmup_steps=1, reservoir_size=400, iters=0)
    vq = VectorQuantizer(3, 16, maintenance=[zero]).train()
    vq(data[:200])
    full = torch.cat([zero.reservoir.contents().clone(), data[200:400]])
    vq(data[200:400])
    picked = kmeans(full, 16, iters=0, seed=1, init="random").centers
    assert torch.equal(vq.codebook.detach(), picked)
    # each code is, bitwise, one of the reservoir's rows
    assert (picked[:, None, :] == full[None]).all(-1).any(1).all()
    assert "(0 iterations, random start)" in zero.describe(vq)
    with pytest.raises(ValueError, match="iters must be an int >= 0 or None, got -1"):
        KMeansInit(iters=-1)


def test_kmeans_init_waits_for_enough_samples(caplog):
    vq = VectorQuantizer(2, 32, maintenance=[KMeansInit(warmup_steps=0, reservoir_size=64)]).train()
    with caplog.at_level(logging.INFO, logger="vqkit"):
        vq(torch.randn(10, 2))
    assert "k-means init at step 0 skipped: 10 samples < 32 codes" in caplog.text
    assert not vq.maintenance[0].is_done()
    vq(torch.randn(30, 2))
    assert vq.maintenance[0].is_done()
    skipped, done = vq.pop_events()
    assert (skipped.status, skipped.samples, skipped.codes_replaced) == ("skipped", 10, 0)
    assert (done.strategy, done.status, done.step) == ("k-means init", "done", 1)
    assert (done.samples, done.codes_replaced) == (40, 32)
    assert done.inertia is not None and done.inertia >= 0 and done.ms > 0
    assert vq.pop_events() == []  # drained


def test_reestimate_full_replaces_everything_and_logs(caplog):
    torch.manual_seed(0)
    data, centers = blobs(4000, 8, 2)
    re = KMeansReestimate(every=2, until=100, reservoir_size=512, mode="full")
    vq = VectorQuantizer(2, 8, maintenance=[re]).train()
    with caplog.at_level(logging.INFO, logger="vqkit"):
        for i in range(3):
            vq(data[i * 300 : (i + 1) * 300])
    assert "k-means re-estimation at step 2: 512 samples, 8 codes replaced, inertia" in caplog.text
    assert "(whole codebook)" in caplog.text
    (event,) = vq.pop_events()
    assert (event.step, event.samples, event.codes_replaced) == (2, 512, 8)
    assert re.reservoir.seen == 0  # this step was added, then the reservoir reset (VQFR order)
    # Every true blob center now has a code within the noise level.
    d = torch.cdist(centers, vq.codebook.detach()).min(1).values
    assert d.max() < 0.1
    assert vq.num_replacements.item() == 1 and vq.replaced_mask.all()


def test_reestimate_skips_when_reservoir_short(caplog):
    re = KMeansReestimate(every=1, until=10, reservoir_size=64, mode="full")
    vq = VectorQuantizer(2, 64, maintenance=[re]).train()
    c0 = vq.codebook.detach().clone()
    with caplog.at_level(logging.INFO, logger="vqkit"):
        vq(torch.randn(5, 2))
        vq(torch.randn(5, 2))
    # seed 001's skip line: the reason, with both counts
    assert "k-means re-estimation at step 1 skipped: too few samples (10 < 64 codes)" in caplog.text
    assert torch.equal(vq.codebook.detach(), c0)


def test_reestimate_dead_mode_keeps_live_codes():
    torch.manual_seed(0)
    data, centers = blobs(3000, 8, 2, spread=0.02)
    re = KMeansReestimate(every=3, until=100, reservoir_size=256, mode="dead", min_usage=1)
    vq = VectorQuantizer(2, 8, maintenance=[re]).train()
    with torch.no_grad():  # four codes on four blobs, four codes far away (dead)
        vq.codebook[:4] = centers[:4]
        vq.codebook[4:] = 100.0 + torch.arange(8.0).view(4, 2)
    live_before = vq.codebook.detach()[:4].clone()
    for i in range(4):
        vq(data[i * 200 : (i + 1) * 200])
    assert torch.equal(vq.codebook.detach()[:4], live_before), "live codes must be kept"
    assert vq.replaced_mask[4:].all() and not vq.replaced_mask[:4].any()
    d = torch.cdist(centers, vq.codebook.detach()).min(1).values
    assert d.max() < 0.1, "dead codes should move to the unserved blobs"


def test_dead_code_restart_ema_consistent():
    torch.manual_seed(0)
    vq = VectorQuantizer(
        2, 16, ema=EMAUpdate(decay=0.9), maintenance=[DeadCodeRestart(threshold=2.0)]
    ).train()
    with torch.no_grad():
        vq.codebook.fill_(50.0)
        vq.codebook[0] = 0.0
        vq.ema.embed_sum.copy_(vq.codebook)
    x = torch.randn(256, 2)
    vq(x)
    # All 15 far codes were dead; they restart at batch samples.
    assert vq.replaced_mask[1:].all()
    (event,) = vq.pop_events()
    assert (event.strategy, event.step, event.codes_replaced) == ("dead-code restart", 0, 15)
    # the first batch starts the EMA counts: the far codes took none of it
    assert event.detail == "EMA usage 0 on average, at most 0, below 2; restarted at batch vectors"
    restarted = vq.codebook.detach()[1:]
    gap = (restarted[:, None] - x[None]).abs().sum(-1).min(1).values
    assert gap.max() == 0.0
    cs = vq.ema.cluster_size[1:]
    assert (cs >= 2.0).all()
    torch.testing.assert_close(vq.ema.embed_sum[1:], restarted * cs[:, None])
    torch.testing.assert_close(vq.usage.ema_counts[1:], cs)
    # The next step spreads the batch across the restarted codes.
    out = vq(torch.randn(256, 2))
    assert int(out.used_codes) >= 12


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: KMeansReestimate(every=0), "every must be > 0, got 0"),
        (lambda: KMeansReestimate(mode="half"), "mode must be 'full' or 'dead'"),
        (lambda: DeadCodeRestart(source="disk"), "source must be 'batch' or 'reservoir'"),
        (lambda: KMeansInit(warmup_steps=-1), "warmup_steps must be >= 0"),
    ],
)
def test_strategy_argument_errors(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_reservoir_smaller_than_codebook_errors():
    with pytest.raises(
        ValueError, match=r"reservoir_size \(100\) must be >= codebook_size \(1024\)"
    ):
        VectorQuantizer(8, 1024, maintenance=[KMeansReestimate(reservoir_size=100)])


def test_maintenance_state_resumes():
    torch.manual_seed(0)
    data, _ = blobs(2000, 8, 2)

    def make():
        return VectorQuantizer(
            2, 8, ema=EMAUpdate(), maintenance=[KMeansReestimate(every=3, reservoir_size=64)]
        ).train()

    a = make()
    b = make()
    b.load_state_dict(a.state_dict())
    for i in range(4):
        a(data[i * 50 : (i + 1) * 50])
    c = make()
    c.load_state_dict(a.state_dict())
    for i in range(4, 8):
        a(data[i * 50 : (i + 1) * 50])
        c(data[i * 50 : (i + 1) * 50])
    for k, v in a.state_dict().items():
        assert torch.equal(v, c.state_dict()[k]), k


def test_low_usage_reset_replaces_the_least_used_share():
    """Seed 002's reset: every `every` steps the 30% least-used codes since the last reset
    restart at batch vectors; used codes keep their vectors."""
    from vqkit import LowUsageReset

    torch.manual_seed(0)
    vq = VectorQuantizer(2, 10, maintenance=[LowUsageReset(fraction=0.3, every=2)]).train()
    with torch.no_grad():
        vq.codebook.copy_(torch.arange(10.0)[:, None].repeat(1, 2) * 10)
    before = vq.codebook.detach().clone()
    # all tokens near codes 0..6: codes 7, 8, 9 are never used
    x = before[torch.arange(140) % 7] + 0.01 * torch.randn(140, 2)
    vq(x)
    assert vq.pop_events() == [] and torch.equal(vq.codebook.detach(), before)  # step 1 of 2
    vq(x)
    (event,) = vq.pop_events()
    assert (event.strategy, event.step, event.codes_replaced) == ("low-usage reset", 1, 3)
    assert "used 0 times on average" in event.detail
    assert torch.equal(vq.codebook.detach()[:7], before[:7])
    restarted = vq.codebook.detach()[7:]
    assert ((restarted[:, None] - x[None]).abs().sum(-1).min(1).values == 0).all()
    with pytest.raises(ValueError, match="fraction must be in"):
        LowUsageReset(fraction=0.0)


def test_init_and_reestimation_share_one_reservoir():
    """Same size, dtype, device and seed: one reservoir, fed once a step, saved once (the anime
    configs kept two 65,536-row copies in every checkpoint). Checkpoints from before load."""
    init = KMeansInit(warmup_steps=2, reservoir_size=64)
    re = KMeansReestimate(every=3, until=10, reservoir_size=64, mode="dead")
    other = DeadCodeRestart(threshold=0.5, source="reservoir", reservoir_size=32)
    vq = VectorQuantizer(2, 8, maintenance=[init, re, other]).train()
    assert init.reservoir is re.reservoir and other.reservoir is not init.reservoir
    assert len(vq.reservoirs) == 2
    vq(torch.randn(20, 2))
    assert init.reservoir.seen == 20  # fed once although two strategies add to it
    keys = [k for k in vq.state_dict() if k.endswith("seen") or ".buffer" in k]
    assert not any(k.startswith("maintenance.") for k in keys), keys
    # a checkpoint written when each strategy had its own reservoir
    state = vq.state_dict()
    name = next(n for n, r in vq.reservoirs.items() if r is init.reservoir)
    old = {}
    for k, v in state.items():
        if k.startswith(f"reservoirs.{name}."):
            old[k.replace(f"reservoirs.{name}.", "maintenance.0.reservoir.")] = v
            old[k.replace(f"reservoirs.{name}.", "maintenance.1.reservoir.")] = v
        else:
            old[k] = v
    fresh = VectorQuantizer(
        2,
        8,
        maintenance=[
            KMeansInit(warmup_steps=2, reservoir_size=64),
            KMeansReestimate(every=3, until=10, reservoir_size=64, mode="dead"),
            DeadCodeRestart(threshold=0.5, source="reservoir", reservoir_size=32),
        ],
    )
    fresh.load_state_dict(old)
    assert torch.equal(fresh.maintenance[0].reservoir.contents(), init.reservoir.contents())


def test_default_reservoir_is_four_vectors_per_code_at_least_16384():
    """reservoir_size=None: max(16,384, 4 x K) for every strategy that keeps one, so init and
    re-estimation share it at any codebook size; the describe line says the real size."""
    for k, want in ((8, 16384), (4096, 16384), (8192, 32768)):
        init, re = KMeansInit(), KMeansReestimate(every=3)
        restart = DeadCodeRestart(source="reservoir")
        vq = VectorQuantizer(2, k, maintenance=[init, re, restart])
        assert init.reservoir is re.reservoir is restart.reservoir and len(vq.reservoirs) == 1
        assert init.reservoir.size == want == default_reservoir_size(k)
        assert (init.reservoir_size, re.reservoir_size) == (None, None)  # the argument, as given
        assert f"{want}-vector reservoir" in re.describe(vq)
    explicit = KMeansInit(reservoir_size=100)
    VectorQuantizer(2, 8, maintenance=[explicit])
    assert explicit.reservoir.size == 100
    with pytest.raises(ValueError, match=r"reservoir_size \(4\) must be >= codebook_size \(8\)"):
        VectorQuantizer(2, 8, maintenance=[KMeansInit(reservoir_size=4)])
    with pytest.raises(ValueError, match="reservoir_size must be > 0"):
        KMeansReestimate(reservoir_size=0)


def test_dead_code_restart_floor_bounds_the_threshold_from_below():
    """With few tokens per code a step, a quarter of the uniform rate is tiny and a code the
    encoder has left stays "alive" for a hundred steps; ``floor`` (tokens per step) bounds the
    threshold from below. 64 codes, 16 tokens a step: the relative threshold is 0.0625. Codes
    0-15 sit at an EMA usage of 0.08 and get no token this step (0.0792 after it): alive for the
    relative threshold, dead under a floor of 0.1. The hot codes are never touched."""
    from vqkit import DeadCodeRestart, VectorQuantizer

    def replaced(floor: float) -> tuple[Tensor, list]:
        torch.manual_seed(0)
        restart = DeadCodeRestart(0.25, relative=True, floor=floor)
        vq = VectorQuantizer(4, 64, maintenance=[restart])
        vq.train()
        vq.usage.ema_counts[:16] = 0.08
        vq.usage.ema_counts[16:] = 5.0
        vq.usage.ema_started.fill_(True)
        z = vq.codebook.detach()[16:32].clone()  # each token sits on a hot code
        vq(z)
        return vq.replaced_mask.clone(), vq.pop_events()

    mask, events = replaced(0.0)
    assert not mask.any() and not [e for e in events if e.strategy == "dead-code restart"]
    mask, events = replaced(0.1)
    assert torch.equal(mask, torch.arange(64) < 16)
    (event,) = [e for e in events if e.strategy == "dead-code restart"]
    assert event.codes_replaced == 16 and "below 0.1;" in event.detail, event.detail
    # a floor under the relative threshold changes nothing
    mask, _ = replaced(0.05)
    assert not mask.any()
    vq = VectorQuantizer(4, 64, maintenance=[DeadCodeRestart(0.25, relative=True, floor=0.0625)])
    text = " ".join(vq.describe_schedule())
    want = "below the larger of 0.25 x the uniform rate (tokens per step / 64) and 0.0625 tokens"
    assert want in text, text
    assert "floor=0.0625" in repr(vq.maintenance[0])
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match=r"floor must be >= 0 \(tokens per step\), got"):
            DeadCodeRestart(floor=bad)


def test_dead_code_restart_pick_kmeanspp_goes_where_the_codebook_covers_worst():
    """``pick='k-means++'`` draws the new codes by their squared distance to the codebook:
    a batch of 200 tokens sitting on hot codes (distance 0) and 6 far, distinct ones restarts
    6 dead codes at exactly those 6; a uniform pick almost surely takes covered tokens. With
    more dead codes than tokens the rest are uniform draws from the batch."""
    from vqkit import DeadCodeRestart, VectorQuantizer

    def restarted(pick: str, n_dead: int, far: Tensor, k: int = 64) -> tuple[Tensor, Tensor]:
        torch.manual_seed(0)
        vq = VectorQuantizer(4, k, maintenance=[DeadCodeRestart(1.0, pick=pick)])
        vq.train()
        vq.usage.ema_counts[:n_dead] = 0.0
        vq.usage.ema_counts[n_dead:] = 50.0
        vq.usage.ema_started.fill_(True)
        hot = vq.codebook.detach()[n_dead:]
        z = torch.cat([hot[torch.arange(200) % hot.shape[0]], far])
        vq(z)
        assert torch.equal(vq.replaced_mask, torch.arange(k) < n_dead)
        return vq.codebook.detach()[:n_dead].clone(), z

    far = torch.randn(6, 4, generator=torch.Generator().manual_seed(3)) * 5 + 40
    rows = lambda t: {tuple(r) for r in t.tolist()}  # noqa: E731
    new, _ = restarted("k-means++", 6, far)
    assert rows(new) == rows(far)
    new, _ = restarted("random", 6, far)
    assert len(rows(new) & rows(far)) < 6
    # 250 dead codes of 300, 206 tokens: the 6 far ones by their weight, then (every weight
    # zero) covered tokens, and past 206 uniform draws; every new code is a batch token
    new, z = restarted("k-means++", 250, far, k=300)
    assert rows(new) <= rows(z) and rows(far) <= rows(new)
    vq = VectorQuantizer(4, 64, maintenance=[DeadCodeRestart(0.25, pick="k-means++")])
    assert "restart at encoder outputs drawn by k-means++" in " ".join(vq.describe_schedule())
    assert "pick='k-means++'" in repr(vq.maintenance[0])
    assert "pick" not in repr(DeadCodeRestart())
    with pytest.raises(ValueError, match="pick must be 'random' or 'k-means\\+\\+', got 'far'"):
        DeadCodeRestart(pick="far")
    with pytest.raises(ValueError, match="pick='k-means\\+\\+' needs source='batch'"):
        DeadCodeRestart(source="reservoir", pick="k-means++")


def test_dead_code_restart_limit_restarts_at_most_one_code_per_vector():
    """250 dead codes, 206 tokens: ``limit=True`` restarts the 206 least used, each at its own
    token, and leaves the other 44 for the next step; without it all 250 restart and 44 share
    a token with another restarted code, where they capture nothing."""
    from vqkit import DeadCodeRestart, VectorQuantizer

    def restart(limit: bool) -> VectorQuantizer:
        torch.manual_seed(0)
        vq = VectorQuantizer(4, 300, maintenance=[DeadCodeRestart(1.0, limit=limit)])
        vq.train()
        vq.codebook.data[:250] += 100.0  # far from every token: no use this step either
        vq.usage.ema_counts[:250] = torch.linspace(0.0, 0.5, 250)  # dead, code 0 least used
        vq.usage.ema_counts[250:] = 50.0
        vq.usage.ema_started.fill_(True)
        vq(torch.randn(206, 4, generator=torch.Generator().manual_seed(4)) * 3)
        return vq

    vq = restart(True)
    assert torch.equal(vq.replaced_mask, torch.arange(300) < 206)
    assert len({tuple(r) for r in vq.codebook[:206].tolist()}) == 206
    assert "limit=True" in repr(vq.maintenance[0])
    vq = restart(False)
    assert torch.equal(vq.replaced_mask, torch.arange(300) < 250)
    assert len({tuple(r) for r in vq.codebook[:250].tolist()}) <= 206
    assert "limit" not in repr(vq.maintenance[0])
    with pytest.raises(TypeError, match="limit must be true or false, got 'yes'"):
        DeadCodeRestart(limit="yes")


def test_kmeans_init_starts_the_usage_average_a_restart_reads():
    """With more codes than a batch has tokens, the first batch after k-means init leaves most
    codes unhit; the usage average must start from k-means' predicted counts, or a dead-code
    restart throws the fresh centers away at once (it did: 9,794 of 8,192 codes in two steps of
    the sparse 3D quickstart)."""
    from vqkit import DeadCodeRestart, EMAUpdate, KMeansInit, VectorQuantizer

    torch.manual_seed(0)
    vq = VectorQuantizer(
        8,
        512,
        ema=EMAUpdate(),
        maintenance=[KMeansInit(warmup_steps=1, reservoir_size=4096), DeadCodeRestart(0.05)],
    )
    vq.train()
    vq(torch.randn(4096, 8))  # warm-up step: fills the reservoir
    vq(torch.randn(256, 8))  # k-means init, then the first quantized batch: 256 tokens
    events = vq.pop_events()
    assert [e.status for e in events if e.strategy == "k-means init"] == ["done"]
    restarted = sum(e.codes_replaced for e in events if e.strategy == "dead-code restart")
    assert restarted <= 512 * 0.05, restarted


def test_dead_code_restart_relative_threshold_follows_the_uniform_rate():
    """relative=True reads the threshold as a share of tokens per step / K. With 512 codes and
    256 tokens a step (0.5 per code), an absolute threshold of 1 reads every code as dead; a
    quarter of the uniform rate restarts only the codes k-means gave (almost) no data."""
    from vqkit import DeadCodeRestart, EMAUpdate, KMeansInit, VectorQuantizer

    def restarts(restart: DeadCodeRestart) -> int:
        torch.manual_seed(0)
        vq = VectorQuantizer(
            8, 512, ema=EMAUpdate(), maintenance=[KMeansInit(16, reservoir_size=4096), restart]
        )
        vq.train()
        for _ in range(16 + 5):  # 16 warm-up steps fill the reservoir, then 5 quantized ones
            vq(torch.randn(256, 8))
        events = vq.pop_events()
        return sum(e.codes_replaced for e in events if e.strategy == "dead-code restart")

    relative, absolute = (
        restarts(DeadCodeRestart(0.25, relative=True)),
        restarts(DeadCodeRestart(1)),
    )
    assert absolute >= 512  # every code restarted at least once
    assert relative < 0.15 * 512, relative
    vq = VectorQuantizer(8, 512, maintenance=[DeadCodeRestart(0.25, relative=True)])
    assert "0.25 x the uniform rate (tokens per step / 512)" in " ".join(vq.describe_schedule())

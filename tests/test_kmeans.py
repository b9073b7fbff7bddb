import math
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vqkit.quantize.kmeans  # noqa: F401 - makes the module reachable through sys.modules
from vqkit.quantize.distance import nearest
from vqkit.quantize.kmeans import KMeansResult, kmeans, kmeans_plusplus

# The module, not the function of the same name that vqkit.quantize re-exports.
KM = sys.modules["vqkit.quantize.kmeans"]


@pytest.fixture(params=["bounded", "full"])
def lloyd_path(request, monkeypatch):
    """Run a test through both E-step paths: the bounds (forced even on small data) and the full
    recomputation that small problems take."""
    monkeypatch.setattr(KM, "_SMALL", 0 if request.param == "bounded" else 2**62)
    return request.param


def blobs(n: int, k: int, d: int, *, seed: int = 0, spread: float = 1.0, scale: float = 4.0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g) * scale
    labels = torch.arange(n) % k  # every blob gets points
    labels = labels[torch.randperm(n, generator=g)]
    return means[labels] + spread * torch.randn(n, d, generator=g), labels, means


def sqdist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (x.double()[:, None, :] - c.double()[None, :, :]).pow(2).sum(-1)


def reference_lloyd(x: torch.Tensor, centers: torch.Tensor, iters: int):
    """Plain Lloyd with full distance recomputation (no empty clusters in the data used)."""
    for _ in range(iters):
        assign, _ = nearest(x, centers)
        counts = torch.bincount(assign, minlength=centers.shape[0])
        assert (counts > 0).all()
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        centers = sums / counts[:, None].float()
    return centers, nearest(x, centers)[0]


# ---------------------------------------------------------------------------------------------
# Quality
# ---------------------------------------------------------------------------------------------


def test_inertia_within_1pct_of_sklearn():
    cluster = pytest.importorskip("sklearn.cluster")
    x, _, _ = blobs(2000, 24, 16, seed=1, spread=1.5, scale=2.0)
    ours = sorted(kmeans(x, 32, seed=s).inertia for s in range(3))
    theirs = sorted(
        cluster.KMeans(n_clusters=32, random_state=s).fit(x.numpy()).inertia_ for s in range(3)
    )
    # Medians over seeds, so that one unlucky seed on either side does not decide.
    assert ours[1] <= 1.01 * theirs[1], (ours, theirs)


def test_kmeans_plusplus_potential_matches_sklearn():
    cluster = pytest.importorskip("sklearn.cluster")
    x, _, _ = blobs(1500, 40, 8, seed=2, spread=1.0, scale=3.0)
    ours = [float(nearest(x, kmeans_plusplus(x, 40, seed=s))[1].sum()) for s in range(8)]
    theirs = []
    for s in range(8):
        c, _ = cluster.kmeans_plusplus(x.numpy(), 40, random_state=s)
        theirs.append(float(nearest(x, torch.from_numpy(c))[1].sum()))
    # Same algorithm (greedy, 2 + ln k trials), different random streams: same mean potential.
    mean_ours, mean_theirs = sum(ours) / 8, sum(theirs) / 8
    assert abs(mean_ours / mean_theirs - 1) < 0.05, (mean_ours, mean_theirs)


def test_plain_kmeans_plusplus_matches_sklearn_one_trial_and_greedy_beats_it():
    cluster = pytest.importorskip("sklearn.cluster")
    x, _, _ = blobs(1500, 40, 8, seed=2, spread=1.0, scale=3.0)

    def potential(c: torch.Tensor) -> float:
        return float(nearest(x, c)[1].sum())

    plain = [potential(kmeans_plusplus(x, 40, seed=s, local_trials=1)) for s in range(8)]
    theirs = [
        potential(
            torch.from_numpy(
                cluster.kmeans_plusplus(x.numpy(), 40, random_state=s, n_local_trials=1)[0]
            )
        )
        for s in range(8)
    ]
    greedy = [potential(kmeans_plusplus(x, 40, seed=s)) for s in range(8)]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    assert abs(mean(plain) / mean(theirs) - 1) < 0.1, (plain, theirs)
    # The greedy best of 2 + ln k candidates lowers the potential below one candidate's.
    assert mean(greedy) < mean(plain), (greedy, plain)
    # Through kmeans too: the seeding changes, the result is still a valid k-means.
    res = kmeans(x, 40, seed=0, local_trials=1)
    assert torch.equal(res.assignments, nearest(x, res.centers)[0])


def test_recovers_well_separated_blobs_exactly():
    x, labels, means = blobs(800, 10, 5, seed=3, spread=0.05, scale=10.0)
    res = kmeans(x, 10, seed=0)
    assert isinstance(res, KMeansResult)
    # A bijection between true and found clusters.
    pairs = set(zip(labels.tolist(), res.assignments.tolist(), strict=True))
    assert len(pairs) == 10
    assert len({a for _, a in pairs}) == 10
    for t, a in pairs:
        torch.testing.assert_close(res.centers[a], x[labels == t].mean(0))
    assert res.inertia == pytest.approx(float(sqdist(x, res.centers).min(1).values.sum()), rel=1e-5)


def test_matches_plain_lloyd_with_same_init(lloyd_path):
    # The bounds only skip work: centers and assignments equal those of full recomputation.
    x, _, _ = blobs(3000, 60, 12, seed=4, spread=1.2, scale=1.5)
    init = kmeans_plusplus(x, 60, seed=1)
    for iters in (1, 3, 12):
        res = kmeans(x, 60, init=init, iters=iters, tol=0.0)
        ref_c, ref_a = reference_lloyd(x, init, res.iterations)
        torch.testing.assert_close(res.centers, ref_c, rtol=1e-5, atol=1e-5)
        assert torch.equal(res.assignments, ref_a)


def test_chunk_size_does_not_change_the_result():
    x, _, _ = blobs(1200, 30, 6, seed=5, spread=0.3, scale=5.0)
    a = kmeans(x, 30, seed=7)
    b = kmeans(x, 30, seed=7, chunk_size=50)  # also forces small candidate pools in k-means++
    assert torch.equal(a.assignments, b.assignments)
    torch.testing.assert_close(a.centers, b.centers)


# ---------------------------------------------------------------------------------------------
# Determinism, init, stopping
# ---------------------------------------------------------------------------------------------


def test_deterministic_for_a_seed_and_different_for_another():
    x, _, _ = blobs(1000, 20, 8, seed=6, spread=1.5, scale=1.0)
    a = kmeans(x, 20, seed=11, iters=10)
    b = kmeans(x, 20, seed=11, iters=10)
    c = kmeans(x, 20, seed=12, iters=10)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.assignments, b.assignments)
    assert a.inertia == b.inertia and a.iterations == b.iterations
    assert not torch.equal(a.centers, c.centers)
    # The global RNG is neither used nor disturbed.
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    kmeans(x, 20, seed=11, iters=2)
    assert torch.equal(torch.rand(3), before)
    pa, pb = kmeans_plusplus(x, 20, seed=3), kmeans_plusplus(x, 20, seed=3)
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, kmeans_plusplus(x, 20, seed=4))


def test_random_init_picks_distinct_points():
    x, _, _ = blobs(500, 5, 3, seed=7)
    res = kmeans(x, 16, init="random", iters=0)
    assert res.iterations == 0
    rows = {tuple(r) for r in res.centers.tolist()}
    assert len(rows) == 16 and rows <= {tuple(r) for r in x.tolist()}


def test_kmeans_plusplus_returns_distinct_data_points():
    x, _, _ = blobs(300, 6, 4, seed=8)
    c = kmeans_plusplus(x, 50, seed=0)
    assert c.shape == (50, 4) and c.dtype == torch.float32
    rows = {tuple(r) for r in c.tolist()}
    assert len(rows) == 50 and rows <= {tuple(r) for r in x.tolist()}
    # k == N: every point becomes a center.
    small = x[:20]
    assert {tuple(r) for r in kmeans_plusplus(small, 20).tolist()} == {
        tuple(r) for r in small.tolist()
    }


def test_warm_start_from_tensor():
    x, _, means = blobs(900, 9, 4, seed=9, spread=0.1, scale=8.0)
    res = kmeans(x, 9, init=means.clone(), iters=50)
    torch.testing.assert_close(res.centers, means, atol=0.05, rtol=0)
    # Restarting from a converged solution changes nothing and stops at once.
    again = kmeans(x, 9, init=res.centers, iters=50)
    assert again.iterations == 1
    torch.testing.assert_close(again.centers, res.centers)
    assert torch.equal(again.assignments, res.assignments)
    # The init tensor is not modified in place.
    init = means.clone()
    kmeans(x, 9, init=init)
    assert torch.equal(init, means)


def test_tol_stops_early(lloyd_path):
    x, _, _ = blobs(2000, 40, 8, seed=10, spread=2.0, scale=1.0)
    init = kmeans_plusplus(x, 40, seed=0)
    exact = kmeans(x, 40, init=init, iters=100, tol=0.0)
    loose = kmeans(x, 40, init=init, iters=100, tol=1e-1)
    assert 1 <= loose.iterations < exact.iterations <= 100
    capped = kmeans(x, 40, init=init, iters=2, tol=0.0)
    assert capped.iterations == 2


def test_iters_zero_assigns_to_init():
    x, _, _ = blobs(200, 4, 3, seed=11)
    init = x[:4].clone()
    res = kmeans(x, 4, init=init, iters=0)
    assert res.iterations == 0 and torch.equal(res.centers, init)
    assert torch.equal(res.assignments, nearest(x, init)[0])


def test_reassign_false_returns_the_assignments_the_centers_were_averaged_from(lloyd_path):
    """reassign=False skips the last pass: the same centers, and the assignments (and inertia)
    of the E-step they are the means of; a run that converges before its cap is unchanged."""
    x, _, _ = blobs(2000, 40, 8, seed=13, spread=1.5, scale=1.0)
    init = x[:40].clone()
    for iters in (1, 3):
        full = kmeans(x, 40, init=init, iters=iters, tol=0.0)
        cheap = kmeans(x, 40, init=init, iters=iters, tol=0.0, reassign=False)
        assert cheap.iterations == full.iterations == iters
        assert torch.equal(cheap.centers, full.centers)
        # the E-step before the last update: iters - 1 full Lloyd iterations from init
        before = kmeans(x, 40, init=init, iters=iters - 1, tol=0.0)
        assert torch.equal(cheap.assignments, before.assignments)
        assert not torch.equal(cheap.assignments, full.assignments)
        counts = torch.bincount(cheap.assignments, minlength=40)
        sums = torch.zeros(40, 8).index_add_(0, cheap.assignments, x)
        torch.testing.assert_close(cheap.centers, sums / counts[:, None].float())
        want = float((x - cheap.centers[cheap.assignments]).double().pow(2).sum())
        assert cheap.inertia == pytest.approx(want, rel=1e-5)
    # From a random start too (the large-codebook default): the start's pass without bounds.
    a = kmeans(x, 40, init="random", iters=1, seed=3)
    b = kmeans(x, 40, init="random", iters=1, seed=3, reassign=False)
    assert torch.equal(a.centers, b.centers)
    assert torch.equal(b.assignments, kmeans(x, 40, init="random", iters=0, seed=3).assignments)
    # Converged before the cap: nothing is skipped.
    loose = kmeans(x, 40, init=init, iters=500, reassign=False)
    assert loose.iterations < 500
    ref = kmeans(x, 40, init=init, iters=500)
    assert torch.equal(loose.centers, ref.centers)
    assert torch.equal(loose.assignments, ref.assignments)
    with pytest.raises(TypeError, match="reassign must be a bool, got 0"):
        kmeans(x, 4, reassign=0)


# ---------------------------------------------------------------------------------------------
# Empty clusters, frozen centers, existing centers
# ---------------------------------------------------------------------------------------------


def test_empty_clusters_are_reseeded(lloyd_path):
    x, _, _ = blobs(600, 6, 4, seed=12, spread=0.5, scale=3.0)
    init = x[:8].clone()
    init[1] = init[0]  # duplicate: one of the two gets no point
    init[5] = 1e3  # far away: gets no point
    first = kmeans(x, 8, init=init, iters=1)
    assert torch.bincount(first.assignments, minlength=8).min() > 0
    res = kmeans(x, 8, init=init, iters=50)
    counts = torch.bincount(res.assignments, minlength=8)
    assert counts.min() > 0, counts
    assert res.centers.abs().max() < 100
    assert len({tuple(r) for r in res.centers.tolist()}) == 8


def test_empty_cluster_takes_the_farthest_point(lloyd_path):
    x = torch.tensor([[0.0], [0.1], [0.2], [10.0], [10.1], [25.0]])
    init = torch.tensor([[0.1], [10.0], [1e4]])
    res = kmeans(x, 3, init=init, iters=1)
    # Center 2 attracted nothing; 25.0 is farthest from its center (10.0's cluster).
    assert res.centers[2].item() == 25.0
    assert res.assignments.tolist() == [0, 0, 0, 1, 1, 2]


def test_frozen_centers_stay_bitwise_and_others_move(lloyd_path):
    x, _, _ = blobs(1500, 12, 6, seed=13, spread=0.8, scale=3.0)
    init = kmeans_plusplus(x, 12, seed=0) + 0.3
    frozen = torch.zeros(12, dtype=torch.bool)
    frozen[[0, 3, 7]] = True
    res = kmeans(x, 12, init=init, frozen=frozen, iters=30)
    assert torch.equal(res.centers[frozen], init[frozen])
    assert (res.centers[~frozen] - init[~frozen]).norm(dim=1).min() > 1e-3
    # Assignments still use every center, frozen ones included.
    assert torch.equal(res.assignments, nearest(x, res.centers)[0])


def test_frozen_centers_are_never_reseeded(lloyd_path):
    x, _, _ = blobs(400, 4, 2, seed=14, spread=0.3, scale=4.0)
    init = torch.cat([x[:4], torch.full((2, 2), 1e3)])  # two far-away centers: empty
    frozen = torch.tensor([False, False, False, False, True, False])
    res = kmeans(x, 6, init=init, frozen=frozen, iters=20)
    assert torch.equal(res.centers[4], init[4])  # stays empty and in place
    assert res.centers[5].abs().max() < 100  # the movable empty one was reseeded
    assert (torch.bincount(res.assignments, minlength=6)[[0, 1, 2, 3, 5]] > 0).all()


def test_existing_centers_pull_new_ones_elsewhere():
    g = torch.Generator().manual_seed(15)
    near = torch.randn(500, 3, generator=g) * 0.01
    far = torch.randn(40, 3, generator=g) * 0.2 + torch.tensor([20.0, 0.0, 0.0])
    x = torch.cat([near, far])
    existing = torch.zeros(1, 3)  # covers the big, tight group already
    for seed in range(5):
        new = kmeans_plusplus(x, 3, seed=seed, existing=existing)
        assert new.shape == (3, 3)
        assert (new[:, 0] > 15).all(), new  # all placed in the far group
    # Without existing, the first center is most likely in the big group.
    hits = sum(float(kmeans_plusplus(x, 1, seed=s)[0, 0]) < 5 for s in range(20))
    assert hits >= 15


def test_closest_stands_for_the_existing_centers():
    """``closest`` (each point's squared distance to centers the caller holds) draws exactly
    what ``existing`` draws: the same generator, the same weights."""
    g = torch.Generator().manual_seed(17)
    x = torch.randn(400, 5, generator=g)
    existing = torch.randn(30, 5, generator=g)
    # the distances the existing path computes itself (a quantizer's assignment uses the
    # same function), so the weights are bitwise equal and so are the draws
    _, closest = nearest(x, existing)
    for seed in range(3):
        for trials in (1, None):
            a = kmeans_plusplus(x, 6, seed=seed, existing=existing, local_trials=trials)
            b = kmeans_plusplus(x, 6, seed=seed, closest=closest, local_trials=trials)
            assert torch.equal(a, b), (seed, trials)
    # a point on an existing center (distance 0) is never drawn
    closest = torch.ones(400)
    closest[:395] = 0.0
    c = kmeans_plusplus(x, 5, seed=0, closest=closest, local_trials=1)
    assert {tuple(r) for r in c.tolist()} == {tuple(r) for r in x[395:].tolist()}
    assert torch.equal(closest[:395], torch.zeros(395))  # the caller's tensor is not written


def test_existing_empty_is_plain_kmeans_plusplus():
    x, _, _ = blobs(300, 5, 3, seed=16)
    c = kmeans_plusplus(x, 7, seed=1, existing=torch.empty(0, 3))
    assert c.shape == (7, 3)
    assert {tuple(r) for r in c.tolist()} <= {tuple(r) for r in x.tolist()}


# ---------------------------------------------------------------------------------------------
# Dtypes, autocast, devices
# ---------------------------------------------------------------------------------------------


def test_low_precision_input_and_autocast_compute_in_fp32():
    x, _, _ = blobs(500, 8, 16, seed=17)
    ref = kmeans(x, 8, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = kmeans(x, 8, seed=0)
        pp = kmeans_plusplus(x, 8, seed=0)
    assert res.centers.dtype == torch.float32 and pp.dtype == torch.float32
    assert torch.equal(res.centers, ref.centers)
    half = kmeans(x.half(), 8, seed=0)
    assert half.centers.dtype == torch.float32 and half.assignments.dtype == torch.long


def test_k_equals_one_and_k_equals_n():
    x, _, _ = blobs(50, 3, 2, seed=18)
    one = kmeans(x, 1)
    torch.testing.assert_close(one.centers[0], x.mean(0))
    assert one.inertia == pytest.approx(float((x - x.mean(0)).pow(2).sum()), rel=1e-5)
    alln = kmeans(x, 50)
    assert alln.inertia == pytest.approx(0.0, abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, _, _ = blobs(2000, 16, 8, seed=19, spread=0.2, scale=5.0)
    cpu = kmeans(x, 16, seed=0)
    gpu = kmeans(x.cuda(), 16, seed=0)
    assert gpu.centers.device.type == "cuda" and gpu.assignments.device.type == "cuda"
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-3)
    with torch.autocast("cuda", dtype=torch.float16):
        assert kmeans(x.cuda(), 16, seed=0).centers.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: kmeans(x, 0), "k must be >= 1, got 0"),
        (lambda x: kmeans_plusplus(x, -2), "k must be >= 1, got -2"),
        (lambda x: kmeans(x[0], 2), r"x must be 2-D \(N, D\), got shape \(3,\)"),
        (lambda x: kmeans(x[None], 2), r"x must be 2-D \(N, D\), got shape \(1, 10, 3\)"),
        (lambda x: kmeans(x, 11), r"k \(11\) > number of points \(10\)"),
        (lambda x: kmeans_plusplus(x, 12), r"k \(12\) > number of points \(10\)"),
        (lambda x: kmeans(x, 2, init=torch.zeros(3, 3)), r"init must have shape \(2, 3\), got"),
        (lambda x: kmeans(x, 2, init=torch.zeros(2, 4)), r"init must have shape \(2, 3\), got"),
        (lambda x: kmeans(x, 2, init="kmeans"), "init must be 'k-means\\+\\+', 'random' or"),
        (
            lambda x: kmeans(x, 2, init=x[:2], frozen=torch.ones(3, dtype=torch.bool)),
            r"frozen must be a bool mask of shape \(2,\), got \(3,\)",
        ),
        (
            lambda x: kmeans(x, 2, init=x[:2], frozen=torch.ones(2)),
            r"frozen must be a bool mask of shape \(2,\), got dtype torch.float32",
        ),
        (
            lambda x: kmeans(x, 2, frozen=torch.ones(2, dtype=torch.bool)),
            "frozen needs a tensor init",
        ),
        (lambda x: kmeans(x, 2, iters=-1), "iters must be an int >= 0, got -1"),
        (lambda x: kmeans(x, 2, local_trials=0), "local_trials must be an int >= 1 or None"),
        (
            lambda x: kmeans_plusplus(x, 2, local_trials=True),
            "local_trials must be an int >= 1 or None, got True",
        ),
        (lambda x: kmeans(x, 2, tol=-1.0), "tol must be >= 0, got -1.0"),
        (lambda x: kmeans(x, 2, chunk_size=0), "chunk_size must be a positive int or None"),
        (
            lambda x: kmeans_plusplus(x, 2, existing=torch.zeros(4, 2)),
            r"existing must have shape \(M, 3\), got \(4, 2\)",
        ),
        (
            lambda x: kmeans_plusplus(x, 2, existing=x[:1], closest=torch.ones(10)),
            "pass existing or closest, not both",
        ),
        (
            lambda x: kmeans_plusplus(x, 2, closest=torch.ones(9)),
            r"closest must have shape \(10,\) \(one distance per point of x\), got \(9,\)",
        ),
        (
            lambda x: kmeans_plusplus(x, 2, closest=torch.full((10,), -1.0)),
            "closest must be finite squared distances >= 0",
        ),
    ],
)
def test_error_messages(call, message):
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match=message):
        call(x)


def test_non_finite_input_is_rejected_with_a_count():
    x = torch.randn(10, 3)
    x[2, 1] = float("nan")
    x[5, 0] = float("inf")
    with pytest.raises(ValueError, match="x has 2 non-finite values"):
        kmeans(x, 2)
    with pytest.raises(ValueError, match="x has 2 non-finite values"):
        kmeans_plusplus(x, 2)
    init = torch.zeros(2, 3)
    init[0, 0] = float("nan")
    with pytest.raises(ValueError, match="init has 1 non-finite values"):
        kmeans(torch.randn(10, 3), 2, init=init)


def test_type_errors():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        kmeans([[0.0, 1.0]], 1)
    with pytest.raises(TypeError, match="k must be an int"):
        kmeans(torch.randn(5, 2), 2.0)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(
    n=st.integers(1, 60),
    d=st.integers(1, 6),
    k_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    duplicates=st.booleans(),
    chunk=st.sampled_from([None, 1, 3, 16]),
    init=st.sampled_from(["k-means++", "random", "tensor", "tensor+frozen"]),
    iters=st.integers(0, 8),
    bounded=st.booleans(),
)
def test_property_assignments_are_argmin_and_inertia_is_consistent(
    n, d, k_frac, seed, duplicates, chunk, init, iters, bounded
):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.rand(1, generator=g).item() * 10
    if duplicates and n > 2:
        x[n // 2 :] = x[: n - n // 2].clone()
    k = max(1, min(n, 1 + int(k_frac * n)))
    frozen = None
    start: str | torch.Tensor = init
    if init.startswith("tensor"):
        # Random rows, one of them far away (empty, reseeded unless frozen).
        start = x[torch.randperm(n, generator=g)[:k]].clone()
        start[0] += 1e3
        if init == "tensor+frozen":
            frozen = torch.rand(k, generator=g) < 0.5
    saved = KM._SMALL
    KM._SMALL = 0 if bounded else 2**62
    try:
        res = kmeans(x, k, seed=seed, chunk_size=chunk, init=start, iters=iters, frozen=frozen)
    finally:
        KM._SMALL = saved
    if frozen is not None:
        assert torch.equal(res.centers[frozen], start[frozen])
    assert res.centers.shape == (k, d) and res.assignments.shape == (n,)
    assert res.assignments.dtype == torch.long
    assert 0 <= res.iterations <= iters
    assert torch.isfinite(res.centers).all()
    dist = sqdist(x, res.centers)
    own = dist.gather(1, res.assignments[:, None]).squeeze(1)
    scale = 1e-5 * (1.0 + float(x.pow(2).sum(1).max()))
    assert (own <= dist.min(1).values + scale).all()
    assert res.inertia == pytest.approx(float(own.sum()), rel=1e-5, abs=scale)
    assert math.isfinite(res.inertia)
    pp = kmeans_plusplus(x, k, seed=seed, chunk_size=chunk)
    assert {tuple(r) for r in pp.tolist()} <= {tuple(r) for r in x.tolist()}

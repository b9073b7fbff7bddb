"""2-process gloo tests: every rank must hold the same codebook after every kind of update."""

import pytest
import torch

from tests.dist_utils import run_distributed
from vqkit import (
    DeadCodeRestart,
    EMAUpdate,
    EntropyPenalty,
    KMeansInit,
    KMeansReestimate,
    VectorQuantizer,
)

pytestmark = pytest.mark.distributed


def _data(rank, step, n=64, d=4):
    g = torch.Generator().manual_seed(1000 * step + rank)
    centers = torch.randn(12, d, generator=torch.Generator().manual_seed(7)) * 3
    lab = torch.randint(12, (n,), generator=g)
    return centers[lab] + 0.1 * torch.randn(n, d, generator=g)


def _all_strategies(rank, world, pick="random", reassign=None):
    torch.manual_seed(rank)  # different initial codebooks: init must make them identical
    vq = VectorQuantizer(
        4,
        16,
        ema=EMAUpdate(decay=0.9),
        maintenance=[
            KMeansInit(warmup_steps=2, reservoir_size=128, reassign=reassign),
            KMeansReestimate(
                every=10, until=40, reservoir_size=128, mode="full", reassign=reassign
            ),
            DeadCodeRestart(threshold=4.0, pick=pick),
        ],
    ).train()
    snaps = {}
    for step in range(50):
        # ranks see different amounts of data each step
        vq(_data(rank, step, n=64 if rank == 0 else 32 + step))
        if step in (2, 10, 20, 49):
            snaps[step] = vq.codebook.clone()
    return {
        "snaps": snaps,
        "state": {k: v.clone() for k, v in vq.state_dict().items()},
        "replacements": int(vq.num_replacements),
    }


# the second case also runs k-means without its final assignment pass (the default past
# 8,192 codes): rank 0's cluster counts reach every rank
@pytest.mark.parametrize("pick, reassign", [("random", None), ("k-means++", False)])
def test_codebooks_bitwise_identical_across_ranks(pick, reassign):
    r0, r1 = run_distributed(_all_strategies, 2, pick, reassign)
    assert r0["replacements"] > 5  # init, 3 re-estimations, restarts
    for step in r0["snaps"]:
        assert torch.equal(r0["snaps"][step], r1["snaps"][step]), f"step {step}"
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k


def _limited_restart(rank, world):
    """128 codes, all dead; rank 0 holds 20 tokens, rank 1 50: rank 0's batch supplies the
    vectors, so both processes must restart the same 20 codes."""
    torch.manual_seed(rank)
    restart = DeadCodeRestart(threshold=1e6, limit=True)
    vq = VectorQuantizer(4, 128, maintenance=[restart]).train()
    vq.codebook.data.copy_(torch.randn(128, 4, generator=torch.Generator().manual_seed(1)))
    vq.usage.ema_counts.copy_(torch.arange(128, dtype=torch.float32))  # code 0 least used
    vq.usage.ema_started.fill_(True)
    vq(_data(rank, 0, n=20 if rank == 0 else 50))
    return vq.replaced_mask.clone(), vq.codebook.clone()


def test_limited_restart_restarts_the_same_codes_on_every_rank():
    (m0, c0), (m1, c1) = run_distributed(_limited_restart, 2)
    assert torch.equal(m0, torch.arange(128) < 20)  # the 20 least used, as many as rank 0's tokens
    assert torch.equal(m0, m1) and torch.equal(c0, c1)
    assert len({tuple(r) for r in c0[:20].tolist()}) == 20  # 20 distinct tokens


def _ema_global(rank, world, batches):
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 8, ema=EMAUpdate(decay=0.8)).train()
    for b in batches:
        half = b.shape[0] // 2
        vq(b[:half] if rank == 0 else b[half:])
    return vq.codebook.clone(), vq.usage.batch_counts.clone()


def test_ema_statistics_are_global():
    batches = [_data(0, s, n=40) for s in range(5)]
    r0, r1 = run_distributed(_ema_global, 2, batches)
    torch.manual_seed(0)
    single = VectorQuantizer(4, 8, ema=EMAUpdate(decay=0.8)).train()
    for b in batches:
        single(b)
    torch.testing.assert_close(r0[0], single.codebook, rtol=1e-5, atol=1e-6)
    assert torch.equal(r0[0], r1[0])
    assert torch.equal(r0[1], single.usage.batch_counts)


def _short_reservoir(rank, world):
    vq = VectorQuantizer(
        4, 64, maintenance=[KMeansReestimate(every=2, until=10, reservoir_size=64)]
    ).train()
    for step in range(8):
        # rank 1 contributes nothing at all: the global reservoir is short at steps 2 and 4
        # (30 and 50 < 64 samples) and the skip decision must be the same on both ranks.
        n = 10 if rank == 0 else 0
        vq(_data(rank, step, n=n))
    return vq.codebook.detach().clone(), int(vq.num_replacements)


def test_no_hang_when_a_rank_is_short():
    (c0, n0), (c1, n1) = run_distributed(_short_reservoir, 2, timeout=90)
    assert torch.equal(c0, c1)
    assert n0 == n1 == 1  # skipped at steps 2 and 4, ran at step 6 (70 samples)


def _entropy_grad(rank, world, x):
    torch.manual_seed(0)
    vq = VectorQuantizer(
        4, 8, regularizers=[EntropyPenalty(weight=1.0)], commitment_weight=0, codebook_weight=0
    ).train()
    half = x.shape[0] // 2
    out = vq(x[:half] if rank == 0 else x[half:])
    out.loss.backward()
    grad = vq.codebook.grad.clone()
    torch.distributed.all_reduce(grad)
    return out.loss.detach(), grad / world  # what DDP's gradient averaging produces


def test_entropy_penalty_uses_global_batch_average():
    x = _data(0, 0, n=32)
    (l0, g0), (l1, g1) = run_distributed(_entropy_grad, 2, x)
    torch.manual_seed(0)
    single = VectorQuantizer(
        4, 8, regularizers=[EntropyPenalty(weight=1.0)], commitment_weight=0, codebook_weight=0
    ).train()
    out = single(x)
    out.loss.backward()
    # loss_r = mean per-token entropy of rank r's half - H(global average): the mean over ranks
    # equals the single-process loss, and the DDP-averaged gradient equals its gradient.
    torch.testing.assert_close((l0 + l1) / 2, out.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g0, single.codebook.grad, rtol=1e-4, atol=1e-6)

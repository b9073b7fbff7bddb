"""The sparse-voxel drop-in: seed-style config mapping, tensor and duck-typed sparse-tensor
inputs, per-sample usage figures against a plain loop, the maintenance it runs, and 2-process
DDP with a different number of tokens on each process (none at all on one, at some steps)."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.dist_utils import run_distributed
from vqkit import DeadCodeRestart, EMAUpdate, KMeansInit, KMeansReestimate
from vqkit.configurable import build, to_config
from vqkit.integrations import SparseVectorQuantizer, sample_usage

SEED_ARGS = {
    "num_embeddings": 64,
    "embedding_dim": 8,
    "beta": 0.25,
    "use_ema_update": False,
    "decay": 0.99,
    "use_kmeans_reinit": True,
    "kmeans_interval": 2000,
    "reservoir_size": 256,
}


def _reference(indices: torch.Tensor, batch_index: torch.Tensor, batch_size: int):
    """Per-sample figures by a Python loop over samples: (tokens, used, perplexity, ratio)."""
    rows = []
    for s in range(batch_size):
        codes = indices[batch_index == s].tolist()
        n = len(codes)
        if n == 0:
            rows.append((0, 0, 0.0, 0.0))
            continue
        c = Counter(codes)
        h = -sum(v / n * math.log(v / n) for v in c.values())
        rows.append((n, len(c), math.exp(h), len(c) / n))
    return rows


def _assert_matches_reference(per_sample, indices, batch_index, batch_size):
    ref = _reference(indices, batch_index, batch_size)
    assert per_sample.tokens.tolist() == [r[0] for r in ref]
    assert per_sample.used_codes.tolist() == [r[1] for r in ref]
    expect_ppl = torch.tensor([r[2] for r in ref], dtype=torch.float32)
    expect_ratio = torch.tensor([r[3] for r in ref], dtype=torch.float32)
    torch.testing.assert_close(per_sample.perplexity, expect_ppl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_sample.used_per_token, expect_ratio, rtol=1e-6, atol=1e-7)


def _clustered(n: int, seed: int, d: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(12, d, generator=torch.Generator().manual_seed(7)) * 3
    return centers[torch.randint(12, (n,), generator=g)] + 0.1 * torch.randn(n, d, generator=g)


class FakeSparseTensor:
    """The duck-typed convention: ``.feats``, ``.coords`` (batch in column 0), ``.replace``."""

    def __init__(self, feats: torch.Tensor, coords: torch.Tensor) -> None:
        self.feats = feats
        self.coords = coords

    def replace(self, feats: torch.Tensor, coords: torch.Tensor | None = None):
        return FakeSparseTensor(feats, self.coords if coords is None else coords)


# ----------------------------------------------------------------------------- per-sample figures
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 300),
    batch_size=st.integers(1, 9),
    k=st.integers(2, 40),
    seed=st.integers(0, 2**16),
)
def test_per_sample_figures_equal_a_loop(n, batch_size, k, seed):
    g = torch.Generator().manual_seed(seed)
    # skewed sample sizes, so some samples are empty and some dominate
    weights = torch.rand(batch_size, generator=g) ** 3
    cdf = torch.cumsum(weights + 1e-3, 0)
    batch_index = torch.searchsorted(cdf / cdf[-1], torch.rand(n, generator=g))
    batch_index = batch_index.clamp_max(batch_size - 1)
    indices = (
        torch.randint(k, (n,), generator=g) if seed % 2 else torch.randint(2, (n,), generator=g) % k
    )
    per_sample = sample_usage(indices, batch_index.to(torch.int32), k, batch_size)
    _assert_matches_reference(per_sample, indices, batch_index, batch_size)


def test_batch_size_defaults_to_the_largest_index():
    indices = torch.tensor([3, 3, 1, 0])
    assert sample_usage(indices, torch.tensor([0, 0, 2, 2]), 4).tokens.tolist() == [2, 0, 2]
    empty = sample_usage(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 4)
    assert empty.tokens.numel() == empty.perplexity.numel() == 0


@pytest.mark.parametrize(
    "batch_index, batch_size, error, match",
    [
        (torch.tensor([0, -1, 0, 0]), None, ValueError, "must be >= 0, got -1"),
        (torch.tensor([0, 1, 2, 3]), 3, ValueError, "batch_size must be > 3, got 3"),
        (torch.tensor([0.0, 1.0, 0.0, 0.0]), None, TypeError, "integer tensor"),
        (torch.tensor([0, 1, 0]), None, ValueError, r"must be \(4,\)"),
    ],
)
def test_bad_batch_index_fails_before_the_quantizer_runs(batch_index, batch_size, error, match):
    sq = SparseVectorQuantizer(8, 4, kmeans_init=False).train()
    with pytest.raises(error, match=match):
        sq(torch.randn(4, 4), batch_index, batch_size=batch_size)
    assert sq.quantizer.current_step == 0  # nothing counted, nothing updated


# ----------------------------------------------------------------------------- inputs and outputs
def test_tensor_input_with_batch_index():
    torch.manual_seed(0)
    sq = SparseVectorQuantizer(16, 4).train()
    batch_index = torch.repeat_interleave(torch.arange(4), torch.tensor([30, 0, 50, 20]))
    out = sq(_clustered(100, 1), batch_index)
    assert out.quantized.shape == (100, 4) and out.indices.shape == (100,)
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    assert set(out.losses) == {"commitment", "codebook"}
    _assert_matches_reference(out.per_sample, out.indices, batch_index, 4)
    assert int(out.batch.tokens) == 100
    assert int(out.batch.used_codes) == out.indices.unique().numel()
    assert float(out.batch.utilization) == int(out.batch.used_codes) / 16
    logged = out.as_dict()
    assert logged["sample_count"] == 3.0  # the empty sample is left out of the means
    assert logged["batch_used_codes"] == float(out.batch.used_codes)


def test_tensor_without_batch_index_is_one_sample():
    sq = SparseVectorQuantizer(8, 4, kmeans_init=False).eval()
    out = sq(torch.randn(25, 4))
    assert out.per_sample.tokens.tolist() == [25]
    assert out.per_sample.used_codes.tolist() == [out.indices.unique().numel()]


def test_sparse_tensor_round_trip():
    torch.manual_seed(0)
    sq = SparseVectorQuantizer(16, 4, use_ema_update=True).train()
    coords = torch.cat(
        [
            torch.tensor([0] * 40 + [2] * 60, dtype=torch.int32)[:, None],
            torch.randint(64, (100, 3)),
        ],
        dim=1,
    ).to(torch.int32)
    feats = _clustered(100, 2).requires_grad_()
    x = FakeSparseTensor(feats, coords)
    out = sq(x)
    assert isinstance(out.quantized, FakeSparseTensor)
    assert out.quantized.coords is coords
    torch.testing.assert_close(out.quantized.feats, sq.quantizer.decode(out.indices))
    out.quantized.feats.sum().backward()  # straight-through: the gradient reaches the input
    assert torch.equal(feats.grad, torch.ones_like(feats))
    assert out.per_sample.tokens.tolist() == [40, 0, 60]
    _assert_matches_reference(out.per_sample, out.indices, coords[:, 0].long(), 3)
    # an explicit batch index wins over the coordinates
    sq.eval()
    again = sq(x, torch.zeros(100, dtype=torch.long))
    assert again.per_sample.tokens.tolist() == [100]
    assert int(again.batch.tokens) == 100


def test_an_object_without_the_sparse_tensor_members_is_refused():
    class NoReplace:
        feats = torch.randn(3, 4)
        coords = torch.zeros(3, 4, dtype=torch.int32)

    with pytest.raises(TypeError, match=r"lacks \['replace'\]"):
        SparseVectorQuantizer(8, 4)(NoReplace())


def test_current_step_is_ignored_with_one_note(caplog):
    sq = SparseVectorQuantizer(8, 4, kmeans_init=False).train()
    x = torch.randn(20, 4)
    with caplog.at_level(logging.INFO, logger="vqkit"):
        for step in (100, 101, 102):
            sq(x, current_step=step)
    notes = [r for r in caplog.records if "current_step" in r.getMessage()]
    assert len(notes) == 1 and notes[0].name == "vqkit.integrations.sparse"
    assert sq.quantizer.current_step == 3  # its own count, not the trainer's 102


# ----------------------------------------------------------------------------- config mapping
def _kinds(sq: SparseVectorQuantizer) -> list[type]:
    return [type(m) for m in sq.quantizer.maintenance]


def test_seed_config_maps_onto_vqkit_strategies():
    config = json.loads(
        json.dumps({"models": {"vqvae": {"name": "SparseSDFVQVAE", "args": SEED_ARGS}}})
    )
    sq = SparseVectorQuantizer.from_config(config["models"]["vqvae"]["args"])
    q = sq.quantizer
    assert (q.codebook_size, q.dim, q.commitment_weight) == (64, 8, 0.25)
    assert q.ema is None and isinstance(q.codebook, nn.Parameter)  # gradient mode
    assert _kinds(sq) == [KMeansInit, KMeansReestimate, DeadCodeRestart]
    re = q.maintenance[1]
    assert (re.every, re.reservoir_size, re.mode) == (2000, 256, "full")
    assert re.until is None  # re-estimates for the whole run, as the original does
    assert len(q.reservoirs) == 1  # k-means init and re-estimation share one reservoir
    restart = q.maintenance[2]
    assert (restart.threshold, restart.relative, restart.floor) == (0.25, True, 0.0)


def test_dead_code_floor_reaches_the_restart():
    sq = SparseVectorQuantizer.from_config({**SEED_ARGS, "dead_code_floor": 0.0625})
    restart = sq.quantizer.maintenance[2]
    assert (restart.threshold, restart.floor) == (0.25, 0.0625)
    assert "and 0.0625 tokens per step" in " ".join(sq.quantizer.describe_schedule())
    assert to_config(sq)["init_args"]["dead_code_floor"] == 0.0625
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match=r"dead_code_floor must be >= 0 \(tokens per step\)"):
            SparseVectorQuantizer.from_config({**SEED_ARGS, "dead_code_floor": bad})
    with pytest.raises(ValueError, match="dead_code_threshold=0 turns off"):
        SparseVectorQuantizer.from_config(
            {**SEED_ARGS, "dead_code_threshold": 0, "dead_code_floor": 0.0625}
        )


def test_ema_mode_and_no_reestimation():
    sq = SparseVectorQuantizer.from_config(
        {**SEED_ARGS, "use_ema_update": True, "decay": 0.9, "use_kmeans_reinit": False}
    )
    q = sq.quantizer
    assert isinstance(q.ema, EMAUpdate) and q.ema.decay == 0.9
    assert "codebook" not in dict(q.named_parameters())  # EMA codes are not parameters
    assert _kinds(sq) == [KMeansInit, DeadCodeRestart]
    bare = SparseVectorQuantizer.from_config(
        {**SEED_ARGS, "use_kmeans_reinit": False, "kmeans_init": False, "dead_code_threshold": 0}
    )
    assert _kinds(bare) == []
    dead = SparseVectorQuantizer.from_config({**SEED_ARGS, "kmeans_mode": "dead"})
    assert dead.quantizer.maintenance[1].mode == "dead"


def test_config_errors_name_the_key(caplog):
    model_args = {**SEED_ARGS, "resolution": 64, "model_channels": 32}
    with pytest.raises(ValueError, match=r"unknown SparseVectorQuantizer config keys \['model_"):
        SparseVectorQuantizer.from_config(model_args)
    with caplog.at_level(logging.WARNING, logger="vqkit"):
        sq = SparseVectorQuantizer.from_config(model_args, strict=False)
    assert sq.num_embeddings == 64
    assert "['model_channels', 'resolution']" in caplog.text
    with pytest.raises(ValueError, match=r"lacks the required keys \['embedding_dim'\]"):
        SparseVectorQuantizer.from_config({"num_embeddings": 64})
    with pytest.raises(ValueError, match=r"reservoir_size \(32\) must be >= num_embeddings \(64"):
        SparseVectorQuantizer.from_config({**SEED_ARGS, "reservoir_size": 32})
    with pytest.raises(TypeError, match="use_ema_update must be true or false, got 'true'"):
        SparseVectorQuantizer.from_config({**SEED_ARGS, "use_ema_update": "true"})


def test_rebuilt_from_its_record_and_resumed_from_its_state():
    sq = SparseVectorQuantizer.from_config({**SEED_ARGS, "kmeans_interval": 3}).train()
    for step in range(4):
        sq(_clustered(300, step, d=8))
    twin = build(to_config(sq))
    assert twin.quantizer.maintenance[1].every == 3
    twin.load_state_dict(sq.state_dict())
    assert twin.quantizer.current_step == 4  # the schedule goes on where it was
    assert torch.equal(twin.quantizer.codebook, sq.quantizer.codebook)
    with pytest.raises(ValueError, match="kmeans_mode must be 'full' or 'dead', got 'all'"):
        SparseVectorQuantizer(8, 4, kmeans_mode="all")


# ----------------------------------------------------------------------------- training
def test_training_runs_kmeans_init_and_reestimation():
    torch.manual_seed(0)
    sq = SparseVectorQuantizer(
        16, 4, use_ema_update=True, decay=0.9, use_kmeans_reinit=True,
        kmeans_interval=3, reservoir_size=64,
    ).train()  # fmt: skip
    batch_index = torch.repeat_interleave(torch.arange(3), torch.tensor([20, 30, 10]))
    for step in range(7):
        out = sq(_clustered(60, step), batch_index, current_step=step)
    events = [(e.step, e.strategy, e.status) for e in sq.quantizer.pop_events()]
    done = [e for e in events if e[2] == "done" and e[1] != "dead-code restart"]
    assert done == [
        (0, "k-means init", "done"),
        (3, "k-means re-estimation", "done"),
        (6, "k-means re-estimation", "done"),
    ]
    # the EMA statistics were reset with the codes: code == sum / smoothed size
    ema = sq.quantizer.ema
    n = ema.cluster_size.sum()
    size = (ema.cluster_size + ema.eps) / (n + 16 * ema.eps) * n
    torch.testing.assert_close(ema.embed_sum / size[:, None], sq.quantizer.codebook)
    # k-means on 12 tight clusters: every cluster has its code, every voxel is near it
    assert int(out.batch.used_codes) >= 12
    assert float(out.losses["commitment"]) < 0.25 * 0.05


# ----------------------------------------------------------------------------- distributed
class _TinyModel(nn.Module):
    def __init__(self, sq: SparseVectorQuantizer) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.sq = sq

    def forward(self, feats, batch_index, batch_size=None):
        return self.sq(self.encoder(feats), batch_index, batch_size=batch_size)


def _lengths(rank: int, step: int) -> list[int]:
    if rank == 1 and step == 4:
        return [0, 0]  # two samples, no active voxel at all on this process
    if rank == 1 and step == 5:
        return []  # no sample and no voxel, batch size inferred (0)
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randint(0 if rank == 0 else 5, 40, (3 if rank == 0 else 2,), generator=g).tolist()


def _uneven_ranks(rank, world):
    from torch.nn.parallel import DistributedDataParallel

    results = {}
    for mode in ("ema", "gradient"):
        torch.manual_seed(rank)  # different initial codebooks: k-means init makes them equal
        sq = SparseVectorQuantizer(
            16, 4, use_ema_update=mode == "ema", decay=0.9, use_kmeans_reinit=True,
            kmeans_interval=3, reservoir_size=64,
        )  # fmt: skip
        # buffers are not broadcast, so equal codebooks come from vqkit's own collectives
        model = DistributedDataParallel(_TinyModel(sq).train(), broadcast_buffers=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        steps = []
        for step in range(8):
            lengths = _lengths(rank, step)
            batch_index = torch.repeat_interleave(
                torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long)
            )
            feats = _clustered(batch_index.numel(), 1000 * step + rank)
            out = model(feats, batch_index, batch_size=len(lengths) if lengths else None)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            steps.append(
                {
                    "codebook": sq.quantizer.codebook.detach().clone(),
                    "batch_index": batch_index,
                    "indices": out.indices,
                    "per_sample": out.per_sample,
                    "batch": out.batch,
                }
            )
        events = [(e.step, e.strategy) for e in sq.quantizer.pop_events() if e.status == "done"]
        state = {k: v.clone() for k, v in sq.state_dict().items()}
        results[mode] = {"steps": steps, "events": events, "state": state}
    return results


@pytest.mark.distributed
def test_ddp_with_uneven_and_empty_ranks():
    r0, r1 = run_distributed(_uneven_ranks, 2, timeout=120)
    for mode in ("ema", "gradient"):
        a, b = r0[mode], r1[mode]
        for ev in (a["events"], b["events"]):
            assert (0, "k-means init") in ev
            assert (3, "k-means re-estimation") in ev and (6, "k-means re-estimation") in ev
        assert a["events"] == b["events"]
        for step, (sa, sb) in enumerate(zip(a["steps"], b["steps"], strict=True)):
            where = f"{mode}, step {step}"
            assert torch.equal(sa["codebook"], sb["codebook"]), where
            # whole-batch figures count both processes' voxels, and agree
            both = torch.cat([sa["indices"], sb["indices"]])
            for s in (sa, sb):
                assert int(s["batch"].tokens) == both.numel(), where
                assert int(s["batch"].used_codes) == both.unique().numel(), where
            # per-sample figures are each process's own samples
            for rank, s in enumerate((sa, sb)):
                lengths = _lengths(rank, step)
                assert s["per_sample"].tokens.tolist() == lengths, where
                _assert_matches_reference(
                    s["per_sample"], s["indices"], s["batch_index"], len(lengths)
                )
        for k in a["state"]:
            assert torch.equal(a["state"][k], b["state"][k]), f"{mode}: {k}"

"""ReservoirSampler: exact Algorithm R semantics, uniformity, resumption, storage options."""

import copy
import io
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2_contingency, chisquare
from torch import nn

from vqkit.quantize.reservoir import ReservoirSampler


def _stream(n: int, dim: int = 3, start: int = 0) -> torch.Tensor:
    """Rows whose first column is the item id (exact in fp32 and fp16 up to 2048)."""
    ids = torch.arange(start, start + n, dtype=torch.float32)
    return torch.stack([ids, -ids, *[ids * 0 + k for k in range(dim - 2)]], 1)


def _batches(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    assert sum(sizes) == x.shape[0]
    return list(torch.split(x, sizes))


def _ids(r: ReservoirSampler) -> torch.Tensor:
    return r.contents()[:, 0].long()


class SequentialReference:
    """Textbook one-item-at-a-time Algorithm R fed the same per-batch draws as the sampler."""

    def __init__(self, size: int, dim: int, seed: int) -> None:
        self.size, self.seen = size, 0
        self.buffer = torch.zeros(size, dim)
        self.gen = torch.Generator().manual_seed(seed)
        self.collisions = 0

    def add(self, x: torch.Tensor) -> None:
        n_rest = x.shape[0] - min(max(self.size - self.seen, 0), x.shape[0])
        u = torch.rand(n_rest, dtype=torch.float64, generator=self.gen).tolist()
        written: set[int] = set()
        for row in x:
            i = self.seen
            slot = i if i < self.size else int(u.pop(0) * (i + 1))
            if slot < self.size:
                self.collisions += slot in written
                written.add(slot)
                self.buffer[slot] = row
            self.seen += 1
        assert not u

    def contents(self) -> torch.Tensor:
        return self.buffer[: min(self.seen, self.size)]


def test_fill_phase_keeps_items_in_order():
    r = ReservoirSampler(10, 3)
    x = _stream(12)
    r.add(x[:3])
    r.add(x[3:3])  # empty batch: no-op
    r.add(x[3:7])
    assert r.seen == 7 and r.filled == 7
    assert torch.equal(r.contents(), x[:7])
    r.add(x[7:12])  # crosses the fill boundary inside the batch
    assert r.seen == 12 and r.filled == 10
    # Items 10 and 11 may replace slots, but the untouched slots still hold the fill order.
    kept = _ids(r) == torch.arange(10)
    assert kept.sum() >= 8
    assert torch.equal(r.contents()[kept], x[:10][kept])


@pytest.mark.parametrize(
    ("size", "sizes"),
    [
        (8, [3, 0, 50, 1, 1, 64, 7, 200, 0, 13]),  # batches >> size: many in-batch collisions
        (20, [5, 30, 17, 17, 17, 100, 2, 300]),
        (1, [1, 5, 9]),
    ],
)
def test_matches_sequential_reference_including_collisions(size, sizes):
    x = _stream(sum(sizes))
    r = ReservoirSampler(size, 3, seed=7)
    ref = SequentialReference(size, 3, seed=7)
    for b in _batches(x, sizes):
        r.add(b)
        ref.add(b)
        assert torch.equal(r.contents(), ref.contents())
        assert r.seen == ref.seen
    assert ref.collisions > 0  # the last-wins rule was actually exercised


def test_single_replacement_can_overwrite_a_slot_filled_in_the_same_batch():
    # Batch [7, 8] into size 8 from seen=7: item 7 fills slot 7, item 8 may then pick slot 7.
    x = _stream(9)
    collided = 0
    for seed in range(60):
        r, ref = ReservoirSampler(8, 3, seed=seed), SequentialReference(8, 3, seed=seed)
        for b in _batches(x, [7, 2]):
            r.add(b)
            ref.add(b)
        assert torch.equal(r.contents(), ref.contents()), seed
        collided += ref.collisions
        # CPU index_copy_ happens to let a duplicate index's last row win, CUDA's does not:
        # the chosen slots themselves must be distinct.
        probe = ReservoirSampler(8, 3, seed=seed)
        probe.add(x[:7])
        _, slots = probe._choose(2)
        assert len(set(slots.tolist())) == len(slots), seed
    assert collided > 0


def _inclusion_counts(sizes: list[int], runs: int, size: int, seed0: int = 0) -> torch.Tensor:
    total = sum(sizes)
    x = _stream(total)
    batches = _batches(x, sizes)
    counts = torch.zeros(total, dtype=torch.long)
    for run in range(runs):
        r = ReservoirSampler(size, 3, seed=seed0 + run)
        for b in batches:
            r.add(b)
        ids = _ids(r)
        assert ids.unique().numel() == size  # sampling without replacement
        counts[ids] += 1
    return counts


def _assert_uniform(counts: torch.Tensor, runs: int, size: int) -> None:
    total = counts.numel()
    expected = torch.full((total,), runs * size / total, dtype=torch.float64)
    p = chisquare(counts.double().numpy(), expected.numpy()).pvalue
    assert p > 1e-3, f"inclusion counts not uniform (p={p:.2e}): {counts.tolist()}"


RUNS = 1000


def test_inclusion_frequencies_uniform():
    sizes = [17] * 11 + [13]  # 200 items in batches of 17
    counts = _inclusion_counts(sizes, RUNS, 20)
    _assert_uniform(counts, RUNS, 20)


def test_batch_size_invariance_in_distribution():
    by17 = _inclusion_counts([17] * 11 + [13], RUNS, 20)
    g = torch.Generator().manual_seed(3)
    ragged: list[int] = []
    while sum(ragged) < 200:
        ragged.append(min(int(torch.randint(0, 60, (1,), generator=g)), 200 - sum(ragged)))
    # Other seeds too, so the two samples are independent.
    other = _inclusion_counts(ragged, RUNS, 20, seed0=10**6)
    one_batch = _inclusion_counts([200], RUNS, 20, seed0=2 * 10**6)
    _assert_uniform(other, RUNS, 20)
    _assert_uniform(one_batch, RUNS, 20)
    p = chi2_contingency(torch.stack([by17, other, one_batch]).numpy()).pvalue
    assert p > 1e-3, f"inclusion distributions differ across batchings (p={p:.2e})"


def _feed(r: ReservoirSampler, x: torch.Tensor, sizes: list[int]) -> None:
    for b in _batches(x, sizes):
        r.add(b)


def test_state_dict_resume_is_bitwise_identical():
    sizes = [40, 3, 0, 77, 25, 60, 1, 90, 64, 33, 120]
    x = torch.randn(sum(sizes), 5)
    full = ReservoirSampler(64, 5, seed=11)
    _feed(full, x, sizes)

    head = ReservoirSampler(64, 5, seed=11)
    cut = sum(sizes[:5])
    _feed(head, x[:cut], sizes[:5])
    blob = io.BytesIO()
    torch.save(head.state_dict(), blob)
    blob.seek(0)
    # A sampler with another seed that has already drawn numbers: loading must overwrite both.
    resumed = ReservoirSampler(64, 5, seed=999)
    _feed(resumed, torch.randn(100, 5), [100])
    resumed.load_state_dict(torch.load(blob))
    assert resumed.seen == cut
    _feed(resumed, x[cut:], sizes[5:])

    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert torch.equal(resumed.contents(), full.contents())


def test_state_dict_holds_seen_and_rng_state():
    r = ReservoirSampler(4, 2, seed=5)
    r.add(torch.randn(9, 2))
    sd = r.state_dict()
    assert list(sd) == ["buffer", "seen", "rng_state"]
    assert sd["seen"].dtype == torch.long and int(sd["seen"]) == 9 == r.seen
    assert sd["rng_state"].dtype == torch.uint8
    assert torch.equal(sd["rng_state"], r._gen.get_state())


def test_empty_add_changes_nothing():
    r = ReservoirSampler(4, 2, seed=5)
    r.add(torch.randn(9, 2))
    before = copy.deepcopy(r.state_dict())
    r.add(torch.empty(0, 2))
    for k, v in r.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_reset_empties_and_keeps_rng_going():
    x = _stream(60)
    r = ReservoirSampler(8, 3, seed=2)
    r.add(x[:30])
    rng_after_first = r.rng_state.clone()
    r.reset()
    assert r.seen == 0 and r.filled == 0 and r.contents().shape == (0, 3)
    assert torch.equal(r.rng_state, rng_after_first)
    r.add(x[30:])
    assert r.seen == 30 and r.filled == 8
    assert (_ids(r) >= 30).all()
    fresh = ReservoirSampler(8, 3, seed=2)
    fresh.add(x[30:])
    assert not torch.equal(r.contents(), fresh.contents())  # different draws after the reset


def test_deepcopy_continues_identically():
    x = torch.randn(300, 4)
    r = ReservoirSampler(16, 4, seed=1)
    r.add(x[:100])
    c = copy.deepcopy(r)
    r.add(x[100:])
    c.add(x[100:])
    assert torch.equal(r.contents(), c.contents())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_storage(dtype):
    x = _stream(50)
    r = ReservoirSampler(32, 3, dtype=dtype)
    assert r.memory_bytes() == 32 * 3 * 2
    r.add(x.double())  # any input dtype is cast to the storage dtype
    assert r.contents().dtype == dtype and r.buffer.dtype == dtype
    ids = _ids(r)
    assert torch.equal(r.contents(), x[ids].to(dtype))
    assert ReservoirSampler(32, 3).memory_bytes() == 32 * 3 * 4


def test_same_choices_whatever_the_storage_dtype():
    x = _stream(500)
    a, b = ReservoirSampler(20, 3, seed=4), ReservoirSampler(20, 3, seed=4, dtype=torch.float16)
    _feed(a, x, [100] * 5)
    _feed(b, x, [100] * 5)
    assert torch.equal(a.contents().half(), b.contents())


def test_no_autograd_graph_is_kept():
    x = torch.randn(10, 3, requires_grad=True)
    r = ReservoirSampler(4, 3)
    r.add(x * 2)
    assert not r.contents().requires_grad and r.contents().grad_fn is None


class _Parent(nn.Module):
    def __init__(self, device: str | None) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.res = ReservoirSampler(8, 3, device=device)


def test_pinned_cpu_storage_ignores_module_moves():
    m = _Parent("cpu")
    m.res.add(_stream(5))
    order = list(m.state_dict())
    m.to("cpu")
    assert m.res.buffer.device.type == "cpu"
    m.to("meta")
    assert m.lin.weight.device.type == "meta"
    for name in ("buffer", "seen", "rng_state"):
        assert m.res._buffers[name].device.type == "cpu", name
    m.half()
    assert m.res.buffer.dtype == torch.float32  # dtype is fixed too
    assert list(m.state_dict()) == order  # buffer order (state-dict keys) preserved
    m.res.add(_stream(2, start=5))  # still usable
    assert m.res.seen == 7 and torch.equal(m.res.contents(), _stream(7))
    assert "pinned to cpu" in repr(m.res)


def test_unpinned_storage_follows_module():
    m = _Parent(None)
    m.to("meta")
    for name in ("buffer", "seen", "rng_state"):
        assert m.res._buffers[name].device.type == "meta", name
    m2 = _Parent(None).half()
    assert m2.res.buffer.dtype == torch.float16
    assert m2.res.rng_state.dtype == torch.uint8 and m2.res._buffers["seen"].dtype == torch.long


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("device", [None, "cpu"])
def test_cuda_inputs_match_cpu(device):
    sizes = [100, 7, 300, 0, 64]
    x = torch.randn(sum(sizes), 4)
    cpu = ReservoirSampler(32, 4, seed=3)
    _feed(cpu, x, sizes)
    m = nn.Module()
    m.res = ReservoirSampler(32, 4, seed=3, device=device)
    m.cuda()
    assert m.res.buffer.device.type == ("cpu" if device == "cpu" else "cuda")
    _feed(m.res, x.cuda(), sizes)
    assert m.res.seen == cpu.seen
    assert torch.equal(m.res.contents().cpu(), cpu.contents())
    assert torch.equal(m.res.rng_state.cpu(), cpu.rng_state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 0, "dim": 3}, r"size must be an int >= 1, got 0"),
        ({"size": 4, "dim": 0}, r"dim must be an int >= 1, got 0"),
        ({"size": 4, "dim": 3, "dtype": torch.float64}, r"dtype must be one of .*float64"),
        ({"size": 4, "dim": 3, "dtype": torch.int64}, r"dtype must be one of"),
    ],
)
def test_bad_construction(kwargs, match):
    size, dim = kwargs.pop("size"), kwargs.pop("dim")
    with pytest.raises(ValueError, match=match):
        ReservoirSampler(size, dim, **kwargs)


@pytest.mark.parametrize("shape", [(5,), (5, 4), (5, 3, 1), ()])
def test_bad_add_shape(shape):
    r = ReservoirSampler(4, 3)
    with pytest.raises(ValueError, match=re.escape(f"shape (n, 3), got {tuple(shape)}")):
        r.add(torch.zeros(shape))
    assert r.seen == 0


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 30),
    sizes=st.lists(st.integers(0, 45), min_size=1, max_size=12),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_contents_are_distinct_seen_items(size, sizes, seed):
    x = _stream(sum(sizes))
    r = ReservoirSampler(size, 3, seed=seed)
    seen = 0
    for b in _batches(x, sizes):
        if len(b):
            items, slots = copy.deepcopy(r)._choose(len(b))
            assert len(set(slots.tolist())) == len(slots)  # scatter targets never repeat
            assert (items[1:] > items[:-1]).all() and ((items >= 0) & (items < len(b))).all()
            assert ((slots >= 0) & (slots < size)).all()
        r.add(b)
        seen += b.shape[0]
        assert r.seen == seen and r.filled == min(seen, size)
        ids = _ids(r)
        assert ids.numel() == r.filled
        assert ids.unique().numel() == ids.numel()  # no item twice
        assert ((ids >= 0) & (ids < seen)).all()
        assert torch.equal(r.contents(), x[ids])  # rows are intact copies of those items

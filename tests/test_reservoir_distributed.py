"""2-process gloo: the replicated reservoir is identical on every rank and equals a single-process
reservoir fed the global stream (each step's per-rank batches concatenated in rank order)."""

import time

import pytest
import torch

from tests.dist_utils import run_distributed
from vqkit.quantize import distributed as D
from vqkit.quantize.reservoir import ReservoirSampler

pytestmark = pytest.mark.distributed

SIZE, DIM = 64, 5
# (rank 0 rows, rank 1 rows) per step: ranks differ, either may pass 0 (and both once), the
# fill boundary falls inside a step, and late steps collide inside a batch.
SCHEDULE = [
    (10, 3),
    (0, 20),
    (25, 0),
    (0, 0),
    (7, 30),
    (40, 1),
    (0, 90),
    (120, 200),
    (64, 64),
    (3, 0),
    (300, 150),
    (0, 500),
]


def _step_data(step: int, n0: int, n1: int) -> torch.Tensor:
    return torch.randn(n0 + n1, DIM, generator=torch.Generator().manual_seed(100 + step))


def _replicated(rank: int, world: int, seed: int) -> dict:
    assert world == 2 and D.is_distributed()
    gathered: list[int] = []
    real = D.all_gather_variable

    def counting(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        out = real(t, sizes)
        gathered.append(out.shape[0])
        return out

    D.all_gather_variable = counting  # the sampler looks it up at call time
    fp32 = ReservoirSampler(SIZE, DIM, seed=seed)
    fp16 = ReservoirSampler(SIZE, DIM, seed=seed, dtype=torch.float16, device="cpu")
    history = []
    for step, (n0, n1) in enumerate(SCHEDULE):
        x = _step_data(step, n0, n1)
        mine = x[:n0] if rank == 0 else x[n0:]
        fp32.add(mine)
        fp16.add(mine.double())
        history.append(fp32.contents().clone())
    return {
        "fp32": {k: v.clone() for k, v in fp32.state_dict().items()},
        "fp16": {k: v.clone() for k, v in fp16.state_dict().items()},
        "history": history,
        "gathered": gathered,
    }


def _single(seed: int, dtype: torch.dtype) -> tuple[ReservoirSampler, list[torch.Tensor]]:
    r = ReservoirSampler(SIZE, DIM, seed=seed, dtype=dtype)
    history = []
    for step, (n0, n1) in enumerate(SCHEDULE):
        r.add(_step_data(step, n0, n1))
        history.append(r.contents().clone())
    return r, history


def test_replicated_reservoir_equals_single_process_global_stream():
    r0, r1 = run_distributed(_replicated, 2, 3)
    for kind in ("fp32", "fp16"):
        for k in r0[kind]:
            assert torch.equal(r0[kind][k], r1[kind][k]), (kind, k)
    for a, b in zip(r0["history"], r1["history"], strict=True):
        assert torch.equal(a, b)

    single, history = _single(3, torch.float32)
    for k, v in single.state_dict().items():
        assert torch.equal(r0["fp32"][k], v), k
    for step, (a, b) in enumerate(zip(r0["history"], history, strict=True)):
        assert torch.equal(a, b), f"step {step}"
    single16, _ = _single(3, torch.float16)
    for k, v in single16.state_dict().items():
        assert torch.equal(r0["fp16"][k], v), k
    assert single.seen == sum(n0 + n1 for n0, n1 in SCHEDULE)

    # Once the reservoir is full only the accepted rows travel: the last step offers 500 rows
    # at stream position ~1200, of which ~64 * ln(1.4) ~ 22 are expected to be accepted.
    assert r0["gathered"] == r1["gathered"]
    assert r0["gathered"][-1] < 60


# The helper itself: failures and hangs must surface as errors, not block the suite.


def _raises_on_rank1(rank: int, world: int) -> int:
    if rank == 1:
        raise KeyError("boom on rank 1")
    return rank


def _rank1_waits_for_rank0(rank: int, world: int) -> None:
    if rank == 0:
        time.sleep(600)  # stuck outside the collective that rank 1 waits in
    D.all_reduce_sum_(torch.ones(1))


def test_run_distributed_reports_child_traceback():
    with pytest.raises(Exception, match=r"(?s)rank 1 of 2 failed.*KeyError: 'boom on rank 1'"):
        run_distributed(_raises_on_rank1, 2)


def test_run_distributed_turns_a_hang_into_an_error():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2 did not finish within 6 s"):
        run_distributed(_rank1_waits_for_rank0, 2, timeout=6)
    assert time.monotonic() - t0 < 30

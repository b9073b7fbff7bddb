"""Run a function in several local processes joined by a gloo process group, for tests.

    from tests.dist_utils import run_distributed

    def _body(rank, world_size, data):      # module level, so spawn can pickle it by name
        ...                                 # torch.distributed is initialized here
        return some_tensors                 # anything torch.save can write

    r0, r1 = run_distributed(_body, 2, data)

The processes are started with the ``spawn`` method (fresh interpreters: no state inherited
from the test process), meet on a free TCP port of 127.0.0.1, and use the gloo backend, so this
works on a CPU-only machine. Return values come back through ``torch.save`` files in a
temporary directory rather than a queue: tensors then survive their process exiting. If any
rank raises, the others are terminated at once and ``DistributedTestError`` carries the failing
rank's traceback; if the ranks do not all finish within ``timeout`` seconds (a collective that
one rank never joins, say), they are killed and ``TimeoutError`` is raised, so a hang fails the
test instead of blocking the suite.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class DistributedTestError(RuntimeError):
    """A rank of ``run_distributed`` failed; the message holds its traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    args: tuple,
    out_dir: str,
    timeout: float,
    threads: int,
) -> None:
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        # The ranks share the machine's cores; one intra-op thread each avoids oversubscription.
        torch.set_num_threads(threads)
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        payload = {"ok": True, "result": result}
    except BaseException:  # noqa: BLE001 - anything, even SystemExit, must reach the parent
        payload = {"ok": False, "traceback": traceback.format_exc()}
    tmp = out.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.rename(out)  # atomic: the parent never reads a half-written file


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout: float = 120.0,
    threads: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return the results.

    ``fn`` must be a module-level function and ``args`` picklable. Results are returned in rank
    order. ``timeout`` bounds the whole run (and each collective); ``threads`` is
    ``torch.set_num_threads`` in every rank.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="vqkit-dist-") as out_dir:
        port = free_port()
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, r, world_size, port, args, out_dir, timeout, threads),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        files = [Path(out_dir) / f"rank{r}.pt" for r in range(world_size)]
        deadline = time.monotonic() + timeout
        results: dict[int, Any] = {}
        try:
            while len(results) < world_size:
                for r, (p, f) in enumerate(zip(procs, files, strict=True)):
                    if r in results:
                        continue
                    if f.exists():
                        payload = torch.load(f, weights_only=False)
                        if not payload["ok"]:
                            raise DistributedTestError(
                                f"rank {r} of {world_size} failed:\n{payload['traceback']}"
                            )
                        results[r] = payload["result"]
                    elif not p.is_alive():
                        p.join()
                        if not f.exists():  # it may have written just before exiting
                            raise DistributedTestError(
                                f"rank {r} of {world_size} died with exit code {p.exitcode} "
                                "without reporting (crashed or killed)"
                            )
                if len(results) < world_size:
                    if time.monotonic() > deadline:
                        missing = sorted(set(range(world_size)) - set(results))
                        raise TimeoutError(
                            f"{fn.__name__}: ranks {missing} of {world_size} did not finish "
                            f"within {timeout:g} s (hung in a collective?)"
                        )
                    time.sleep(0.02)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join()
    return [results[r] for r in range(world_size)]

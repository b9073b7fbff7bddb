"""A run killed with SIGKILL at any moment, checkpoint writes included, resumes with
``--ckpt_path last`` and ends bitwise where an uninterrupted run ends."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_training import _config, make_folder, tiny_fit_args

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60
KILLS = 20


class ForkServer:
    """tests/kill_worker.py in a subprocess: each ``start`` forks a `vqkit fit` child."""

    def __init__(self) -> None:
        env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.kill_worker"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def start(self, argv: list[str], log: Path, write_delay: float = 0.0) -> int:
        job = {"argv": argv, "log": str(log), "write_delay": write_delay}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        word, pid = self.proc.stdout.readline().split()
        assert word == "pid"
        return int(pid)

    def wait(self) -> int:
        word, code = self.proc.stdout.readline().split()
        assert word == "exit"
        return int(code)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


STARTED = "codebook schedule"  # the console's first line once `fit` begins


def _wait_for(log: Path, text: str, timeout: float) -> bool:
    """Wait until ``text`` is in the file ``log`` (a child's console), at most ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if log.exists() and text in log.read_text(errors="replace"):
            return True
        time.sleep(0.01)
    return False


def _writing(out: Path, pid: int) -> bool:
    """Whether process ``pid`` is writing a checkpoint under ``out`` (its temporary file)."""
    return any(p.is_file() for p in out.rglob(f".*.tmp-{pid}"))


def _checkpoints(out: Path) -> dict[int, list[Path]]:
    """Every periodic checkpoint under ``out`` by step."""
    found: dict[int, list[Path]] = {}
    for p in out.rglob("periodic-step=*.ckpt"):
        found.setdefault(int(p.stem.split("=")[1]), []).append(p)
    return found


def _resume_step(out: Path) -> int:
    """The step a `--ckpt_path last` run would start from now (0: from scratch): that of the
    newest whole last or periodic checkpoint."""
    from vqkit.training.checkpoint import checkpoint_problem

    whole = [
        p
        for p in out.rglob("*.ckpt")
        if not p.name.startswith("best") and checkpoint_problem(p) is None
    ]
    if not whole:
        return 0
    newest = max(whole, key=lambda p: p.stat().st_mtime_ns)
    return int(torch.load(newest, weights_only=True)["global_step"])


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_ends_bitwise_equal(tmp_path):
    folder = make_folder(tmp_path / "images", n=16)
    config = _config(tmp_path, every=2)  # a periodic checkpoint and last.ckpt every 2 steps

    def argv(out: Path, *extra: str) -> list[str]:
        args = tiny_fit_args(folder, out, STEPS, *extra)
        args[2] = str(config)  # fit --config <tiny quickstart> ...
        return args

    server = ForkServer()
    try:
        ref, ref_log = tmp_path / "uninterrupted", tmp_path / "uninterrupted.log"
        server.start(argv(ref), ref_log)
        assert _wait_for(ref_log, STARTED, 120)
        t_train = time.monotonic()
        assert server.wait() == 0, ref_log.read_text()[-3000:]
        # the kills' times scale with this machine's speed: the uninterrupted run's time from
        # the start of fit to its end (about 5 s on a 2-core AMD EPYC)
        t_train = time.monotonic() - t_train

        out = tmp_path / "killed"
        rng = random.Random(12)
        kills: list[dict] = []
        finished = False
        for attempt in range(4 * KILLS):
            log = tmp_path / f"attempt{attempt:02d}.log"
            start_step = _resume_step(out)
            in_write = len(kills) % 3 == 2  # every third kill aims at a checkpoint write
            pid = server.start(argv(out, "--ckpt_path=last"), log, write_delay=0.15)
            t0 = time.monotonic()
            if in_write:  # inside the k-th write of this run, k random, a random time into it
                skip, seen = rng.randint(0, 3), set()
                while time.monotonic() - t0 < 30:
                    seen |= {p.name for p in out.rglob(f".*.tmp-{pid}")}
                    if len(seen) > skip:
                        break
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.1))
            else:  # a random moment after fit started (restoring, training, validating)
                _wait_for(log, STARTED, 60)
                # scaled by the share of the run still to do, so a machine that got faster
                # since the reference run (load from elsewhere gone) still kills before the end
                left = (STEPS - start_step) / STEPS
                time.sleep(rng.uniform(0.0, 0.5) * t_train * left)
            killed_in_write = _writing(out, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            code = server.wait()
            text = log.read_text()
            assert "Traceback" not in text, text[-3000:]
            if code == -signal.SIGKILL:
                kills.append({"from": start_step, "in_write": killed_in_write})
            else:  # it ended before the kill came: a whole, successful run
                assert code == 0, text[-3000:]
                finished = True
            if finished or len(kills) >= KILLS:
                break
        if not finished:  # the run that finishes, killed by no one
            log = tmp_path / "final.log"
            server.start(argv(out, "--ckpt_path=last"), log)
            assert server.wait() == 0, log.read_text()[-3000:]
    finally:
        server.close()

    summary = {
        "kills": len(kills),
        "in_write": sum(k["in_write"] for k in kills),
        "resumed_from": [k["from"] for k in kills],
    }
    print(json.dumps(summary))
    assert len(kills) >= KILLS, summary
    assert summary["in_write"] >= KILLS // 4, summary
    # kills came at many points of the run, after k-means init (step 4) included
    assert len(set(summary["resumed_from"])) >= 5 and max(summary["resumed_from"]) > 4, summary
    # Every checkpoint the killed chain wrote, the final one included, equals the uninterrupted
    # run's at the same step, bitwise: weights, codebook, EMA statistics, reservoirs, training
    # usage, optimizer. One exception, Lightning's: a checkpoint written at a step where a
    # validation is due is saved before that validation, and a run resumed from it does not
    # repeat it, so the validation usage counts stay those of the validation before until the
    # next one (nothing in training reads them).
    want, got = _checkpoints(ref), _checkpoints(out)
    assert STEPS in got and set(got) <= set(want)
    compared = 0
    for step, paths in sorted(got.items()):
        a = torch.load(want[step][0], weights_only=True)
        for path in paths:
            b = torch.load(path, weights_only=True)
            assert b["global_step"] == step
            assert set(a["state_dict"]) == set(b["state_dict"])
            for k, v in a["state_dict"].items():
                if not k.endswith("usage.eval_counts"):
                    assert torch.equal(v, b["state_dict"][k]), (step, path, k)
            for x, y in zip(
                a["optimizer_states"][0]["state"].values(),
                b["optimizer_states"][0]["state"].values(),
                strict=True,
            ):
                assert all(torch.equal(x[n], y[n]) for n in x), (step, path)
            compared += 1
    assert compared >= STEPS // 2
    assert not list(out.rglob(".*.tmp-*"))  # leftovers of killed writes were cleaned up
    final = torch.load(want[STEPS][0], weights_only=True)["state_dict"]
    assert bool(final["model.quantizer.maintenance.0.done"])
    assert int(final["model.quantizer.num_replacements"]) > 0

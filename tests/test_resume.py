"""Train N steps, save, load in a fresh process, continue: identical to the uninterrupted run."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("resume_worker.py")


def _run(*args):
    subprocess.run([sys.executable, str(WORKER), *map(str, args)], check=True, timeout=300)


@pytest.mark.parametrize("mode", ["ema", "gradient"])
def test_resume_in_fresh_process_is_bitwise_identical(tmp_path, mode):
    n = 11  # the checkpoint falls between re-estimations, mid-way through reservoir filling
    whole, split = tmp_path / "whole.pt", tmp_path / "split.pt"
    _run(mode, "whole", whole, n)
    _run(mode, "first", split, n)
    _run(mode, "second", split, n)
    a = torch.load(whole, weights_only=False)
    b = torch.load(split, weights_only=False)
    assert int(a["model"]["vq.step"]) == 2 * n
    assert int(a["model"]["vq.num_replacements"]) >= 3
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for pid, st in a["opt"]["state"].items():
        for key, v in st.items():
            assert torch.equal(v, b["opt"]["state"][pid][key]), (pid, key)

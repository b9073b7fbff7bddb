"""The GPU-feed arithmetic of ``benchmarks/bench_loader.py``: the step's FLOP count and what a
GPU at a given rate would take from the loader (issue 13, part 2)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_loader import GPU_TFLOPS, gpu_feed, step_flops  # noqa: E402


class _Linear(torch.nn.Module):
    """A model with VQModel's output fields whose FLOPs are known in closed form."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(features, features, bias=False)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(reconstructions=self.proj(x), vq_loss=torch.zeros(()))


@pytest.mark.parametrize("batch", [1, 3])
def test_step_flops_counts_forward_and_weight_gradient(batch: int) -> None:
    features = 16
    model = _Linear(features)
    x = torch.randn(batch, features)
    # forward: batch x features x features multiply-adds; backward: the weight's gradient as
    # many (the input needs none); 2 FLOPs per multiply-add
    assert step_flops(model, x) == 4 * batch * features * features
    assert all(p.grad is None for p in model.parameters())  # leaves no gradients behind


def test_gpu_feed_divides_the_rate_by_the_step_and_the_loader() -> None:
    result = {
        "model_step": {"gflop_per_image": 200.0},
        "modes": [
            {
                "cache_images": "memory",
                "rows": [{"workers": 0, "page_cache": "-", "images_per_s": 900.0}],
            },
            {
                "cache_images": "disk",
                "rows": [
                    {"workers": 0, "page_cache": "cold", "images_per_s": 400.0},
                    {"workers": 0, "page_cache": "warm", "images_per_s": 500.0},
                    {"workers": 2, "page_cache": "warm", "images_per_s": 700.0},
                ],
            },
        ],
    }
    rows = gpu_feed(result)
    assert [r["tflops"] for r in rows] == list(GPU_TFLOPS)
    for r in rows:
        assert r["images_per_s"] == pytest.approx(r["tflops"] * 1e3 / 200.0, rel=1e-12)
        assert r["loader_processes"] == pytest.approx(r["images_per_s"] / 500.0, rel=1e-12)
    result["modes"].pop()
    assert all(r["loader_processes"] is None for r in gpu_feed(result))


def test_stored_result_renders_to_the_committed_section() -> None:
    """BENCHMARKS.md's loader section is the script's rendering of the stored JSON."""
    import json
    import re

    from benchmarks.bench_loader import ROOT, markdown

    result = json.loads((ROOT / "benchmarks" / "results" / "loader.json").read_text())
    text = (ROOT / "BENCHMARKS.md").read_text()
    block = re.search(r"<!-- bench:loader -->\n(.*?)<!-- /bench:loader -->", text, re.DOTALL)
    assert block is not None
    body = block.group(1).split("\n\n", 1)[1]  # after the "Measured on ..." stamp
    assert body.strip() == markdown(result).strip()
    assert f"{result['model_step']['gflop_per_image']:.0f} GFLOP an image" in body


def test_markdown_without_a_disk_row_leaves_the_worker_sentence_out() -> None:
    import json

    from benchmarks.bench_loader import ROOT, markdown

    result = json.loads((ROOT / "benchmarks" / "results" / "loader.json").read_text())
    result["modes"] = [m for m in result["modes"] if m["cache_images"] != "disk"]
    result["gpu_feed"] = gpu_feed(result)
    md = markdown(result)
    assert "times the most loader processes" not in md
    for tflops in GPU_TFLOPS:  # the GPU-feed rows show no loader processes
        (line,) = [x for x in md.splitlines() if x.startswith(f"| {tflops} | ")]
        assert line.endswith("| - |")

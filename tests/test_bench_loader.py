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

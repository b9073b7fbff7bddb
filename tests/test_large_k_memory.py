"""At a large codebook the nearest-code search never holds an M x K block at once (the bound
``max_block``), and still finds what one unchunked ``addmm`` + ``min`` over all codes finds."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from vqkit import EMAUpdate, VectorQuantizer
from vqkit.quantize.distance import DEFAULT_MAX_BLOCK, nearest

M, K, D = 1024, 32768, 8  # past 16,384 codes the default blocks are column tiles


@functools.cache
def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, D, generator=g)
    c = torch.randn(K, D, generator=g)
    c[K - 1] = c[5]  # an exact tie across column tiles: the lower index must win
    x[:3] = c[5]
    return x, c


@functools.cache
def _expected():
    return _reference(*_data())


def _reference(x, c):
    scores = torch.addmm(c.pow(2).sum(1), x, c.t(), alpha=-2.0)  # the whole M x K block
    best, idx = scores.min(1)
    return idx, (best + x.pow(2).sum(1)).clamp_min(0.0)


def _record_addmm(monkeypatch):
    shapes = []
    addmm = torch.addmm

    def spy(*args, **kwargs):
        out = addmm(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "addmm", spy)
    return shapes


@pytest.mark.parametrize("max_block", [DEFAULT_MAX_BLOCK, 2**20])
def test_nearest_blocks_are_bounded_and_match_one_argmin(monkeypatch, max_block):
    x, c = _data()
    ref_idx, ref_dist = _expected()
    shapes = _record_addmm(monkeypatch)
    idx, dist = nearest(x, c, max_block=max_block)
    biggest = max(r * k for r, k in shapes)
    assert biggest <= max_block
    assert biggest <= M * K // 2
    assert sum(r * k for r, k in shapes) == M * K  # every score computed exactly once
    assert torch.equal(idx, ref_idx)
    assert idx[:3].tolist() == [5, 5, 5]
    assert torch.allclose(dist, ref_dist, rtol=1e-5, atol=1e-5)  # (assert_close: 2 s to import)


def _status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss():
    """Reset this process's peak resident set size (VmHWM); False where Linux does not let us."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.mark.parametrize("ema", [False, True])
def test_quantizer_forward_backward_never_allocates_m_by_k(monkeypatch, ema):
    x, _ = _data()
    torch.manual_seed(0)
    vq = VectorQuantizer(D, K, ema=EMAUpdate(0.99) if ema else None).train()
    ref_idx, _ = _reference(x, vq.effective_codebook().detach().clone())
    xg = x.clone().requires_grad_(True)
    shapes = _record_addmm(monkeypatch)
    measured = _reset_peak_rss()
    before = _status_kib("VmRSS") if measured else 0
    out = vq(xg)
    (out.quantized.sum() + out.loss).backward()
    assert torch.equal(out.indices, ref_idx)
    assert xg.grad is not None and (ema or vq.codebook.grad is not None)
    assert max(r * k for r, k in shapes) <= DEFAULT_MAX_BLOCK
    if measured:  # the peak holds one score block (64 MiB) and small change, not M x K (128 MiB)
        extra = (_status_kib("VmHWM") - before) * 1024
        assert extra < M * K * 4 * 3 // 4, f"peak {extra / 2**20:.0f} MiB above the start"

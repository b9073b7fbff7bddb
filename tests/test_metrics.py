import math

import pytest
import torch

from vqkit.evaluation import psnr, ssim
from vqkit.evaluation.visual import image_grid, save_png, save_usage_plot
from vqkit.training.schedules import warmup_cosine

tm = pytest.importorskip("torchmetrics.functional.image")


def test_psnr_and_ssim_match_torchmetrics():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    b = (a + 0.2 * torch.randn(4, 3, 32, 32, generator=g)).clamp(-1, 1)
    ua, ub = (a + 1) / 2, (b + 1) / 2
    ref_psnr = torch.stack(
        [tm.peak_signal_noise_ratio(ub[i : i + 1], ua[i : i + 1], data_range=1.0) for i in range(4)]
    ).mean()
    torch.testing.assert_close(psnr(b, a), ref_psnr, rtol=1e-4, atol=1e-4)
    ref_ssim = tm.structural_similarity_index_measure(ub, ua, data_range=1.0)
    torch.testing.assert_close(ssim(b, a), ref_ssim, rtol=1e-4, atol=1e-4)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-5)


def test_warmup_cosine_schedule_values():
    kw = dict(base_lr=2e-4, warmup_steps=10, total_steps=110, start_lr=1e-6, min_lr=1e-5)
    assert warmup_cosine(0, **kw) == pytest.approx(1e-6)
    assert warmup_cosine(5, **kw) == pytest.approx(1e-6 + (2e-4 - 1e-6) / 2)
    assert warmup_cosine(10, **kw) == pytest.approx(2e-4)
    assert warmup_cosine(60, **kw) == pytest.approx(1e-5 + 0.5 * (2e-4 - 1e-5))
    assert warmup_cosine(110, **kw) == pytest.approx(1e-5)
    assert warmup_cosine(500, **kw) == pytest.approx(1e-5)
    assert not math.isnan(warmup_cosine(3, **{**kw, "warmup_steps": 0}))


def test_pictures_are_valid_pngs(tmp_path):
    from PIL import Image

    x = torch.rand(3, 3, 8, 8) * 2 - 1
    grid = image_grid([x, -x])
    assert grid.shape == (3, 2 * 10 + 2, 3 * 10 + 2)
    p = save_png(grid, tmp_path / "g.png")
    assert Image.open(p).size == (32, 22)
    counts = torch.tensor([5, 0, 3, 1, 0, 0, 9, 2])
    q = save_usage_plot(counts, tmp_path / "u.png")
    Image.open(q).verify()

"""The PNG grids vqkit writes: small images enlarged (nearest-neighbour, integer factor) to
tiles of at least 128 px, rows labelled on the left, the figure that matters in a title."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vqkit.cli import main
from vqkit.evaluation.visual import (
    MIN_TILE,
    grid_layout,
    labelled_grid,
    sample_grid,
    save_png,
    to_uint8,
    upscale_factor,
)

LABELS = ["original", "reconstruction"]


def _batch(n: int, size: int, seed: int = 0, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


def _nearest(image: torch.Tensor, factor: int) -> torch.Tensor:
    """(C, H, W) uint8 -> (H * f, W * f, 3): every pixel a f x f block."""
    up = image.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
    return up.expand(3, -1, -1).permute(1, 2, 0)


def _tile(grid: torch.Tensor | np.ndarray, lay, row: int, col: int) -> torch.Tensor:  # noqa: ANN001
    """The (h, w, 3) pixels of one tile of a CHW tensor or an HWC array (a PNG read back)."""
    hwc = (
        grid.permute(1, 2, 0)
        if isinstance(grid, torch.Tensor)
        else torch.from_numpy(np.array(grid))
    )
    y, x = lay.tile_origin(row, col)
    return hwc[y : y + lay.tile_height, x : x + lay.tile_width]


def _dark(pixels: torch.Tensor) -> int:
    return int((pixels < 128).sum())


@pytest.mark.parametrize(
    ("size", "factor"), [(32, 4), (20, 7), (64, 2), (100, 2), (128, 1), (256, 1)]
)
def test_upscale_factor_reaches_the_minimum_and_never_shrinks(size, factor):
    assert upscale_factor(size, size) == factor
    assert size * factor >= MIN_TILE or factor == 1
    assert upscale_factor(32, 64) == 4  # the shorter side decides
    assert upscale_factor(8, 2048) == 1  # an extreme strip is not blown up past 8 tiles


@pytest.mark.parametrize("channels", [3, 1])
def test_small_images_become_exact_nearest_neighbour_tiles(channels):
    x, y = _batch(3, 32, 0, channels), _batch(2, 32, 1, channels)  # a shorter second row
    grid = labelled_grid([x, y], LABELS)
    lay = grid_layout(2, 3, (32, 32), LABELS)
    assert lay.scale == 4 and lay.tile_height == lay.tile_width == 128
    assert grid.shape == (3, lay.height, lay.width)
    for r, batch in enumerate((x, y)):
        for c in range(batch.shape[0]):
            assert torch.equal(_tile(grid, lay, r, c), _nearest(to_uint8(batch[c]), 4))
    assert bool((_tile(grid, lay, 1, 2) == 255).all())  # the short row ends in white


def test_big_images_are_not_scaled():
    x = _batch(2, 256)
    grid = labelled_grid([x], ["sample"])
    lay = grid_layout(1, 2, (256, 256), ["sample"])
    assert lay.scale == 1 and grid.shape == (3, lay.height, lay.width)
    for c in range(2):
        assert torch.equal(_tile(grid, lay, 0, c), to_uint8(x[c]).permute(1, 2, 0))


def test_labels_change_only_the_label_margin():
    x = _batch(4, 32)
    bare = labelled_grid([x, -x])
    labelled = labelled_grid([x, -x], LABELS)
    swapped = labelled_grid([x, -x], LABELS[::-1])
    lw = grid_layout(2, 4, (32, 32), LABELS).label_width
    assert grid_layout(2, 4, (32, 32)).label_width == 0 and lw > 0
    assert labelled.shape[2] == bare.shape[2] + lw
    assert torch.equal(labelled[:, :, lw:], bare)  # tiles and gaps as without labels
    margin = labelled[:, :, :lw]
    assert _dark(margin) > 50  # the text is there
    assert not torch.equal(margin, swapped[:, :, :lw])  # and it is the labels' text
    assert torch.equal(labelled[:, :, lw:], swapped[:, :, lw:])
    # each label sits beside its own row
    y0, _ = grid_layout(2, 4, (32, 32), LABELS).tile_origin(1, 0)
    assert _dark(margin[:, :y0]) > 0 and _dark(margin[:, y0:]) > 0


def test_title_is_a_band_above_the_grid():
    x = _batch(4, 32)
    plain = labelled_grid([x, x], LABELS)
    titled = labelled_grid([x, x], LABELS, "validation reconstructions, PSNR 22.1 dB, step 1500")
    other = labelled_grid([x, x], LABELS, "validation reconstructions, PSNR 23.4 dB, step 1500")
    th = grid_layout(2, 4, (32, 32), LABELS, "any title").title_height
    assert titled.shape == (3, plain.shape[1] + th, plain.shape[2])
    assert torch.equal(titled[:, th:], plain)
    assert _dark(titled[:, :th]) > 50
    assert not torch.equal(titled[:, :th], other[:, :th])  # the figure is drawn
    # a title wider than the grid widens the picture; the tiles stay where they were
    wide = labelled_grid([x[:1]], ["sample"], "prior samples, 5.60 bits per code, step 1500")
    lay = grid_layout(1, 1, (32, 32), ["sample"], "t")
    assert wide.shape[2] > lay.width
    assert torch.equal(_tile(wide, lay, 0, 0), _nearest(to_uint8(x[0]), 4))


def test_grid_is_uint8_chw_for_save_png_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    grid = labelled_grid([_batch(3, 32)], ["sample"], "title")
    assert grid.dtype == torch.uint8 and grid.dim() == 3 and grid.shape[0] == 3
    assert torch.equal(grid, labelled_grid([_batch(3, 32)], ["sample"], "title"))  # deterministic
    png = save_png(grid, tmp_path / "grid.png")
    np.testing.assert_array_equal(np.asarray(Image.open(png)), grid.permute(1, 2, 0).numpy())
    writer = SummaryWriter(tmp_path / "tb")
    writer.add_image("val/reconstructions", grid, 3)
    writer.close()
    (image,) = EventAccumulator(str(tmp_path / "tb")).Reload().Images("val/reconstructions")
    assert (image.height, image.width, image.step) == (grid.shape[1], grid.shape[2], 3)
    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
    np.testing.assert_array_equal(decoded, grid.permute(1, 2, 0).numpy())


def test_grids_are_capped_and_say_what_they_left_out():
    lay = grid_layout(8, 8, (32, 32), ["r"] * 8)
    capped = labelled_grid([_batch(12, 32)] * 20, ["r"] * 20, "t")
    assert capped.shape[1:] == (grid_layout(8, 8, (32, 32), ["r"] * 8, "t").height, lay.width)
    noted = labelled_grid(
        [_batch(8, 32)] * 8, ["r"] * 8, "t, first 8 of 20 rows, first 8 of 12 columns"
    )
    assert torch.equal(capped, noted)
    # samples: rows of 8, labelled by number; beyond 64 the title says so
    many = sample_grid(_batch(70, 32), "prior samples")
    rows = list(_batch(70, 32)[:64].split(8))
    labels = [f"samples {8 * i + 1}-{8 * i + 8}" for i in range(8)]
    assert torch.equal(many, labelled_grid(rows, labels, "prior samples (first 64 of 70)"))
    few = sample_grid(_batch(3, 32))
    assert torch.equal(few, labelled_grid([_batch(3, 32)], ["samples 1-3"]))


def test_bad_rows_are_named():
    with pytest.raises(ValueError, match="at least one row"):
        labelled_grid([])
    with pytest.raises(ValueError, match="got 1 labels for 2 rows"):
        labelled_grid([_batch(2, 8), _batch(2, 8)], ["a"])
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\), \(2, 3, 16, 16\)"):
        labelled_grid([_batch(2, 8), _batch(2, 16)])
    with pytest.raises(ValueError, match="N, 1 or 3, H, W"):
        labelled_grid([torch.zeros(2, 2, 8, 8)])


# ------------------------------------------------------------------------------ the files
def _assert_tiles(path: Path, lay, rows: int, columns: int) -> None:  # noqa: ANN001
    """The PNG has ``lay``'s size and its tiles are 32 px images shown at 128 px: 4x4 blocks."""
    arr = np.asarray(Image.open(path).convert("RGB"))
    assert arr.shape[0] == lay.height and arr.shape[1] >= lay.width, (arr.shape, lay)
    assert lay.tile_height >= MIN_TILE and lay.tile_width >= MIN_TILE
    s = lay.scale
    for r in range(rows):
        for c in range(columns):
            tile = _tile(arr, lay, r, c).numpy().reshape(128 // s, s, 128 // s, s, 3)
            assert (tile == tile[:, :1, :, :1]).all(), (path.name, r, c)
            assert tile.std() > 0  # an image, not the white background


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A 6-step tiny `vqkit fit` (validated at steps 3 and 6): its checkpoint, images and run."""
    from tests.test_training import fit_tiny_checkpoint

    root = tmp_path_factory.mktemp("pictures_fit")
    ckpt, folder = fit_tiny_checkpoint(root)
    (run,) = (root / "run").glob("tensorboard/version_*")
    return ckpt, folder, run


def test_fit_writes_labelled_reconstructions_with_big_tiles(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vqkit.training.callbacks import _reconstructions_title

    _, _, run = fitted
    summary = json.loads((run / "summary.json").read_text())
    title = _reconstructions_title(summary)
    assert f"PSNR {summary['psnr']:.1f} dB" in title
    # 16 images, val_fraction 0.25: one validation batch of 4
    lay = grid_layout(2, 4, (32, 32), LABELS, title)
    png = run / "reconstructions.png"
    _assert_tiles(png, lay, 2, 4)
    expected = labelled_grid([torch.zeros(4, 3, 32, 32)] * 2, LABELS, title)
    got = np.asarray(Image.open(png))
    # the title band and the label column are the ones drawn for this run's figures
    expected = expected.permute(1, 2, 0).numpy()
    th, lw = lay.title_height, lay.label_width
    np.testing.assert_array_equal(got[:th], expected[:th])
    np.testing.assert_array_equal(got[:, :lw], expected[:, :lw])
    images = EventAccumulator(str(run)).Reload().Images("val/reconstructions")
    assert len(images) == 2  # steps 3 and 6
    tb = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)))
    tb_lay = grid_layout(2, 4, (32, 32), LABELS, "title")
    assert tb.shape == (tb_lay.height, tb_lay.width, 3)
    assert _dark(torch.from_numpy(np.array(tb[: tb_lay.title_height]))) > 50


def test_sample_writes_labelled_samples_and_edits_with_big_tiles(fitted, tmp_path):
    ckpt, folder, _ = fitted
    images = sorted(folder.glob("*.png"))[:2]
    out = tmp_path / "out"
    argv = ["sample", "--ckpt", str(ckpt), "--output-dir", str(out), "--num", "3"]
    assert main([*argv, "--images", *map(str, images)]) == 0
    title = "samples, codes drawn from usage"
    _assert_tiles(out / "samples.png", grid_layout(1, 3, (32, 32), ["samples 1-3"], title), 1, 3)
    labels = ["original", "reconstruction", "25% redrawn", "halves swapped"]
    _assert_tiles(out / "edits.png", grid_layout(4, 2, (32, 32), labels, "title"), 4, 2)


def test_prior_logs_samples_titled_with_bits_per_code(fitted):
    from vqkit.evaluation.sampling import decode_codes
    from vqkit.prior import PriorModule

    ckpt, _, _ = fitted
    module = PriorModule(str(ckpt), n_layer=1, n_head=2, n_embd=16, num_log_samples=3)
    logged = []
    experiment = SimpleNamespace(add_image=lambda *a: logged.append(a))
    module._trainer = SimpleNamespace(
        callback_metrics={"val/nll": torch.tensor(3.0 * np.log(2))},
        logger=SimpleNamespace(experiment=experiment),
        global_rank=0,
        global_step=7,
    )
    module._log_samples()
    ((tag, grid, step),) = logged
    assert (tag, step) == ("val/samples", 7)
    g = torch.Generator().manual_seed(0)
    samples = decode_codes(module.tokenizer_model, module.transformer.generate(3, generator=g))
    title = "prior samples, 3.00 bits per code, temperature 1, step 7"
    assert torch.equal(grid, sample_grid(samples, title))
    assert grid_layout(1, 3, (32, 32), ["samples 1-3"], title).tile_height == 128

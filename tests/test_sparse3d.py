"""The sparse SDF example: its plain-PyTorch sparse convolution and model, the data module and
a short ``vqkit fit`` of configs/sparse3d/quickstart.yaml."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vqkit import EMAUpdate, VectorQuantizer
from vqkit.integrations.sparse import SparseVectorQuantizer
from vqkit.models.sparse3d import SparseSDFVQVAE, SubmanifoldConv3d, neighbor_table


def _sites(n: int, batch: int, grid: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.cat(
        [torch.randint(0, batch, (n, 1), generator=g), torch.randint(0, grid, (n, 3), generator=g)],
        dim=1,
    )
    return torch.unique(c, dim=0)


def test_neighbor_table_matches_a_dictionary_lookup():
    coords = _sites(400, batch=2, grid=6)
    coords = coords[torch.randperm(len(coords), generator=torch.Generator().manual_seed(1))]
    table = neighbor_table(coords, grid=6)
    where = {tuple(r): i for i, r in enumerate(coords.tolist())}
    offsets = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)]
    expected = [
        [where.get((s, x + a, y + b, z + c), -1) for a, b, c in offsets]
        for s, x, y, z in coords.tolist()
    ]
    assert table.tolist() == expected
    assert (table[:, 13] == torch.arange(len(coords))).all()  # the centre is the site itself
    # a neighbor never crosses into another sample
    assert (
        neighbor_table(torch.tensor([[0, 0, 0, 0], [1, 0, 0, 1]]), grid=4)[0].tolist()
        == [-1] * 13 + [0] + [-1] * 13
    )
    assert neighbor_table(torch.empty(0, 4, dtype=torch.long), grid=4).shape == (0, 27)


def test_submanifold_conv_equals_a_dense_conv_at_the_active_sites():
    torch.manual_seed(0)
    grid, cin, cout = 7, 5, 3
    coords = _sites(150, batch=2, grid=grid)
    feats = torch.randn(len(coords), cin, dtype=torch.float64)
    conv = SubmanifoldConv3d(cin, cout).double()
    out = conv(feats, neighbor_table(coords, grid))
    dense = torch.zeros(2, cin, grid, grid, grid, dtype=torch.float64)
    b, x, y, z = coords.T
    dense[b, :, x, y, z] = feats
    # the gathered weight row (27 * cin) is offset-major: (dx, dy, dz, cin)
    weight = conv.weight.view(3, 3, 3, cin, cout).permute(4, 3, 0, 1, 2)
    ref = F.conv3d(dense, weight, conv.bias, padding=1)[b, :, x, y, z]
    torch.testing.assert_close(out, ref)


def _model(quantizer=None, **kw):
    q = quantizer or VectorQuantizer(16, 64, channel_first=False, ema=EMAUpdate())
    return SparseSDFVQVAE(q, patch=2, grid=6, hidden=16, blocks=1, token_dim=16, **kw)


def test_model_reconstructs_token_lists_and_counts_usage_per_shape():
    torch.manual_seed(0)
    coords = _sites(120, batch=3, grid=6)
    values = torch.rand(len(coords), 8) * 2 - 1
    model = _model()
    out = model(values, coords, batch_size=4)
    assert out.reconstructions.shape == values.shape
    assert out.reconstructions.abs().max() <= 1
    assert out.indices.shape == (len(coords),)
    tokens = torch.bincount(coords[:, 0], minlength=4)
    assert out.per_sample.tokens.tolist() == tokens.tolist()  # sample 3 has none: zeros
    for s in range(3):
        assert int(out.per_sample.used_codes[s]) == len(
            set(out.indices[coords[:, 0] == s].tolist())
        )
    assert int(out.per_sample.used_codes[3]) == 0
    model.eval()
    torch.testing.assert_close(
        model.decode_indices(model.tokenize(values, coords), coords),
        model(values, coords).reconstructions,
    )


def test_model_takes_the_seed_001_drop_in_quantizer():
    vq = SparseVectorQuantizer(64, 16, use_kmeans_reinit=True, kmeans_interval=5, reservoir_size=64)
    model = _model(vq)
    assert model.quantizer is vq.quantizer
    coords = _sites(100, batch=2, grid=6)
    out = model(torch.rand(len(coords), 8), coords)
    assert out.per_sample.tokens.sum() == len(coords)


@pytest.mark.parametrize("drop_in", [False, True])
def test_a_trained_sdf_tokenizer_saves_and_loads_with_the_same_codes(tmp_path, drop_in):
    """save_pretrained / from_pretrained (and load_pretrained) of the 3D model, with vqkit's
    quantizer or the seed-001 drop-in: the same codes and reconstructions bit for bit, no
    training state in the folder, altered weights refused."""
    from safetensors.torch import load_file, save_file

    from vqkit import KMeansInit
    from vqkit.pretrained import PretrainedError, load_pretrained

    torch.manual_seed(0)
    if drop_in:
        vq = SparseVectorQuantizer(64, 16, kmeans_init=True, reservoir_size=64)
    else:
        vq = VectorQuantizer(
            16, 64, channel_first=False, ema=EMAUpdate(), maintenance=[KMeansInit(0, 64)]
        )
    model = _model(vq).train()
    coords = _sites(150, batch=3, grid=6)
    values = torch.rand(len(coords), 8) * 2 - 1
    for _ in range(3):  # k-means init, then EMA steps: the codebook moved, statistics exist
        model(values, coords)
    assert int(model.quantizer.num_replacements) > 0
    model.eval()
    folder = model.save_pretrained(tmp_path / "sdf")
    saved = load_file(folder / "model.safetensors")
    assert not any(k.startswith(("vq.usage.", "vq.reservoirs.", "vq.ema.")) for k in saved)
    for loaded in (SparseSDFVQVAE.from_pretrained(folder), load_pretrained(folder)):
        assert isinstance(loaded, SparseSDFVQVAE) and isinstance(loaded.vq, VectorQuantizer)
        assert loaded.quantizer.ema is None and list(loaded.quantizer.maintenance) == []
        codes = model.tokenize(values, coords)
        assert torch.equal(loaded.tokenize(values, coords), codes)
        assert torch.equal(
            loaded.decode_indices(codes, coords), model.decode_indices(codes, coords)
        )
    config = json.loads((folder / "config.json").read_text())
    assert config["vqkit"]["kind"] == "sdf_tokenizer" and config["codebook_size"] == 64
    saved["vq.codebook"] = saved["vq.codebook"] + 1
    save_file(saved, folder / "model.safetensors")
    with pytest.raises(PretrainedError, match="do not hash to the sha256"):
        SparseSDFVQVAE.from_pretrained(folder)


def test_model_refuses_mismatched_shapes():
    import pytest

    with pytest.raises(ValueError, match="token_dim"):
        SparseSDFVQVAE(VectorQuantizer(8, 16, channel_first=False), token_dim=16)
    with pytest.raises(ValueError, match="channel_first"):
        SparseSDFVQVAE(VectorQuantizer(16, 16, channel_first=True), token_dim=16)
    model = _model()
    with pytest.raises(ValueError, match=r"values must be \(N, 8\)"):
        model(torch.rand(5, 27), torch.zeros(5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="coords must be"):
        model(torch.rand(5, 8), torch.zeros(5, 3, dtype=torch.long))


# --- the data ------------------------------------------------------------------------------


def test_cube_symmetries_move_patches_like_the_dense_grid():
    """Augmenting the patch list equals re-cutting the rotated / reflected dense grid."""
    import numpy as np

    from vqkit.data.shapes import procedural_sdf, to_patches
    from vqkit.data.sparse3d import cube_symmetry, transform_patches

    sdf = procedural_sdf(3, resolution=32)
    coords, values, _ = to_patches(sdf, patch=4)
    seen = set()
    for seed in range(48):
        perm, flips = cube_symmetry(seed)
        seen.add((perm, flips))
        dense = sdf.transpose(perm)
        for axis, flip in enumerate(flips):
            if flip:
                dense = np.flip(dense, axis)
        want_c, want_v, _ = to_patches(np.ascontiguousarray(dense), patch=4)
        got_c, got_v = transform_patches(coords, values, 4, 8, perm, flips)
        order = np.lexsort(got_c.T[::-1])
        np.testing.assert_array_equal(got_c[order], want_c)
        np.testing.assert_array_equal(got_v[order], want_v)
    assert len(seen) == 48


@pytest.fixture(scope="module")
def shape_data(tmp_path_factory):
    from vqkit.data.sparse3d import ShapeDataModule

    dm = ShapeDataModule(
        6, 3, held_out=[], resolution=32, batch_size=2, cache_dir=str(tmp_path_factory.mktemp("c"))
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_data_module_batches_are_token_lists(shape_data):
    dm = shape_data
    batch = next(iter(dm.train_dataloader()))
    assert batch["batch_size"] == 2 and batch["index"].shape == (2,)
    coords, values = batch["coords"], batch["values"]
    assert coords.shape == (values.shape[0], 4) and values.shape[1] == 64
    assert set(coords[:, 0].tolist()) == {0, 1}
    assert int(coords[:, 1:].min()) >= 0 and int(coords[:, 1:].max()) < dm.grid
    assert values.abs().max() <= 1 and (values < 0).any() and (values > 0).any()
    val = next(iter(dm.val_dataloader()))
    assert val["inside"].shape == (2, dm.grid, dm.grid, dm.grid)
    # validation shapes are not augmented: they are the set's own patches
    c0, v0 = dm.val_set.patches(0)
    rows = val["coords"][:, 0] == 0
    assert val["coords"][rows, 1:].tolist() == c0.tolist()
    torch.testing.assert_close(val["values"][rows], torch.from_numpy(v0))


def test_training_batches_resume_exactly(shape_data):
    """The loader's state after k batches gives a fresh loader the same remaining batches."""
    dm = shape_data
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    rest = [b["values"] for b in it]
    again = dm.train_dataloader()
    again.load_state_dict(state)
    for a, b in zip(rest, [b["values"] for b in again], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- `vqkit fit` of the sparse 3D config ------------------------------------------------------

TINY = Path(__file__).parent / "configs" / "sparse3d_tiny.yaml"


def test_vqkit_fit_trains_the_sparse_sdf_example(tmp_path, monkeypatch, capsys):
    """`vqkit fit --config` of the shrunk quickstart: k-means ran, the codebook maintenance
    replaced codes, validation measured SDF L1 / IoU / Chamfer and per-shape usage, and the
    summary, mesh pictures and checkpoint were written; the held-out meshes are measured."""
    from vqkit.cli import main
    from vqkit.data.sparse3d import ShapeDataModule

    monkeypatch.setenv("VQKIT_DATA", str(tmp_path / "cache"))

    real_setup = ShapeDataModule.setup

    def with_held_out(self, stage=None):  # a validation shape stands in for an npm mesh
        real_setup(self, stage)
        self.held_out_set = self.val_set.subset([1])
        self.held_out_set.names = ["stand-in mesh"]

    monkeypatch.setattr(ShapeDataModule, "setup", with_held_out)
    root = tmp_path / "run"
    assert main(["fit", "--config", str(TINY), f"--trainer.default_root_dir={root}"]) == 0
    log = next(root.rglob("vqkit.log")).read_text()
    assert "k-means init at step 2" in log  # quantization began after the warm-up
    assert "k-means re-estimation at step 3" in log
    summary = json.loads(next(root.rglob("summary.json")).read_text())
    assert summary["steps"] == 8 and summary["train_shapes"] == 32
    assert 0 < summary["sdf_l1"] < 2 and 0 <= summary["iou"] <= 1
    assert summary["chamfer"] > 0 and math.isfinite(summary["chamfer"])
    assert 1 <= summary["shape_used_codes"] <= 64 and 0 < summary["utilization"] <= 1
    held = summary["held_out"]["stand-in mesh"]
    assert held["patches"] > 0 and 1 <= held["used_codes"] <= held["patches"]
    assert 0 <= held["iou"] <= 1 and held["chamfer"] > 0
    picture = Path(summary["files"]["reconstructions"])
    from PIL import Image

    with Image.open(picture) as im:
        assert im.height > 3 * 128  # title + 3 rows (2 validation shapes, 1 held out)
    assert "held_out: stand-in mesh" in capsys.readouterr().out

    # `vqkit export` of the checkpoint: the 3D tokenizer's folder gives the checkpoint's codes
    from vqkit.pretrained import load_pretrained
    from vqkit.training import load_tokenizer

    ckpt = next(root.rglob("last.ckpt"))
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    trained = load_tokenizer(ckpt).model.eval()
    loaded = load_pretrained(out)
    assert isinstance(loaded, SparseSDFVQVAE)
    coords = _sites(150, batch=2, grid=trained.grid)
    values = torch.rand(len(coords), trained.patch**3) * 2 - 1
    codes = trained.tokenize(values, coords)
    assert torch.equal(loaded.tokenize(values, coords), codes)
    assert torch.equal(loaded.decode_indices(codes, coords), trained.decode_indices(codes, coords))
    card = (out / "README.md").read_text()
    assert "from vqkit.models import SparseSDFVQVAE" in card
    assert 'SparseSDFVQVAE.from_pretrained("path/or/user-repo")' in card


def test_bad_settings_of_the_data_and_training_modules_name_the_problem():
    from vqkit.data.sparse3d import ShapeDataModule
    from vqkit.training.sparse3d import SparseSDFModule

    with pytest.raises(ValueError, match=r"unknown held-out meshes \['dragon'\]"):
        ShapeDataModule(held_out=["dragon"])
    with pytest.raises(ValueError, match=r"resolution \(30\) must be a multiple of patch \(4\)"):
        ShapeDataModule(resolution=30)
    with pytest.raises(ValueError, match="train_shapes must be >= 1"):
        ShapeDataModule(train_shapes=0)
    with pytest.raises(ValueError, match=r"resolution \(64\) must be the model's patch x grid"):
        SparseSDFModule(_model(), resolution=64)  # the model's grid is 6 patches of 2
    with pytest.raises(ValueError, match="chamfer_shapes and picture_shapes must be >= 0"):
        SparseSDFModule(_model(), resolution=12, chamfer_shapes=-1)

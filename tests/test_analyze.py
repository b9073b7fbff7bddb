"""`vqkit analyze` and `vqkit.evaluation.analyze`: figures against a hand computation from the
same indices, the CLI end to end on a `vqkit fit` checkpoint, errors, and EMA vs real use."""

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from vqkit.cli import main
from vqkit.evaluation import analyze
from vqkit.evaluation.plots import PLOT_FILES, pca_2d, save_report_plots
from vqkit.models import ResNetVQModel
from vqkit.quantize import EMAUpdate, VectorQuantizer

K = 32


def tiny_model(distance: str = "l2", codebook_dim: int | None = None, ema: bool = False):
    torch.manual_seed(0)
    q = VectorQuantizer(
        dim=8,
        codebook_size=K,
        codebook_dim=codebook_dim,
        distance=distance,
        channel_first=True,
        ema=EMAUpdate() if ema else None,
    )
    return ResNetVQModel(q, resolution=16, base_channels=8, channel_mult=(1, 2), z_channels=8)


def tiny_images(n: int = 22) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 1, 1, generator=g).expand(n, 3, 16, 16).clone()
    for i in range(n):  # a coloured square somewhere on a flat background
        y0, x0 = torch.randint(0, 8, (2,), generator=g).tolist()
        x[i, :, y0 : y0 + 8, x0 : x0 + 8] = torch.rand(3, 1, 1, generator=g)
    return x * 2 - 1


@torch.no_grad()
def code_space(model, x: torch.Tensor) -> torch.Tensor:
    """Tokens (M, codebook_dim) in the quantizer's code space, written out by hand."""
    q = model.quantizer
    h = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, q.dim)
    z = q.project_in(h)
    return F.normalize(z, dim=1) if q.distance == "cosine" else z


def codes_of(model) -> torch.Tensor:
    c = model.quantizer.codebook.detach()
    return F.normalize(c, dim=1) if model.quantizer.distance == "cosine" else c


@torch.no_grad()
def spread_codebook(model, x: torch.Tensor) -> None:
    """Codes drawn from the data's tokens, so the tiny model uses many codes."""
    z = code_space(model, x)
    pick = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(2))[:K]
    model.quantizer.codebook.data.copy_(z[pick] + 0.01 * torch.randn(K, z.shape[1]))


def entropy_np(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("distance,codebook_dim", [("l2", None), ("cosine", 4)])
def test_figures_match_a_hand_computation_from_the_same_indices(distance, codebook_dim, tmp_path):
    model = tiny_model(distance, codebook_dim)
    x = tiny_images()
    spread_codebook(model, x)
    model.train()  # analyze switches to eval and back
    loader = DataLoader(x, batch_size=5)  # 5 batches, the last one of 2 images
    report = analyze(model, loader, keep_index_maps=True, progress=False)
    assert model.training
    assert int(model.quantizer.usage.eval_counts.sum()) == 0  # touches no statistics

    model.eval()
    maps = [model.encode(b) for b in loader]
    idx = torch.cat(maps)
    assert torch.equal(report.index_maps, idx)
    flat = idx.flatten().numpy()
    counts = np.bincount(flat, minlength=K)
    n_tok = flat.size
    assert report.tokens == n_tok == 22 * 8 * 8 and report.images == 22
    assert report.token_grid == (8, 8)
    np.testing.assert_array_equal(report.counts.numpy(), counts)
    used = int((counts > 0).sum())
    assert used >= 8  # the spread codebook makes this a real test of the figures
    h = entropy_np(counts)
    w = report.whole_set
    assert (w.used_codes, w.dead_codes, w.tokens) == (used, K - used, n_tok)
    assert w.utilization == pytest.approx(used / K)
    assert w.perplexity == pytest.approx(math.exp(h), rel=1e-9)
    assert w.normalized_entropy == pytest.approx(h / math.log(K), rel=1e-9)
    # Gini from its definition: mean absolute difference over all pairs / (2 * mean)
    gini = np.abs(counts[:, None] - counts[None, :]).sum() / (2 * K * K * counts.mean())
    assert report.gini == pytest.approx(gini, rel=1e-9)
    top = np.sort(counts)[::-1][: math.ceil(K / 100)].sum() / n_tok
    assert report.top1pct_share == pytest.approx(top)

    per = [np.bincount(m.flatten().numpy(), minlength=K) for m in maps]
    used_b = np.array([(c > 0).sum() for c in per])
    ppl_b = np.array([math.exp(entropy_np(c)) for c in per])
    b = report.per_batch
    assert b.batches == 5
    assert (b.used_codes_min, b.used_codes_max) == (used_b.min(), used_b.max())
    assert b.used_codes_mean == pytest.approx(used_b.mean())
    assert b.utilization_mean == pytest.approx(used_b.mean() / K)
    assert (b.utilization_min, b.utilization_max) == (used_b.min() / K, used_b.max() / K)
    assert b.perplexity_mean == pytest.approx(ppl_b.mean(), rel=1e-9)
    assert b.perplexity_min == pytest.approx(ppl_b.min(), rel=1e-9)
    assert b.perplexity_max == pytest.approx(ppl_b.max(), rel=1e-9)

    # quantization error in code space, per-code distances and norms, reconstructions
    z = code_space(model, x).double()
    c = codes_of(model).double()
    sq = ((z - c[torch.from_numpy(flat)]) ** 2).sum(1).numpy()
    assert report.mean_quantization_error == pytest.approx(sq.mean(), rel=1e-5)
    md = np.array([sq[flat == i].mean() if counts[i] else np.nan for i in range(K)])
    np.testing.assert_allclose(report.code_mean_distance.numpy(), md, rtol=1e-5)
    np.testing.assert_allclose(report.code_norm.numpy(), c.norm(dim=1).numpy(), rtol=1e-6)
    with torch.no_grad():
        rec = model.decode_indices(idx)
    assert report.reconstruction_l1 == pytest.approx(float((rec - x).abs().mean()), rel=1e-5)
    mse = ((((rec.clamp(-1, 1) + 1) / 2 - (x + 1) / 2) ** 2).flatten(1).mean(1)).double()
    assert report.psnr == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-5)
    distinct = [[len(np.unique(idx[:, i, j])) for j in range(8)] for i in range(8)]
    np.testing.assert_array_equal(report.distinct_codes_per_position.numpy(), distinct)

    # the files say the same
    report.save(tmp_path, details=True, names=[f"im{i}" for i in range(22)])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["codebook_size"] == K and s["tokens"] == n_tok
    assert s["whole_set"]["used_codes"] == used
    assert s["whole_set"]["perplexity"] == pytest.approx(math.exp(h), rel=1e-9)
    assert s["whole_set"]["gini"] == pytest.approx(gini, rel=1e-9)
    assert s["per_batch"]["used_codes_max"] == used_b.max()
    assert s["ema_counts"] is None  # never trained: no EMA history to report
    rows = list(csv.DictReader((tmp_path / "codes.csv").read_text().splitlines()))
    assert [int(r["count"]) for r in rows] == counts.tolist()
    assert sum(float(r["share"]) for r in rows) == pytest.approx(1.0)
    assert np.array_equal(np.load(tmp_path / "indices.npy"), idx.numpy())
    assert (tmp_path / "indices.txt").read_text().split() == [f"im{i}" for i in range(22)]


def test_soft_assignment_entropy_matches_a_hand_computation():
    model = tiny_model()
    x = tiny_images(10)
    spread_codebook(model, x)
    z = code_space(model, x).double()
    d = torch.cdist(z, codes_of(model).double()) ** 2
    got = []
    for tau in (0.05, 1.0, 20.0):
        report = analyze(model, DataLoader(x, batch_size=4), temperature=tau, progress=False)
        p = torch.softmax(-d / tau, dim=1)
        hand = float(-(p * torch.log(p.clamp_min(1e-300))).sum(1).mean())
        assert report.soft_entropy == pytest.approx(hand, rel=1e-4, abs=1e-6)
        assert report.soft_normalized_entropy == pytest.approx(
            hand / math.log(K), rel=1e-4, abs=1e-6
        )
        got.append(report.soft_normalized_entropy)
    assert got[0] < got[1] < got[2] <= 1.0  # more decisive at low temperature
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        analyze(model, DataLoader(x, batch_size=4), temperature=0, progress=False)


def test_ema_counts_and_real_use_are_reported_apart(tmp_path):
    """Seed 002: EMA statistics said every code was alive while each batch used two codes."""
    model = tiny_model(ema=True)
    x = tiny_images(12)
    q = model.quantizer
    z = code_space(model, x)
    centre = z.mean(0)
    centre[0] = z[:, 0].median()
    with torch.no_grad():
        # codes 0 and 1 straddle the data along axis 0; every other code is far away
        q.codebook[:] = centre + 1e3
        q.codebook[0] = centre
        q.codebook[1] = centre
        q.codebook[0, 0] += 100.0
        q.codebook[1, 0] -= 100.0
        q.usage.ema_counts.fill_(5.0)  # a history in which every code looks busy
        q.usage.ema_started.fill_(True)
    report = analyze(model, DataLoader(x, batch_size=4), progress=False)
    assert report.whole_set.used_codes == 2 and report.whole_set.utilization == 2 / K
    assert report.per_batch.used_codes_max <= 2
    assert report.ema_counts.codes_above_threshold == K
    assert report.ema_counts.ema_normalized_entropy == pytest.approx(1.0)
    assert report.ema_cluster_size.codes_above_threshold == K  # EMA codebook's sizes start at 1
    s = report.summary()
    assert s["whole_set"]["utilization"] == 2 / K
    assert s["ema_counts"]["codes_above_threshold"] == K
    assert "utilization" not in s["ema_counts"] and "utilization" not in s["ema_cluster_size"]
    assert "not the use of these images" in s["ema_counts"]["note"]
    # and the pictures of a collapsed codebook still draw
    for path in save_report_plots(report, tmp_path):
        assert Image.open(path).format == "PNG"


def test_pca_of_the_codebook_finds_its_main_axes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g) * torch.tensor([5.0, 2.0, 0.1, 0.1, 0.1, 0.1])
    xy = pca_2d(x)
    assert xy.shape == (200, 2)
    assert xy[:, 0].var() > 4 * xy[:, 1].var() > 4 * 0.1**2
    assert pca_2d(torch.randn(10, 1)).shape == (10, 2)


# ------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A checkpoint of a 6-step `vqkit fit` of the tiny quickstart, and its image folder."""
    # imported here: the distributed test's processes import this module and need no Lightning
    from tests.test_training import fit_tiny_checkpoint

    return fit_tiny_checkpoint(tmp_path_factory.mktemp("analyze_fit"))


def test_cli_end_to_end_on_a_fit_checkpoint(fitted, tmp_path, capsys):
    ckpt, folder = fitted
    out = tmp_path / "analysis"
    argv = ["analyze", "--ckpt", str(ckpt), "--output-dir", str(out), "--batch-size", "3"]
    assert main([*argv, "--plot", "--save-details", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for words in ("whole set", "per batch", "EMA counts", "PSNR", "summary.json"):
        assert words in printed
    s = json.loads((out / "summary.json").read_text())
    # default data: the validation split the checkpoint was trained with, at its image size
    assert s["image_size"] == 32 and s["token_grid"] == [8, 8]
    assert s["codebook_size"] == 64 and str(folder) in s["data"]
    names = (out / "indices.txt").read_text().split()
    assert s["images"] == len(names) >= 2 and set(names) <= {p.name for p in folder.iterdir()}
    assert s["tokens"] == 64 * s["images"]
    assert s["per_batch"]["batches"] == math.ceil(s["images"] / 3)
    # trained past k-means init: the EMA usage history covers some codes, never more than all
    assert 0 < s["ema_counts"]["codes_above_threshold"] <= 64
    rows = list(csv.DictReader((out / "codes.csv").read_text().splitlines()))
    assert len(rows) == 64 and sum(int(r["count"]) for r in rows) == s["tokens"]
    idx = np.load(out / "indices.npy")
    assert idx.shape == (s["images"], 8, 8)
    counts = np.bincount(idx.flatten(), minlength=64)
    assert [int(r["count"]) for r in rows] == counts.tolist()
    assert s["whole_set"]["used_codes"] == int((counts > 0).sum())
    for name in PLOT_FILES:
        path = out / name
        assert path.stat().st_size > 0
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 0
            im.verify()

    # --data and --max-images: the first images of a folder in sorted order, and the figures
    # of a hand computation on the model the checkpoint rebuilds
    from vqkit.data import load_image
    from vqkit.training import load_model

    out2 = tmp_path / "folder"
    args2 = ["--data", str(folder), "--max-images", "5", "--save-details", "--image-size", "16"]
    assert main(["analyze", "--ckpt", str(ckpt), "--output-dir", str(out2), *args2]) == 0
    s2 = json.loads((out2 / "summary.json").read_text())
    assert s2["images"] == 5 and s2["token_grid"] == [4, 4] and s2["image_size"] == 16
    first = sorted(folder.iterdir())[:5]
    assert (out2 / "indices.txt").read_text().split() == [p.name for p in first]
    idx = load_model(ckpt).encode(torch.stack([load_image(p, 16) for p in first]))
    assert np.array_equal(np.load(out2 / "indices.npy"), idx.numpy())
    counts = np.bincount(idx.flatten().numpy(), minlength=64)
    h = entropy_np(counts)
    assert s2["whole_set"]["used_codes"] == s2["per_batch"]["used_codes_max"] == (counts > 0).sum()
    assert s2["whole_set"]["perplexity"] == pytest.approx(math.exp(h), rel=1e-9)
    assert s2["whole_set"]["normalized_entropy"] == pytest.approx(h / math.log(64), rel=1e-9)
    assert not (out2 / PLOT_FILES[0]).exists()  # no --plot, no plots


def test_cli_default_data_is_the_bundled_sets_validation_split(fitted, tmp_path, monkeypatch):
    """A checkpoint trained on the bundled set (no root) is analyzed on that set's held-out
    split; an offline fake of the set stands in for the real one."""
    from tests.test_data_bundled import NAMES, make_tarball
    from vqkit.data import DATASETS, FLUENT_EMOJI_3D, ImageDataModule, bundled, fetch

    tgz = tmp_path / "fake-1.1.0.tgz"
    sha = make_tarball(tgz)
    fake = bundled.NpmDataset(
        **{**FLUENT_EMOJI_3D.__dict__, "sha256": sha, "size": tgz.stat().st_size}
    )
    monkeypatch.setitem(DATASETS, "fluent-emoji-3d", fake)
    monkeypatch.setenv("PATH", "")  # any attempt to run npm would fail loudly
    fetch("fluent-emoji-3d", tmp_path / "cache", tarball=tgz)
    ckpt = torch.load(fitted[0], weights_only=False)
    hp = {
        "root": None,
        "cache_dir": str(tmp_path / "cache"),
        "val_fraction": 0.25,
        "image_size": 16,
    }
    ckpt["datamodule_hyper_parameters"] = hp
    torch.save(ckpt, tmp_path / "bundled.ckpt")
    out = tmp_path / "analysis"
    assert (
        main(
            [
                "analyze",
                "--ckpt",
                str(tmp_path / "bundled.ckpt"),
                "--output-dir",
                str(out),
                "--save-details",
            ]
        )
        == 0
    )
    s = json.loads((out / "summary.json").read_text())
    dm = ImageDataModule(**hp, batch_size=1, num_workers=0)
    dm.setup()
    val = [p.name for p in dm.val_dataset.paths]
    assert s["data"] == "validation split of the bundled fluent-emoji-3d set"
    assert (out / "indices.txt").read_text().split() == val and 0 < len(val) < len(NAMES)
    assert s["image_size"] == 16 and s["token_grid"] == [4, 4] and s["images"] == len(val)


def test_cli_errors_exit_nonzero_with_their_message(fitted, tmp_path, capsys):
    ckpt, folder = fitted
    base = ["analyze", "--output-dir", str(tmp_path / "o")]
    bad = tmp_path / "corrupt.ckpt"
    bad.write_bytes(b"not a checkpoint")
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_text("not an image")
    cases = [
        (["--ckpt", str(tmp_path / "missing.ckpt")], "checkpoint not found"),
        (["--ckpt", str(bad)], "not a readable PyTorch checkpoint"),
        (
            ["--ckpt", str(ckpt), "--codebook-size", "1024"],
            "checkpoint has codebook_size 64, expected 1024",
        ),
        (["--ckpt", str(ckpt), "--data", str(empty)], "no usable image"),
        (["--ckpt", str(ckpt), "--data", str(broken)], "1 files could not be decoded"),
        (["--ckpt", str(ckpt), "--data", str(tmp_path / "nope")], "does not exist"),
        (["--ckpt", str(ckpt), "--device", "tpu"], "unknown device 'tpu'; use cpu, cuda"),
        (["--ckpt", str(ckpt), "--image-size", "30"], "multiple of the down factor 4"),
        (["--ckpt", str(ckpt), "--temperature", "0"], "--temperature must be > 0, got 0"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--ckpt", str(ckpt), "--device", "cuda"], "CUDA is not available"))
    for args, message in cases:
        assert main([*base, *args]) == 1, args
        err = capsys.readouterr().err
        assert "vqkit analyze: error:" in err and message in err, (args, err)
    assert not (tmp_path / "o" / "summary.json").exists()
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--output-dir", str(tmp_path)])  # no --ckpt
    assert e.value.code == 2


# ------------------------------------------------------------------------------ distributed
def _ddp_analyze(rank, world, model, x):
    shard = x[rank::world]  # each process encodes its own images
    r = analyze(model, DataLoader(shard, batch_size=3), progress=False)
    return r.summary(), r.counts, r.distinct_codes_per_position


@pytest.mark.distributed
def test_two_processes_agree_with_one(tmp_path):
    from tests.dist_utils import run_distributed

    model = tiny_model()
    x = tiny_images(12)
    spread_codebook(model, x)
    (s0, c0, p0), (s1, c1, p1) = run_distributed(_ddp_analyze, 2, model, x, timeout=120)
    assert s0 == s1 and torch.equal(c0, c1) and torch.equal(p0, p1)
    one = analyze(model, DataLoader(x, batch_size=12), progress=False)
    assert torch.equal(c0, one.counts)
    assert torch.equal(p0, one.distinct_codes_per_position)
    assert s0["whole_set"] == pytest.approx(one.summary()["whole_set"])
    assert s0["images"] == 12 and s0["per_batch"]["batches"] == 4  # 2 batches on each process
    assert s0["reconstruction"]["l1"] == pytest.approx(one.reconstruction_l1, rel=1e-5)


def test_seed_002_option_names_are_aliases(fitted, tmp_path, capsys):
    """Seed 002's tool was run as `--model_path ... --data_dir ... --output_dir ...
    --image_size ... --batch_size ... --plot --save_details`; vqkit analyze takes that line."""
    ckpt, folder = fitted
    out = tmp_path / "seed002"
    argv = ["analyze", "--model_path", str(ckpt), "--data_dir", str(folder)]
    argv += ["--output_dir", str(out), "--image_size", "32", "--batch_size", "4"]
    assert main([*argv, "--save_details", "--temperature", "1.0", "--device", "cpu"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert str(folder) in s["data"] and s["batch_size"] == 4 and s["image_size"] == 32
    assert (out / "codes.csv").exists() and (out / "indices.npy").exists()

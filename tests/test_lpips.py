"""vqkit's LPIPS against outputs of the real lpips.LPIPS(net="vgg") stored in a fixture.

The fixture (tests/fixtures/make_lpips_reference.py, run where torchvision imports) holds the
reference distances for random VGG16 weights replayed from a seed and the real LPIPS v0.1
linear weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from vqkit.losses import LPIPS, VGG16Features, WeightsNotFoundError, perceptual
from vqkit.losses.perceptual import lpips_lin_weights_path, vgg16_weights_path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
_spec = importlib.util.spec_from_file_location(
    "make_lpips_reference", FIXTURES / "make_lpips_reference.py"
)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

TOL = 1e-5


@pytest.fixture(scope="module")
def fixture():
    return torch.load(ref.FIXTURE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def vgg_state(fixture):
    state = ref.random_vgg16_state_dict(fixture["vgg_seed"])
    assert ref.state_dict_sha256(state) == fixture["vgg_sha256"], (
        f"torch {torch.__version__} replays different random VGG weights than "
        f"{fixture['generated_with']['torch']} did: regenerate the fixture"
    )
    return state


@pytest.fixture(scope="module")
def model(fixture, vgg_state):
    lp = LPIPS(pretrained=False)
    lp.net.load_torchvision_state_dict(vgg_state)
    lp.load_lin_state_dict(fixture["lin"])
    return lp


def _max_diffs(lp, fixture, batches=(0, 1), per_layer=False):
    """Max |lp - reference| over the chosen batches: distances, and per-layer terms if asked."""
    d_max = layer_max = 0.0
    with torch.no_grad():
        for i in batches:
            batch = fixture["batches"][i]
            x, y = ref.to_model_range(batch["x"]), ref.to_model_range(batch["y"])
            d_max = max(d_max, (lp(x, y) - batch["distance"]).abs().max().item())
            if per_layer:
                terms = lp.layer_distances(x, y)
                layer_max = max(layer_max, (terms - batch["per_layer"]).abs().max().item())
    return d_max, layer_max


def test_vgg16_features_have_torchvision_keys_and_shapes(fixture):
    ours = {
        f"features.{k}": list(v.shape) for k, v in VGG16Features().features.state_dict().items()
    }
    theirs = {
        k: v for k, v in fixture["torchvision_vgg16_shapes"].items() if k.startswith("features.")
    }
    assert ours == theirs
    assert len(ours) == 26  # 13 convs


def test_matches_lpips_reference(model, fixture):
    d_max, layer_max = _max_diffs(model, fixture, per_layer=True)
    print(f"max |vqkit - lpips|: distance {d_max:.3g}, per layer {layer_max:.3g}")
    assert d_max < TOL and layer_max < TOL
    # The reference is not trivially small: the pairs differ and are ranked.
    dists = torch.cat([b["distance"] for b in fixture["batches"]])
    assert dists.min() > 1e-3
    assert fixture["batches"][0]["distance"].argmax() == 1  # another image > noise or a shift


def test_float64_module_matches_reference(model, fixture):
    lp = LPIPS(pretrained=False)
    lp.load_state_dict(model.state_dict())
    lp.double()
    d_max, _ = _max_diffs(lp, fixture, batches=(1,))  # float32 inputs are cast to float64
    assert d_max < TOL


def test_identical_images_give_zero_and_distance_is_symmetric(model):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(2, 3, 32, 32, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        assert torch.equal(model(x, x), torch.zeros(2))
        d_xy, d_yx = model(x, y), model(y, x)
    assert (d_xy > 0).all()
    torch.testing.assert_close(d_xy, d_yx, rtol=1e-5, atol=1e-7)


def test_reductions_normalize_and_loss(model):
    g = torch.Generator().manual_seed(1)
    x, y = (torch.rand(2, 2, 3, 32, 32, generator=g) * 2 - 1).unbind(0)
    with torch.no_grad():
        per_image = model(x, y)
        assert per_image.shape == (2,)
        torch.testing.assert_close(model.loss(x, y), per_image.mean())
        torch.testing.assert_close(model(x * 0.5 + 0.5, y * 0.5 + 0.5, normalize=True), per_image)
        lp_mean = LPIPS(pretrained=False, reduction="mean")
        lp_mean.load_state_dict(model.state_dict())
        mean = lp_mean(x, y)
        assert mean.shape == ()
        torch.testing.assert_close(mean, per_image.mean())
    with pytest.raises(ValueError, match="reduction must be"):
        LPIPS(pretrained=False, reduction="avg")


def test_gradient_reaches_input_and_parameters_stay_frozen(model):
    assert all(not p.requires_grad for p in model.parameters())
    model.train()  # e.g. called by the training module that owns it
    assert not model.training and not model.net.training
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    model.loss(x, y).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    # The gradient is that of the distance: a small step against it lowers the loss.
    with torch.no_grad():
        before = model.loss(x, y)
        after = model.loss(x - 1e-2 * x.grad / x.grad.norm(), y)
    assert after < before


def test_autocast_bfloat16_stays_finite_and_close(model, fixture):
    batch = fixture["batches"][0]
    x, y = ref.to_model_range(batch["x"]), ref.to_model_range(batch["y"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        d = model(x, y)
        same = model(x, x)
    assert d.dtype == torch.float32
    assert torch.isfinite(d).all() and torch.equal(same, torch.zeros(3))
    torch.testing.assert_close(d, batch["distance"], rtol=0.1, atol=1e-3)


def test_bad_inputs_name_the_shapes(model):
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got \(1, 1, 32, 32\)"):
        model(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"same shape, got \(1, 3, 32, 32\) and \(2, 3, 32, 32\)"):
        model(x, torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"H and W >= 16"):
        model(torch.zeros(1, 3, 8, 32), torch.zeros(1, 3, 8, 32))
    with pytest.raises(ValueError, match="float images"):
        model(x.to(torch.uint8), x.to(torch.uint8))


def test_missing_vgg_weights_error_names_file_and_places(tmp_path, monkeypatch):
    monkeypatch.delenv(perceptual.VGG16_ENV, raising=False)
    monkeypatch.setenv("VQKIT_OFFLINE", "1")  # downloading: tests/test_download.py
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    assert expected.parent.parent.parent == tmp_path / "torch"
    with pytest.raises(WeightsNotFoundError) as err:
        LPIPS.from_pretrained()
    assert isinstance(err.value, FileNotFoundError)
    message = str(err.value)
    assert str(expected) in message and "VQKIT_VGG16" in message and "vgg_path" in message
    assert perceptual.VGG16_URL in message and "VQKIT_OFFLINE=1" in message

    missing = tmp_path / "elsewhere" / "vgg16.pth"
    monkeypatch.setenv(perceptual.VGG16_ENV, str(missing))
    with pytest.raises(
        WeightsNotFoundError, match=f"no file at {missing} \\(from \\$VQKIT_VGG16\\)"
    ):
        LPIPS()


def test_missing_lin_weights_error_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv(perceptual.LPIPS_LIN_ENV, raising=False)
    monkeypatch.setenv("VQKIT_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(perceptual, "_lpips_package_weights", lambda: None)
    with pytest.raises(WeightsNotFoundError) as err:
        lpips_lin_weights_path()
    message = str(err.value)
    assert "lpips/weights/v0.1/vgg.pth" in message
    assert "pip install --no-deps lpips==0.1.4" in message and "VQKIT_LPIPS_LIN" in message
    assert perceptual.LPIPS_LIN_URL in message
    with pytest.raises(WeightsNotFoundError, match="from lin_path"):
        lpips_lin_weights_path(tmp_path / "vgg.pth")


def test_from_pretrained_reads_torchvision_file_from_hub_cache_and_env(
    tmp_path, monkeypatch, fixture, vgg_state
):
    # A torchvision-format file: features plus a classifier (tiny stand-ins here), ignored.
    state = dict(vgg_state)
    for key in fixture["torchvision_vgg16_shapes"]:
        if key.startswith("classifier."):
            state[key] = torch.zeros(2)
    monkeypatch.delenv(perceptual.VGG16_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    hub_file.parent.mkdir(parents=True)
    torch.save(state, hub_file)
    lin_file = tmp_path / "lin.pth"
    torch.save(fixture["lin"], lin_file)

    assert vgg16_weights_path() == hub_file
    lp = LPIPS.from_pretrained(lin_path=lin_file)
    d_max, _ = _max_diffs(lp, fixture, batches=(1,))
    assert d_max < TOL

    env_file = tmp_path / "mine.pth"
    hub_file.rename(env_file)
    monkeypatch.setenv(perceptual.VGG16_ENV, str(env_file))
    monkeypatch.setenv(perceptual.LPIPS_LIN_ENV, str(lin_file))
    assert vgg16_weights_path() == env_file
    assert lpips_lin_weights_path() == lin_file
    with pytest.raises(WeightsNotFoundError, match="from vgg_path"):  # an explicit path wins
        vgg16_weights_path(tmp_path / "explicit.pth")


def test_wrong_state_dicts_are_rejected(vgg_state):
    net = VGG16Features()
    with pytest.raises(ValueError, match="torchvision vgg16 state dict"):
        net.load_torchvision_state_dict({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)})
    incomplete = {k: v for k, v in vgg_state.items() if k != "features.28.weight"}
    with pytest.raises(RuntimeError, match="features.28.weight|28.weight"):
        net.load_torchvision_state_dict(incomplete)
    with pytest.raises(ValueError, match="lin0..lin4"):
        LPIPS(pretrained=False).load_lin_state_dict(
            {"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}
        )


@pytest.mark.skipif(importlib.util.find_spec("lpips") is None, reason="lpips is not installed")
def test_lin_weights_read_from_installed_lpips_wheel_without_importing_it(fixture):
    imported_before = "lpips" in sys.modules
    path = lpips_lin_weights_path()
    assert path.as_posix().endswith("lpips/weights/v0.1/vgg.pth")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == fixture["lin_file_sha256"]
    lp = LPIPS(pretrained=False)
    lp.load_lin_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    for k, lin in enumerate(lp.lins):
        assert torch.equal(lin.weight, fixture["lin"][f"lin{k}.model.1.weight"])
    assert ("lpips" in sys.modules) == imported_before

"""Code-space sampling and editing (``vqkit.evaluation.sampling``) and ``vqkit sample``."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqkit.cli import main
from vqkit.evaluation.sampling import (
    code_distribution,
    decode_codes,
    half_mask,
    mix_codes,
    perturb_codes,
    sample_codes,
)
from vqkit.models import ResNetVQModel
from vqkit.quantize import VectorQuantizer


def _model(k: int = 16) -> ResNetVQModel:
    torch.manual_seed(0)
    q = VectorQuantizer(dim=8, codebook_size=k, channel_first=True)
    return ResNetVQModel(q, resolution=16, base_channels=8, channel_mult=(1, 2), z_channels=8)


def test_code_distribution_from_validation_counts_or_uniform():
    model = _model()
    uniform = code_distribution(model, "uniform")
    assert uniform.dtype == torch.float64
    assert torch.allclose(uniform, torch.full((16,), 1 / 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="no validation code counts"):
        code_distribution(model, "usage")
    model.quantizer.usage.eval_counts[:] = 0
    model.quantizer.usage.eval_counts[3] = 30
    model.quantizer.usage.eval_counts[5] = 10
    p = code_distribution(model)
    assert p[3] == 0.75 and p[5] == 0.25 and p.sum() == 1
    with pytest.raises(ValueError, match="source must be one of"):
        code_distribution(model, "prior")


def test_sample_codes_follow_the_distribution_and_the_seed():
    probs = torch.zeros(16, dtype=torch.float64)
    probs[2], probs[9] = 0.8, 0.2
    codes = sample_codes(probs, 50, (4, 6), seed=1)
    assert codes.shape == (50, 4, 6) and codes.dtype == torch.int64
    assert set(codes.unique().tolist()) == {2, 9}
    share = float((codes == 2).double().mean())
    assert abs(share - 0.8) < 0.04  # 1,200 draws: 4 standard deviations
    assert torch.equal(codes, sample_codes(probs, 50, (4, 6), seed=1))
    assert not torch.equal(codes, sample_codes(probs, 50, (4, 6), seed=2))
    with pytest.raises(ValueError, match="num must be >= 1"):
        sample_codes(probs, 0, (4, 4))
    with pytest.raises(ValueError, match="not all zero"):
        sample_codes(torch.zeros(4), 1, (2, 2))
    with pytest.raises(ValueError, match="grid must be two positive sizes"):
        sample_codes(probs, 1, (0, 4))


def test_perturb_redraws_exactly_the_asked_share_of_positions():
    codes = torch.arange(2 * 4 * 5).view(2, 4, 5) % 7
    probs = torch.zeros(16, dtype=torch.float64)
    probs[15] = 1.0  # every redraw is code 15, which the originals never use
    edited, mask = perturb_codes(codes, 0.25, probs, seed=0)
    assert mask.shape == codes.shape and mask.view(2, -1).sum(1).tolist() == [5, 5]
    assert torch.equal(edited[~mask], codes[~mask])
    assert bool((edited[mask] == 15).all())
    assert torch.equal(perturb_codes(codes, 0.0, probs)[0], codes)
    assert bool((perturb_codes(codes, 1.0, probs)[0] == 15).all())
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        perturb_codes(codes, 1.5, probs)


def test_half_masks_and_mixing():
    right = half_mask((3, 5), "right")
    assert right.tolist()[0] == [False, False, False, True, True]
    assert half_mask((3, 5), "left").tolist()[0] == [True, True, False, False, False]
    assert half_mask((5, 2), "bottom").sum() == 4 and half_mask((5, 2), "top")[:2].all()
    a, b = torch.zeros(2, 3, 5, dtype=torch.long), torch.ones(2, 3, 5, dtype=torch.long)
    mixed = mix_codes(a, b, right)
    assert torch.equal(mixed[:, :, 3:], b[:, :, 3:]) and torch.equal(mixed[:, :, :3], a[:, :, :3])
    with pytest.raises(ValueError, match="side must be"):
        half_mask((4, 4), "middle")
    with pytest.raises(ValueError, match="of one shape"):
        mix_codes(a, b[:1], right)
    with pytest.raises(ValueError, match="mask must be"):
        mix_codes(a, b, torch.ones(4, 4, dtype=torch.bool))


def test_decode_codes_equals_the_model_in_batches_and_checks_the_range():
    model = _model()
    codes = sample_codes(torch.ones(16), 5, (8, 8), seed=0)
    images = decode_codes(model, codes, batch_size=2)
    assert not model.training
    with torch.no_grad():
        expected = model.decode_indices(codes).clamp(-1, 1)
    assert images.shape == (5, 3, 16, 16)
    # batches of 2 vs 5 may take other fp32 conv kernels (2e-6 apart seen); a wrong decode is O(0.1)
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"codes must be in \[0, 16\), got \[0, 16\]"):
        decode_codes(model, torch.tensor([[[0, 16]]]))
    with pytest.raises(ValueError, match="integer codes"):
        decode_codes(model, codes.float())


# ------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A checkpoint of a 3-step `vqkit fit` of the shrunk quickstart (validation included, so
    it carries validation code counts), and its image folder."""
    from tests.test_training import fit_tiny_checkpoint

    root = tmp_path_factory.mktemp("sample_fit")
    return fit_tiny_checkpoint(root)


def test_cli_samples_and_edits(fitted, tmp_path, capsys):
    from vqkit.data.images import load_image
    from vqkit.training import load_model

    ckpt, folder = fitted
    images = sorted(folder.glob("*.png"))[:3]
    out = tmp_path / "out"
    argv = ["sample", "--ckpt", str(ckpt), "--output-dir", str(out), "--num", "10"]
    assert main([*argv, "--images", *map(str, images), "--perturb", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "32 px -> 8x8 codes of 64, codes drawn from usage" in printed
    # 10 samples in rows of 8: two rows of 32 px images shown at 128 px, 2 px apart, with row
    # labels on the left and a title above
    width, height = Image.open(out / "samples.png").size
    assert width > 8 * 130 + 2 and 2 * 130 + 2 < height < 3 * 130
    samples = np.load(out / "samples_codes.npy")
    assert samples.shape == (10, 8, 8) and samples.dtype == np.int32
    model = load_model(ckpt)
    used = set(np.flatnonzero(model.quantizer.usage.eval_counts.numpy()).tolist())
    assert set(np.unique(samples).tolist()) <= used  # drawn from the validation counts
    # edits: originals, reconstructions, perturbed, mixed
    width, height = Image.open(out / "edits.png").size
    assert width > 3 * 130 + 2 and 4 * 130 + 2 < height < 5 * 130
    edits = np.load(out / "edits_codes.npz")
    codes = model.encode(torch.stack([load_image(p, 32) for p in images]))
    np.testing.assert_array_equal(edits["codes"], codes.numpy())
    assert ((edits["perturbed"] != edits["codes"]).reshape(3, -1).sum(1) <= 32).all()
    np.testing.assert_array_equal(edits["mixed"][:, :, :4], edits["codes"][:, :, :4])
    np.testing.assert_array_equal(
        edits["mixed"][:, :, 4:], np.roll(edits["codes"], -1, 0)[:, :, 4:]
    )
    # the same seed gives the same files
    out2 = tmp_path / "out2"
    assert main(["sample", "--ckpt", str(ckpt), "--output-dir", str(out2), "--num", "10"]) == 0
    np.testing.assert_array_equal(np.load(out2 / "samples_codes.npy"), samples)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num", "-1"], "--num must be >= 0"),
        (["--num", "0"], "nothing to do"),
        (["--perturb", "2"], r"--perturb must be in \[0, 1\]"),
        (["--images", "nope.png"], "nope.png"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_cli_errors_exit_non_zero_with_a_message(fitted, tmp_path, capsys, extra, message):
    ckpt, _ = fitted
    code = main(["sample", "--ckpt", str(ckpt), "--output-dir", str(tmp_path), *extra])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("vqkit sample: error:")
    assert __import__("re").search(message, err)


def test_cli_missing_checkpoint(tmp_path, capsys):
    missing = Path(tmp_path / "missing.ckpt")
    assert main(["sample", "--ckpt", str(missing), "--output-dir", str(tmp_path)]) == 1
    assert "checkpoint not found" in capsys.readouterr().err

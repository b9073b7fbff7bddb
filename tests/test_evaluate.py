"""`vqkit evaluate`, the library's ``evaluate()`` and the validation-time ``EvaluationCallback``,
on a tokenizer trained for a few steps on a tiny image folder (shared by the whole module)."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tests.test_training import QUICKSTART, make_folder, quick_overrides, tiny_args
from vqkit.cli import build_cli, main
from vqkit.data.images import ImageFolderDataset
from vqkit.evaluation.evaluate import evaluate
from vqkit.evaluation.metrics import psnr, ssim
from vqkit.quantize.usage import usage_stats
from vqkit.training import EvaluationCallback, load_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step fit with rFID on (at most 8) validation images after every validation run."""
    root = tmp_path_factory.mktemp("eval")
    folder = make_folder(root / "images")
    out = root / "run"
    cb = (
        '--trainer.callbacks+={"class_path": "vqkit.training.EvaluationCallback", '
        f'"init_args": {{"metrics": ["rfid"], "max_images": 8, "fid_cache_dir": "{root}/fid"}}}}'
    )
    cli = build_cli(
        [
            "--config",
            str(QUICKSTART),
            *tiny_args(folder, out),
            *quick_overrides(),
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
            "--model.warmup_steps=1",
            cb,
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt = next(out.rglob("last.ckpt"))
    return cli, ckpt, folder


def _run(*argv) -> int:
    return main(["evaluate", *map(str, argv)])


def test_callback_logs_val_rfid(trained):
    cli, _, _ = trained
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, EvaluationCallback))
    assert cb.val_runs == 2  # the sanity check does not count
    value = float(cli.trainer.callback_metrics["val/rfid"])
    assert math.isfinite(value) and value > 0
    assert cb.state_dict() == {"val_runs": 2}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = next(Path(cli.trainer.log_dir).parent.glob("version_*"))
    points = EventAccumulator(str(run)).Reload().Scalars("val/rfid")
    assert len(points) == 2


def test_callback_rejects_metrics_the_module_logs():
    with pytest.raises(ValueError, match="psnr, ssim and usage are logged by the module"):
        EvaluationCallback(metrics=["psnr"])
    with pytest.raises(ValueError, match="every_n_val_epochs must be >= 1"):
        EvaluationCallback(every_n_val_epochs=0)


def test_cli_writes_metrics_json_and_markdown(trained, tmp_path, capsys):
    _, ckpt, folder = trained
    out = tmp_path / "out"
    args = ["--ckpt", ckpt, "--data", folder, "--output-dir", out, "--device", "cpu"]
    rc = _run(
        *args,
        "--metrics=psnr,ssim,rfid,usage",
        "--max-images=8",
        "--batch-size=3",
        f"--fid-cache-dir={tmp_path / 'fid'}",
        "--no-progress",
    )
    assert rc == 0, capsys.readouterr().err
    record = json.loads((out / "metrics.json").read_text())
    m = record["metrics"]
    assert record["image_size"] == 32  # read from the checkpoint's datamodule
    assert m["images"] == 8
    assert math.isfinite(m["rfid"]) and m["rfid"] > 0
    assert 0 < m["utilization"] <= 1 and m["codebook_size"] == 64
    assert m["used_codes"] == round(m["utilization"] * 64)
    assert m["tokens"] == 8 * 8 * 8  # 8 images of 8x8 tokens
    # The figures equal a direct computation on the same 8 images.
    model = load_model(ckpt)
    x = torch.stack([ImageFolderDataset(folder, 32)[i] for i in range(8)])
    with torch.no_grad():
        rec = model.decode_indices(model.encode(x)).clamp(-1, 1)
    assert m["psnr"] == pytest.approx(float(psnr(rec, x)), abs=1e-4)
    assert m["ssim"] == pytest.approx(float(ssim(rec, x)), abs=1e-4)
    assert "| rfid |" in (out / "metrics.md").read_text()


def _fake_missing_vgg(monkeypatch):
    from vqkit.losses import WeightsNotFoundError, perceptual

    def missing(*args, **kwargs):
        raise WeightsNotFoundError("VGG16 weights not found: put vgg16-397923af.pth in ~/fake")

    monkeypatch.setattr(perceptual.LPIPS, "from_pretrained", classmethod(missing))


def test_default_metrics_skip_lpips_with_a_note(trained, tmp_path, monkeypatch, capsys):
    _fake_missing_vgg(monkeypatch)
    _, ckpt, folder = trained
    out = tmp_path / "out"
    rc = _run(
        "--ckpt", ckpt, "--data", folder, "--output-dir", out, "--max-images=4", "--no-progress",
        f"--fid-cache-dir={tmp_path / 'fid'}",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "lpips skipped" in err and "vgg16-397923af.pth" in err
    record = json.loads((out / "metrics.json").read_text())
    assert "lpips" not in record["metrics"]
    assert {"psnr", "ssim", "rfid", "utilization"} <= set(record["metrics"])
    assert "vgg16-397923af.pth" in record["notes"][0]


def test_asking_for_lpips_without_weights_fails(trained, tmp_path, monkeypatch, capsys):
    _fake_missing_vgg(monkeypatch)
    _, ckpt, folder = trained
    rc = _run("--ckpt", ckpt, "--data", folder, "--output-dir", tmp_path, "--metrics=lpips")
    assert rc == 1
    assert "vgg16-397923af.pth" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("missing", [], "checkpoint not found"),
        ("corrupt", [], "not a readable PyTorch checkpoint"),
        ("metric", ["--metrics=psnr,fidd"], "unknown metric 'fidd'; valid metrics: psnr, ssim"),
        ("empty", [], "no usable image"),
        ("device", ["--device=tpu"], "unknown device 'tpu'"),
    ],
)
def test_errors_exit_non_zero_with_a_message(trained, tmp_path, capsys, case, extra, message):
    _, ckpt, folder = trained
    data = folder
    if case == "missing":
        ckpt = tmp_path / "nope.ckpt"
    elif case == "corrupt":
        ckpt = tmp_path / "bad.ckpt"
        ckpt.write_bytes(b"not a checkpoint")
    elif case == "empty":
        data = tmp_path / "empty"
        data.mkdir()
    rc = _run("--ckpt", ckpt, "--data", data, "--output-dir", tmp_path / "o", *extra)
    assert rc == 1
    assert message in capsys.readouterr().err


class FakeLPIPS(torch.nn.Module):
    """Per-image mean absolute difference, shaped like LPIPS's (B, 1, 1, 1) output."""

    def forward(self, x, y):  # noqa: ANN001, ANN201
        return (x - y).abs().mean((1, 2, 3)).view(-1, 1, 1, 1)


def test_evaluate_library_figures(trained):
    _, ckpt, folder = trained
    model = load_model(ckpt)
    loader = DataLoader(ImageFolderDataset(folder, 32), batch_size=5)
    before = model.quantizer.usage.eval_counts.clone()  # from the fit's validation runs
    res = evaluate(model, loader, ["psnr", "usage", "lpips"], lpips=FakeLPIPS())
    ds = ImageFolderDataset(folder, 32)
    x = torch.stack([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        idx = model.encode(x)
        rec = model.decode_indices(idx).clamp(-1, 1)
    assert res["images"] == 24
    assert res["psnr"] == pytest.approx(float(psnr(rec, x)), abs=1e-4)
    assert res["lpips"] == pytest.approx(float((rec - x).abs().mean()), abs=1e-5)
    ref = usage_stats(torch.bincount(idx.flatten(), minlength=64), horizon="eval")
    assert res["used_codes"] == ref.used_codes
    assert res["perplexity"] == pytest.approx(ref.perplexity)
    assert res["dead_codes"] == ref.dead_codes
    # Evaluating touches no quantizer statistics.
    assert torch.equal(model.quantizer.usage.eval_counts, before)
    capped = evaluate(model, loader, ["psnr"], max_images=7)
    assert capped["images"] == 7
    with pytest.raises(ValueError, match="unknown metric 'l1'; valid metrics"):
        evaluate(model, loader, ["l1"])

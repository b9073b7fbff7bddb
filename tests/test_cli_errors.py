"""Every user error at the command line ends in one line, ``vqkit <command>: error: ...``, and a
non-zero exit status, before training starts wherever it can be known then."""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.test_training import TINY, fit_tiny_checkpoint, make_folder, tiny_args, tiny_fit_args
from vqkit.cli import main

Q = "--model.model.init_args.quantizer.init_args."


def run(capsys, argv: list[str]) -> tuple[int, str]:
    """``vqkit argv`` in this process: (exit status, the stderr line of the error)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse / jsonargparse exit 2
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if " error: " in line]
    assert len(lines) == 1, err[-3000:]
    return int(code), lines[0]


def expect(capsys, argv: list[str], command: str, *words: str) -> str:
    code, line = run(capsys, argv)
    assert code != 0
    assert line.startswith(f"vqkit {command}: error: "), line
    for w in words:
        assert w in line, (w, line)
    return line


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images"), n=16)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    ckpt, _ = fit_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    return ckpt


def fit(folder: Path, out: Path, *extra: str) -> list[str]:
    return tiny_fit_args(folder, out, 2, *extra)


# ------------------------------------------------------------------------------- data
def test_missing_data_folder(capsys, tmp_path):
    expect(capsys, fit(tmp_path / "nope", tmp_path / "o"), "fit", "nope", "does not exist")


def test_data_root_is_a_file(capsys, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    expect(capsys, fit(f, tmp_path / "o"), "fit", "file.txt", "is not a directory")


def test_empty_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    expect(capsys, fit(tmp_path / "empty", tmp_path / "o"), "fit", "no usable image")


def test_folder_of_broken_images(capsys, tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    for i in range(5):
        (d / f"b{i}.png").write_bytes(os.urandom(100))
    expect(capsys, fit(d, tmp_path / "o"), "fit", "no usable image", "5 could not be decoded")


def test_batch_larger_than_the_data(capsys, tmp_path, folder):
    expect(
        capsys,
        fit(folder, tmp_path / "o", "--data.batch_size=64"),
        "fit",
        "batch_size=64",
        "training images",
    )


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--model.lrr=0.1"], ["lrr", "not accepted"]),
        (["--data.batch_size=many"], ["--data.batch_size", "many"]),
        ([Q + "codebook_size=abc"], [Q.removeprefix("--") + "codebook_size", "abc"]),
        ([Q + "codebook_size=-5"], ["codebook_size must be >= 2, got -5"]),
        (["--data.image_size=-1"], ["image_size must be a positive int, got -1"]),
        (["--model.model.init_args.z_channels=-4"], ["z_channels must be >= 1, got -4"]),
        (["--model.lr=-1"], ["lr must be > 0"]),
        ([Q + "ema.init_args.decay=1.5"], ["decay must be in (0, 1)"]),
        (["--data.val_fraction=1.5"], ["val_fraction must be in [0, 1)"]),
        ([Q + "ema.class_path=vqkit.NoSuchEMA"], ["ema.class_path", "NoSuchEMA"]),
        (["--trainer.max_steps=-3"], ["max_steps", "-3"]),
    ],
    ids=lambda v: v[0] if isinstance(v, list) and v and v[0].startswith("--") else None,
)
def test_bad_config_values(capsys, tmp_path, folder, extra, words):
    argv = fit(folder, tmp_path / "o", *extra)
    expect(capsys, argv, "fit", *words)
    assert not list((tmp_path / "o").rglob("*.ckpt"))  # refused before training


def test_unknown_config_file_key(capsys, tmp_path, folder):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(TINY.read_text().replace("  lr: 0.001", "  lr: 0.001\n  learning_rate: 0.1"))
    argv = ["fit", "--config", str(cfg), *tiny_args(folder, tmp_path / "o")]
    expect(capsys, argv, "fit", "learning_rate")


# ------------------------------------------------------------------------ devices, files
def test_device_that_is_not_there(capsys, tmp_path, folder):
    if torch.cuda.is_available():
        extra = ["--trainer.accelerator=cuda", f"--trainer.devices=[{torch.cuda.device_count()}]"]
    else:
        extra = ["--trainer.accelerator=cuda"]
    expect(capsys, fit(folder, tmp_path / "o", *extra), "fit")


def test_missing_weight_file(capsys, tmp_path, folder, monkeypatch):
    monkeypatch.setenv("VQKIT_VGG16", str(tmp_path / "no" / "vgg16.pth"))
    argv = fit(folder, tmp_path / "o", "--model.perceptual=vqkit.losses.LPIPS")
    expect(capsys, argv, "fit", "VGG16", str(tmp_path / "no" / "vgg16.pth"))


def test_output_folder_under_a_file(capsys, tmp_path, folder):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    expect(capsys, fit(folder, blocker / "run"), "fit", "cannot write to the output folder", "file")


def _read_only(monkeypatch, root: Path) -> None:
    """``root`` read-only: by its mode, or for root (whom modes do not stop) by refusing writes
    under it the way a read-only mount does."""
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        root.chmod(0o555)
        return
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if any(c in mode for c in "wax+") and Path(file).resolve().is_relative_to(root):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)


def test_read_only_output_folder(capsys, tmp_path, folder, monkeypatch):
    out = tmp_path / "ro"
    _read_only(monkeypatch, out)
    line = expect(capsys, fit(folder, out), "fit", "cannot write to the output folder", str(out))
    assert "Read-only" in line or "Permission denied" in line


def test_full_disk_during_training(capsys, tmp_path, folder, monkeypatch):
    """The disk fills after the first checkpoints: the run stops with one line naming the file
    and the reason, and the checkpoints written before stay whole."""
    from vqkit.training.checkpoint import checkpoint_problem

    save, calls = torch.save, []

    def full(obj, f, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if hasattr(f, "write"):
            calls.append(1)
            if len(calls) > 2:  # periodic-step=8 and last.ckpt got through
                f.write(b"PK\x03\x04 partial")
                raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    argv = tiny_fit_args(folder, out, 16)
    expect(capsys, argv, "fit", "cannot write checkpoint", "No space left on device")
    monkeypatch.setattr(torch, "save", save)
    whole = sorted(p.name for p in out.rglob("*.ckpt"))
    assert whole == ["last.ckpt", "periodic-step=8.ckpt"], whole
    assert all(checkpoint_problem(p) is None for p in out.rglob("*.ckpt"))
    assert not list(out.rglob(".*.tmp-*"))
    assert len(calls) == 3


# ---------------------------------------------------------------------------- checkpoints
def test_missing_checkpoint(capsys, tmp_path, folder):
    argv = fit(folder, tmp_path / "o", f"--ckpt_path={tmp_path / 'missing.ckpt'}")
    expect(capsys, argv, "fit", "missing.ckpt")


def test_checkpoint_whose_weights_do_not_fit(capsys, tmp_path, folder, tiny_ckpt):
    """(A checkpoint of `vqkit fit` rebuilds its own model, whatever the command line says; a
    foreign one is checked tensor by tensor.)"""
    other = tmp_path / "other.ckpt"
    ck = torch.load(tiny_ckpt, weights_only=True)
    ck["state_dict"]["model.quantizer.codebook"] = torch.zeros(32, 64)
    torch.save(ck, other)
    argv = fit(folder, tmp_path / "o", f"--ckpt_path={other}")
    expect(
        capsys,
        argv,
        "fit",
        "--ckpt_path",
        "not a checkpoint of this model",
        "model.quantizer.codebook (32, 64) vs (64, 64)",
    )
    assert not list((tmp_path / "o").rglob("*.ckpt"))


def test_checkpoint_of_another_kind(capsys, tmp_path, folder, tiny_ckpt):
    prior = tmp_path / "prior.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"tokenizer": "t"}}, prior)
    argv = fit(folder, tmp_path / "o", f"--ckpt_path={prior}")
    expect(capsys, argv, "fit", "prior checkpoint")
    out = str(tmp_path / "a")
    expect(capsys, ["analyze", "--ckpt", str(prior), "--output-dir", out], "analyze", "prior")
    gan = tmp_path / "gan.ckpt"
    ck = torch.load(tiny_ckpt, weights_only=True)
    ck["state_dict"]["discriminator.conv.weight"] = torch.zeros(4, 3, 4, 4)
    torch.save(ck, gan)
    argv = fit(folder, tmp_path / "o", f"--ckpt_path={gan}")
    expect(capsys, argv, "fit", "1 tensors the model does not have (discriminator.conv.weight)")


def test_not_a_checkpoint(capsys, tmp_path, folder):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("hello")
    out = str(tmp_path / "a")
    expect(capsys, ["analyze", "--ckpt", str(bad), "--output-dir", out], "analyze", "notes.ckpt")
    argv = fit(folder, tmp_path / "o", f"--ckpt_path={bad}")
    expect(capsys, argv, "fit", "--ckpt_path", "notes.ckpt", "not a checkpoint")


def test_analysis_device_that_is_not_there(capsys, tmp_path, tiny_ckpt):
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    argv = ["analyze", "--ckpt", str(tiny_ckpt), "--output-dir", str(tmp_path), "--device", device]
    expect(capsys, argv, "analyze", "--device")


def test_analysis_read_only_output_folder(capsys, tmp_path, tiny_ckpt, monkeypatch):
    out = tmp_path / "ro"
    _read_only(monkeypatch, out)
    argv = ["analyze", "--ckpt", str(tiny_ckpt), "--output-dir", str(out / "report")]
    expect(capsys, argv, "analyze", "report")


def test_sample_with_a_missing_checkpoint(capsys, tmp_path):
    argv = ["sample", "--ckpt", str(tmp_path / "x.ckpt"), "--output-dir", str(tmp_path)]
    expect(capsys, argv, "sample", "x.ckpt")


def test_images_for_sample_that_are_not_images(capsys, tmp_path, tiny_ckpt):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32)).save(good)
    argv = ["sample", "--ckpt", str(tiny_ckpt), "--output-dir", str(tmp_path / "s"), "--num", "0"]
    expect(capsys, [*argv, "--images", str(bad)], "sample", "bad.png")

"""Every command ends with what it found and wrote, in one console style: `vqkit prior fit` and
`vqkit fit` of a VQ-GAN end with a table and summary.json; `sample`, `analyze` and `evaluate`
with a "wrote" line per file; the lines dependencies print that no user acts on are gone at the
default verbosity and back with --verbosity debug; importing vqkit changes no filter."""

import json
import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from vqkit.cli import main
from vqkit.data.synthetic import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "quickstart_tiny.yaml"
VQGAN = ROOT / "configs" / "vqgan_quickstart.yaml"
PRIOR = ROOT / "configs" / "prior" / "quickstart.yaml"

# `vqkit` as a user runs it, on a machine with 16 cores: Lightning suggests loader workers
# only where there are more than 2 (this one may have 2)
VQKIT = (
    "import os, sys; os.sched_getaffinity = lambda pid: set(range(16)); "
    "from vqkit.cli import main; sys.exit(main())"
)
# What the tiny runs below would print without the CLI's filters (one fragment each), and the
# lines that must stay.
NOISE = {
    "device lines": "GPU available: ",
    "TPU line": "TPU available: ",
    "cloud tips": "Tip: ",
    "Lightning's _pytree deprecation": "isinstance(treespec, LeafSpec)",
    "num_workers hint": "does not have many workers",
    "short epoch vs logging interval": "is smaller than the logging interval",
    "frozen loss network in eval mode": "module(s) in eval mode at the start of training",
}
KEPT = ("Trainer.fit` stopped: `max_steps=",)
CPU = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32-true",
    "--data.num_workers=0",
    "--data.batch_size=4",
    "--data.image_size=32",
    "--data.val_fraction=0.25",
]
FAKE_PERCEPTUAL = '--model.perceptual={"class_path": "tests.test_vqgan.FakePerceptual"}'


def _vqkit_process(*args: str, **kw) -> dict:  # noqa: ANN003
    env = {**os.environ, "COLUMNS": "240", "VQKIT_OFFLINE": "1"}
    for name in ("VQKIT_LOG_LEVEL", "PYTHONWARNINGS"):
        env.pop(name, None)
    # cwd: tests.test_vqgan.FakePerceptual is importable
    return dict(args=[sys.executable, "-c", VQKIT, *args], text=True, env=env, cwd=ROOT, **kw)


def _vqkit(*args: str) -> tuple[str, str]:
    """(stdout, stderr) of a `vqkit` process (fails the test on a non-zero exit)."""
    proc = subprocess.run(**_vqkit_process(*args, capture_output=True, timeout=600))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def _fit_args(config: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(config),
        *CPU,
        f"--data.root={images}",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.log_every_n_steps=5",  # 3 training batches an epoch: Lightning warns
        *extra,
    ]


def _run_folder(out: Path) -> Path:
    (folder,) = out.glob("tensorboard/version_*")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), 16, 40, 0)


@pytest.fixture(scope="module")
def debug_process(images, tmp_path_factory):
    """A 2-step tiny VQ-VAE fit with a frozen perceptual net on images decoded as they are read,
    with --verbosity debug, started at once to run beside the fits below: (process, the file of
    its stdout and stderr)."""
    out = tmp_path_factory.mktemp("debug")
    console = out / "console.txt"
    args = _fit_args(TINY, images, out, "--trainer.max_steps=2", "--trainer.val_check_interval=2")
    with open(console, "w") as f:
        proc = subprocess.Popen(
            **_vqkit_process("--verbosity", "debug", *args, FAKE_PERCEPTUAL, stdout=f, stderr=f)
        )
    yield proc, console
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def debug_run(debug_process) -> str:
    """What the --verbosity debug fit printed."""
    proc, console = debug_process
    proc.wait(timeout=600)
    printed = console.read_text()
    assert proc.returncode == 0, printed[-3000:]
    return printed


@pytest.fixture(scope="module")
def vqgan_run(images, debug_process, tmp_path_factory):
    """A 3-step VQ-GAN fit (discriminator from step 1, a frozen perceptual net, validation at
    step 3) at the default verbosity: (run folder, stdout, stderr). Its checkpoint is the
    tokenizer of the tests below. (``debug_process``: started first, runs alongside.)"""
    out = tmp_path_factory.mktemp("vqgan")
    q = "--model.model.init_args.quantizer.init_args."
    stdout, stderr = _vqkit(
        *_fit_args(VQGAN, images, out),
        "--data.cache_images=true",  # decoded once: the num_workers hint does not apply
        f"{q}codebook_size=64",
        "--model.model.init_args.base_channels=16",
        "--model.adversarial.init_args.discriminator.init_args.base_channels=16",
        "--model.adversarial.init_args.disc_start=1",
        "--model.warmup_steps=1",
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
        FAKE_PERCEPTUAL,
    )
    return _run_folder(out), stdout, stderr


@pytest.fixture(scope="module")
def tokenizer(vqgan_run) -> Path:
    return next(vqgan_run[0].rglob("last.ckpt"))


@pytest.fixture(scope="module")
def prior_run(tokenizer, tmp_path_factory):
    """A 4-step `vqkit prior fit` (validated at steps 2 and 4) of the tiny prior on the VQ-GAN's
    codes at the default verbosity: (run folder, stdout, stderr)."""
    out = tmp_path_factory.mktemp("prior")
    stdout, stderr = _vqkit(
        "prior",
        "fit",
        "--config",
        str(PRIOR),
        f"--model.tokenizer={tokenizer}",
        "--model.n_layer=1",
        "--model.n_head=2",
        "--model.n_embd=16",
        "--model.warmup_steps=1",
        "--model.num_log_samples=0",
        "--data.batch_size=4",
        f"--data.cache_dir={out / 'cache'}",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.log_every_n_steps=50",  # 6 training batches an epoch: Lightning warns
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
    )
    return _run_folder(out), stdout, stderr


# ------------------------------------------------------------------------------ summaries
def test_prior_fit_ends_with_a_table_and_summary_json(prior_run):
    folder, stdout, stderr = prior_run
    s = json.loads((folder / "summary.json").read_text())
    assert 0 < s["val_nll"] < 10
    assert s["bits_per_code"] == pytest.approx(s["val_nll"] / math.log(2), rel=1e-5)
    assert s["perplexity"] == pytest.approx(math.exp(s["val_nll"]), rel=1e-5)
    assert 0 < s["unigram_bits"] <= 6  # 64 codes: at most 6 bits
    assert s["codebook_size"] == 64 and s["token_grid"] == [8, 8] and s["steps"] == 4
    # 4 training batches of 4 grids of 8x8 codes, per second of training steps
    assert s["train_codes"] == 4 * 4 * 64
    # train_seconds is rounded to 1 ms: tokens/s from the unrounded time lies within that
    lo, hi = s["train_seconds"] - 5e-4, s["train_seconds"] + 5e-4
    assert s["train_codes"] / hi <= s["tokens_per_second"] <= s["train_codes"] / max(lo, 1e-9)
    assert " cores, " in s["machine"] and "torch " in s["machine"]
    samples = Path(s["files"]["samples"])
    assert samples == folder / "samples.png"
    with Image.open(samples) as im:  # 16 decoded samples
        assert im.format == "PNG" and im.width > 4 * 32 and im.height > 32
    assert Path(s["files"]["summary"]) == folder / "summary.json"
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]  # written whole
    # the table, after the progress bar that counts steps (not "Epoch 0/-2")
    for row in ("vqkit prior fit summary", "bits_per_code", "unigram_bits", "tokens_per_second"):
        assert row in stdout, row
    assert f"samples: {samples}" in stdout and f"summary: {folder / 'summary.json'}" in stdout
    assert "Step 4/4" in stdout and "/-2" not in stdout


def test_vqgan_fit_ends_with_a_table_and_summary_json(vqgan_run):
    folder, stdout, _ = vqgan_run
    s = json.loads((folder / "summary.json").read_text())
    assert s["steps"] == 3 and s["codebook_size"] == 64 and s["train_images"] == 12
    assert {"val_l1", "psnr", "perplexity", "images_per_second", "machine"} <= set(s)
    assert Path(s["files"]["reconstructions"]).is_file()
    assert "vqkit fit summary" in stdout and "images_per_second" in stdout


def _wrote(printed: str) -> list[Path]:
    return [Path(line[6:]) for line in printed.splitlines() if line.startswith("wrote ")]


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def _assert_ends_with_what_it_wrote(printed: str, folder: Path) -> None:
    wrote = _wrote(printed)
    assert set(wrote) == _files(folder) and len(wrote) == len(set(wrote))
    tail = printed.rstrip("\n").splitlines()[-len(wrote) :]
    assert all(line.startswith("wrote ") for line in tail), tail


def test_sample_analyze_and_evaluate_end_with_the_paths_they_wrote(
    tokenizer, prior_run, images, tmp_path, capsys
):
    prior = next(prior_run[0].rglob("last.ckpt"))
    some = sorted(map(str, images.glob("*.png")))[:2]
    out = tmp_path / "sample"
    argv = ["sample", "--ckpt", str(tokenizer), "--prior", str(prior), "--output-dir", str(out)]
    assert main([*argv, "--num", "2", "--images", *some]) == 0
    _assert_ends_with_what_it_wrote(capsys.readouterr().out, out)
    assert {p.name for p in _files(out)} == {
        "samples.png",
        "samples_codes.npy",
        "edits.png",
        "edits_codes.npz",
    }

    common = ["--ckpt", str(tokenizer), "--data", str(images), "--max-images", "8"]
    out = tmp_path / "analyze"
    assert main(["analyze", *common, "--output-dir", str(out), "--save-details", "--plot"]) == 0
    _assert_ends_with_what_it_wrote(capsys.readouterr().out, out)
    assert {"summary.json", "indices.npy", "codes.csv"} <= {p.name for p in _files(out)}

    out = tmp_path / "evaluate"
    assert main(["evaluate", *common, "--output-dir", str(out), "--metrics", "psnr,usage"]) == 0
    _assert_ends_with_what_it_wrote(capsys.readouterr().out, out)
    assert {p.name for p in _files(out)} == {"metrics.json", "metrics.md"}


def test_evaluate_draws_a_rich_bar_on_a_terminal(tokenizer, images, monkeypatch, capsys):
    import torch
    from torch.utils.data import DataLoader

    from vqkit.data.images import ImageFolderDataset
    from vqkit.evaluation.evaluate import evaluate
    from vqkit.training import load_model

    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: stderr is a terminal
    monkeypatch.setitem(sys.modules, "tqdm", None)  # not needed
    model = load_model(tokenizer)
    loader = DataLoader(ImageFolderDataset(images, 32), batch_size=4)
    out = evaluate(model, loader, ["psnr"], device=torch.device("cpu"), progress=True)
    assert out["images"] == 16
    err = capsys.readouterr().err
    assert "evaluating" in err and "16/16" in err
    evaluate(model, loader, ["psnr"], device=torch.device("cpu"), max_images=6, progress=True)
    assert "6/6" in capsys.readouterr().err  # the bar's total is the images evaluated


# ------------------------------------------------------------------------------ the noise
@pytest.mark.parametrize("run", ["vqgan_run", "prior_run"])
def test_default_verbosity_drops_the_noise(run, request):
    _, stdout, stderr = request.getfixturevalue(run)
    printed = stdout + stderr
    shown = [what for what, fragment in NOISE.items() if fragment in printed]
    assert not shown, f"{shown} in\n{printed[-4000:]}"
    assert all(line in printed for line in KEPT)


def test_verbosity_debug_shows_everything(debug_run):
    missing = [what for what, fragment in NOISE.items() if fragment not in debug_run]
    assert not missing, f"{missing} missing from\n{debug_run[-4000:]}"
    assert all(line in debug_run for line in KEPT)


@pytest.fixture
def lightning_log():
    """The messages that reach handlers of Lightning's loggers; the CLI's filters removed
    afterwards."""
    from vqkit.training.console import NOISY_LOGGERS, _DropNoise

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep()
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)
        for f in [f for f in logger.filters if isinstance(f, _DropNoise)]:
            logger.removeFilter(f)


@pytest.mark.parametrize("level", ["INFO", "WARNING", "debug"])
def test_the_filters_drop_only_the_noise_unless_debug(level, lightning_log):
    from vqkit.training.console import quiet_dependencies, quiet_worker_hint

    info = "lightning.pytorch.utilities.rank_zero"  # rank_zero_info
    logged = [
        (info, "💡 Tip: For seamless cloud logging and experiment tracking, try litlogger"),
        (info, "GPU available: True (cuda), used: True"),
        (info, "TPU available: False, using: 0 TPU cores"),
        ("lightning.pytorch.accelerators.cuda", "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]"),
        (info, "`Trainer.fit` stopped: `max_steps=4` reached."),
    ]
    warned = [
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`",
        "The number of training batches (3) is smaller than the logging interval "
        "Trainer(log_every_n_steps=4).",
        "Found 3 module(s) in eval mode at the start of training. This may lead to ...",
        "The 'train_dataloader' does not have many workers which may be a bottleneck.",
        "GPU available but not used. You can set it by doing `Trainer(accelerator='gpu')`.",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_dependencies(level)
        quiet_worker_hint(level)
        for name, line in logged:
            logging.getLogger(name).info(line)
        for message in warned:
            warnings.warn(message, UserWarning, stacklevel=1)
    seen = lightning_log + [str(w.message) for w in caught]
    if level == "debug":
        assert seen == [line for _, line in logged] + warned
    else:  # what a user acts on stays: why training stopped, a GPU left unused
        assert seen == [logged[-1][1], warned[-1]]


def test_worker_hint_dropped_only_for_data_in_memory():
    from types import SimpleNamespace

    from vqkit.cli import _data_in_memory
    from vqkit.prior import TokenDataModule

    assert _data_in_memory(TokenDataModule())  # the prior's code grids
    assert _data_in_memory(SimpleNamespace(cache_images=True))
    assert _data_in_memory(SimpleNamespace(cache_images="memory"))
    assert not _data_in_memory(SimpleNamespace(cache_images=False))  # decoded as read: it matters
    assert not _data_in_memory(SimpleNamespace(cache_images="disk"))  # read per item: it matters


def test_importing_vqkit_changes_no_filter():
    code = """
import logging, warnings
import lightning.pytorch  # its own filters, set when it is imported

NAMES = ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero",
         "lightning.fabric.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")

def state():
    return list(warnings.filters), {n: list(logging.getLogger(n).filters) for n in NAMES}

before = state()
import vqkit, vqkit.cli, vqkit.evaluation.evaluate, vqkit.prior.callbacks, vqkit.tokens
import vqkit.training, vqkit.training.console
from vqkit.prior import PriorModule, TokenDataModule
assert state() == before, "importing vqkit changed a filter"
vqkit.cli._setup_logging([], False)  # what the command does first
after = state()
assert after[0] != before[0] and after[1] != before[1], "the command installed no filter"
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("VQKIT_LOG_LEVEL", "PYTHONWARNINGS")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]

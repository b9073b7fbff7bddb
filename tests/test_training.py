"""The training pipeline end to end on tiny image folders the tests build."""

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from vqkit.cli import build_cli, main
from vqkit.data.synthetic import make_image_folder

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
# the quickstart shrunk so that k-means init (step 4), re-estimations (steps 6 and 12)
# and dead-code restarts all happen inside a 16-step run
TINY = Path(__file__).resolve().parent / "configs" / "quickstart_tiny.yaml"
CPU = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.strategy=auto",
    "--trainer.precision=32-true",
]


def make_folder(root: Path, n: int = 24, size: int = 40, seed: int = 0) -> Path:
    return make_image_folder(root, n, size, seed)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images"))


def tiny_args(folder: Path, out: Path, image_size: int = 32) -> list[str]:
    return [
        *CPU,
        f"--data.root={folder}",
        "--data.num_workers=0",
        "--data.batch_size=4",
        f"--data.image_size={image_size}",
        "--data.val_fraction=0.25",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
    ]


def quick_overrides() -> list[str]:
    """Shrink the quickstart model for CPU tests (same structure, fewer codes)."""
    q = "--model.model.init_args.quantizer.init_args."
    return [f"{q}codebook_size=64", "--model.model.init_args.base_channels=16"]


@pytest.fixture(scope="module")
def random_lpips_files(tmp_path_factory) -> tuple[Path, Path]:
    """Random VGG16 (torchvision format) and LPIPS linear weights: configs with
    ``vqkit.losses.LPIPS`` build on a machine without the real files."""
    from vqkit.losses.perceptual import LPIPS_CHANNELS, VGG16Features

    root = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    vgg = VGG16Features().state_dict()  # torchvision's keys: features.N.weight / bias
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS_CHANNELS)}
    torch.save(vgg, root / "vgg16.pth")
    torch.save(lin, root / "lin.pth")
    return root / "vgg16.pth", root / "lin.pth"


@pytest.fixture
def lpips_env(random_lpips_files, monkeypatch) -> None:
    monkeypatch.setenv("VQKIT_VGG16", str(random_lpips_files[0]))
    monkeypatch.setenv("VQKIT_LPIPS_LIN", str(random_lpips_files[1]))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_parses_and_instantiates(config, folder, tmp_path, lpips_env):
    cli = build_cli(["--config", str(config), *tiny_args(folder, tmp_path)], run=False)
    q = cli.model.quantizer
    assert q.codebook_size == 1024
    assert cli.datamodule.root == folder
    if "anime" in config.stem:  # seed 004: VQ-VAE + LPIPS (phase 1) and VQ-GAN, weight 0.5
        from vqkit.losses import LPIPS

        assert isinstance(cli.model.perceptual, LPIPS)
        assert cli.model.hparams.perceptual_weight == 0.5


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_fast_dev_run_of_every_config(config, folder, tmp_path, lpips_env):
    res = "--model.model.init_args.resolution"
    size = 64 if "anime" in config.stem else 32
    args = tiny_args(folder, tmp_path, image_size=size)
    if "VQGANModule" in config.read_text():
        # the second step trains the discriminator too
        args.append("--model.adversarial.init_args.disc_start=1")
    cli = build_cli(
        ["fit", "--config", str(config), *args, f"{res}={size}", "--trainer.fast_dev_run=2"]
    )
    # it trained: two optimizer steps with a finite loss, the quantizer saw them
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert cli.model.quantizer.current_step >= 2
    assert cli.trainer.state.finished


def test_misspelled_key_fails_at_parse_time_with_its_name(folder, tmp_path, capsys):
    cfg = CONFIGS[0]
    with pytest.raises(SystemExit) as e:
        build_cli(
            ["--config", str(cfg), *tiny_args(folder, tmp_path), "--model.lrr=0.1"], run=False
        )
    assert e.value.code != 0
    assert "lrr" in capsys.readouterr().err


def test_wrong_type_fails_at_parse_time(folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_cli(
            ["--config", str(CONFIGS[0]), *tiny_args(folder, tmp_path), "--data.batch_size=many"],
            run=False,
        )
    assert "batch_size" in capsys.readouterr().err


def test_missing_data_folder_errors_before_training(tmp_path):
    args = tiny_args(tmp_path / "nope", tmp_path)
    with pytest.raises((SystemExit, FileNotFoundError)) as e:
        build_cli(["--config", str(CONFIGS[0]), *args], run=False)
    assert "nope" in str(e.value) or e.type is SystemExit


def tiny_fit_args(folder: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """`vqkit fit` of the tests' tiny quickstart (k-means init at step 4, re-estimations at 6
    and 12, restarts) on ``folder`` for ``steps`` steps into ``out``."""
    return [
        "fit",
        "--config",
        str(TINY),
        *tiny_args(folder, out),
        f"--trainer.max_steps={steps}",
        *extra,
    ]


def fit_tiny_checkpoint(root: Path, *extra: str, steps: int = 6) -> tuple[Path, Path]:
    """``last.ckpt`` of a ``steps``-step `vqkit fit` of the tests' tiny quickstart (past its
    k-means init at step 4, so the checkpoint has quantized and holds a training usage history)
    on a 16-image folder made under ``root``, validated every 3 steps, and that folder."""
    folder = make_folder(root / "images", n=16)
    main(tiny_fit_args(folder, root / "run", steps, "--trainer.val_check_interval=3", *extra))
    ckpt = next((root / "run").rglob("last.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert bool(state["model.quantizer.maintenance.0.done"])  # k-means init ran
    return ckpt, folder


class StopAt(L.Callback):
    """Stops training after ``step`` optimizer steps, as an interruption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:  # noqa: ANN001, ANN002
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _config(tmp: Path, every: int) -> Path:
    """The tiny quickstart with a periodic checkpoint every ``every`` steps (save_last)."""
    import yaml

    cfg = yaml.safe_load(TINY.read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint") and "every_n_train_steps" in cb.get(
            "init_args", {}
        ):
            cb["init_args"].update(every_n_train_steps=every, save_last=True)
    path = tmp / f"quickstart_tiny_every{every}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(folder: Path, out: Path, steps: int, *extra: str, config: Path = TINY) -> None:
    main(
        [
            "fit",
            "--config",
            str(config),
            *tiny_args(folder, out),
            *quick_overrides(),
            f"--trainer.max_steps={steps}",
            "--trainer.val_check_interval=10",
            "--trainer.log_every_n_steps=5",
            "--model.warmup_steps=5",
            *extra,
        ]
    )


@pytest.mark.slow
def test_short_training_lowers_loss_writes_summary_and_reloads(folder, tmp_path):
    _fit(
        folder,
        tmp_path,
        60,
        "--model.lr=0.002",
        "--model.usage_window_steps=20",
        "--trainer.log_every_n_steps=1",
    )
    runs = sorted(tmp_path.glob("tensorboard/version_*"))
    summary = json.loads((runs[-1] / "summary.json").read_text())
    assert summary["steps"] == 60

    assert summary["codebook_size"] == 64
    assert 0 < summary["utilization"] <= 1
    for name in ("reconstructions.png", "code_usage.png"):
        assert Image.open(runs[-1] / name).size[0] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs[-1])).Reload()
    # It quantized: warm-up until k-means init at step 4, quantized after.
    quantized = [e.value for e in acc.Scalars("train/quantized")]
    assert quantized[0] == 0.0 and quantized[-1] == 1.0, quantized
    # Held-out reconstruction error falls (train loss on batches of 4 is too noisy to compare).
    val = [e.value for e in acc.Scalars("val/l1")]
    assert len(val) == 6 and val[-1] < 0.95 * val[0], val
    tags = acc.Tags()["scalars"]
    for tag in ("val/utilization", "val/perplexity", "train_window/utilization", "train/lr"):
        assert tag in tags, tag
    # The best checkpoint rebuilds its whole model from the checkpoint alone (no config file)
    # and reproduces the reconstructions of a module loaded the long way.
    from vqkit.training import VQTokenizerModule, load_model, load_tokenizer

    ckpt = next(tmp_path.rglob("best-*.ckpt"))
    cli = build_cli(["--config", str(TINY), *tiny_args(folder, tmp_path)], run=False)
    module: VQTokenizerModule = cli.model
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    module.load_state_dict(state)
    module.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loaded = load_tokenizer(ckpt)
    assert type(loaded) is VQTokenizerModule and not loaded.training
    assert loaded.quantizer.codebook_size == 64
    assert loaded.hparams.lr == 0.002
    model = load_model(ckpt)
    # The same weights go into a model the caller builds, too.
    again = load_tokenizer(
        ckpt,
        model=build_cli(
            ["--config", str(TINY), *tiny_args(folder, tmp_path)], run=False
        ).model.model,
    )
    with torch.no_grad():
        ref = module.model(x)
        torch.testing.assert_close(model(x).reconstructions, ref.reconstructions)
        torch.testing.assert_close(again.model(x).reconstructions, ref.reconstructions)
        assert not torch.equal(ref.indices, torch.zeros_like(ref.indices))


@pytest.mark.slow
def test_interrupted_then_resumed_run_matches_uninterrupted(folder, tmp_path):
    config = _config(tmp_path, every=7)
    whole, part = tmp_path / "whole", tmp_path / "part"
    _fit(folder, whole, 14, config=config)
    # Interrupted after step 9 of the same 14-step run (same schedule); last save at step 7.
    stop = (
        '--trainer.callbacks+={"class_path": "tests.test_training.StopAt", '
        '"init_args": {"step": 9}}'
    )
    _fit(folder, part, 14, stop, config=config)
    assert not list(part.rglob("periodic-step=14.ckpt"))
    ck = next(part.rglob("periodic-step=7.ckpt"))
    _fit(folder, part / "resumed", 14, f"--ckpt_path={ck}", config=config)
    a = torch.load(next(whole.rglob("periodic-step=14.ckpt")), weights_only=False)
    b = torch.load(next((part / "resumed").rglob("periodic-step=14.ckpt")), weights_only=False)
    mid = torch.load(ck, weights_only=False)["state_dict"]
    assert a["global_step"] == b["global_step"] == 14
    # The events happened: k-means init (step 4) and a re-estimation (step 6) before the
    # checkpoint at step 7, and codes replaced after it (the re-estimation at 12, restarts).
    q = "model.quantizer."
    assert bool(mid[q + "maintenance.0.done"])
    assert int(mid[q + "num_replacements"]) >= 2
    assert int(a["state_dict"][q + "num_replacements"]) > int(mid[q + "num_replacements"])
    assert not torch.equal(a["state_dict"][q + "codebook"], mid[q + "codebook"])
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(v, b["state_dict"][k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_broken_files_are_skipped_and_counted_in_the_summary(tmp_path):
    root = make_folder(tmp_path / "mixed", n=16)
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    good = (root / "img000.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("L", (40, 40), 128).save(root / "grey.png")
    Image.new("P", (40, 40), 3).save(root / "palette.gif")
    Image.fromarray(np.full((40, 40), 30000, np.uint16)).save(root / "deep.png")
    Image.new("CMYK", (40, 40), (0, 50, 100, 0)).save(root / "cmyk.jpg")
    out = tmp_path / "run"
    _fit(root, out, 6)
    summary = json.loads(next(out.rglob("summary.json")).read_text())
    assert summary["skipped_images"] == 3
    assert summary["steps"] == 6


def test_checkpoint_errors_name_the_problem(tmp_path):
    from vqkit.models import ResNetVQModel
    from vqkit.quantize import VectorQuantizer
    from vqkit.training import CheckpointError, VQTokenizerModule, load_tokenizer

    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(tmp_path / "missing.ckpt")
    bad = tmp_path / "corrupt.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_tokenizer(bad)
    torch.save({"weights": 1}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        load_tokenizer(tmp_path / "other.ckpt")

    def model(k: int) -> ResNetVQModel:
        q = VectorQuantizer(dim=8, codebook_size=k, channel_first=True)
        return ResNetVQModel(q, resolution=16, base_channels=8, channel_mult=(1, 2), z_channels=8)

    # A module built in Python: its checkpoint holds the plain hyperparameters, not the model.
    trainer = L.Trainer(
        max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.strategy.connect(VQTokenizerModule(model(16), lr=1e-3))
    trainer.save_checkpoint(tmp_path / "python.ckpt")
    with pytest.raises(CheckpointError, match="pass the model"):
        load_tokenizer(tmp_path / "python.ckpt")
    assert load_tokenizer(tmp_path / "python.ckpt", model=model(16)).hparams.lr == 1e-3
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_tokenizer(tmp_path / "python.ckpt", model=model(32))


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit --config", "data fetch", "analyze --ckpt", "evaluate --ckpt", "sample"):
        assert command in out
    assert main([]) == 2  # no command: the same list, as a usage error


def test_ckpt_path_last_resumes_the_newest_earlier_run(tmp_path, capsys):
    """Lightning's own "last" only searches the new run's version_N folder and starts over;
    vqkit's finds the earlier run's last.ckpt, so `--ckpt_path last` resumes as the README says."""
    folder = make_folder(tmp_path / "images", n=16)

    def fit(out: Path, steps: int, *extra: str) -> dict:
        main(tiny_fit_args(folder, out, steps, *extra))
        newest = max(out.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime_ns)
        return torch.load(newest, weights_only=False)

    # nothing to resume yet: a clear line, then an ordinary run from scratch
    fit(tmp_path / "run", 3, "--ckpt_path=last")
    assert "no whole checkpoint from an earlier run" in capsys.readouterr().err
    first = next((tmp_path / "run").rglob("version_0/checkpoints/last.ckpt"))
    resumed = fit(tmp_path / "run", 6, "--ckpt_path=last")
    assert f"vqkit fit: resuming {first}" in capsys.readouterr().err
    assert len(list((tmp_path / "run").rglob("last.ckpt"))) == 2  # version_0 and version_1
    explicit = fit(tmp_path / "explicit", 6, f"--ckpt_path={first}")
    assert resumed["global_step"] == explicit["global_step"] == 6
    # the first run stopped in the warm-up; k-means init (step 4) ran after the resume, from
    # the resumed reservoir
    q = "model.quantizer."
    assert not bool(torch.load(first, weights_only=False)["state_dict"][q + "maintenance.0.done"])
    assert bool(resumed["state_dict"][q + "maintenance.0.done"])
    for k, v in explicit["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, rtol=0, atol=0, msg=k)
    # validate takes the same "last" (the resumed run's, now the newest), or fails naming it
    base = ["--config", str(TINY), *tiny_args(folder, tmp_path / "run")]
    main(["validate", *base, "--ckpt_path=last"])
    second = next((tmp_path / "run").rglob("version_1/checkpoints/last.ckpt"))
    assert f"vqkit validate: using {second}" in capsys.readouterr().err
    empty = ["--config", str(TINY), *tiny_args(folder, tmp_path / "none")]
    with pytest.raises(SystemExit):
        main(["validate", *empty, "--ckpt_path=last"])
    assert "--ckpt_path last: no whole checkpoint from a run under" in capsys.readouterr().err
    # and a fresh 6-step run is a different model: the resume really continued
    scratch = fit(tmp_path / "scratch", 6)
    assert any(
        not torch.equal(scratch["state_dict"][k], v) for k, v in resumed["state_dict"].items()
    )


def test_find_last_checkpoint_searches_every_layout_and_takes_the_newest(tmp_path):
    import os
    from types import SimpleNamespace

    from vqkit.training.checkpoint import find_last_checkpoint

    def touch(path: Path, mtime: int) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
        os.utime(path, ns=(mtime, mtime))
        return path

    logger = SimpleNamespace(root_dir=str(tmp_path / "logs" / "tensorboard"))
    trainer = SimpleNamespace(
        checkpoint_callbacks=[SimpleNamespace(dirpath=str(tmp_path / "explicit"))],
        logger=logger,
        default_root_dir=str(tmp_path / "root"),
    )
    assert find_last_checkpoint(trainer) is None
    v0 = touch(tmp_path / "logs/tensorboard/version_0/checkpoints/last.ckpt", 10**18)
    assert find_last_checkpoint(trainer) == v0
    v3 = touch(tmp_path / "logs/tensorboard/version_3/checkpoints/last-v1.ckpt", 2 * 10**18)
    touch(tmp_path / "logs/tensorboard/version_3/checkpoints/periodic-step=9.ckpt", 15 * 10**17)
    assert find_last_checkpoint(trainer) == v3  # the newest of last* and periodic
    explicit = touch(tmp_path / "explicit/last.ckpt", 3 * 10**18)
    assert find_last_checkpoint(trainer) == explicit
    no_logger = touch(tmp_path / "root/checkpoints/last.ckpt", 4 * 10**18)
    assert find_last_checkpoint(trainer) == no_logger
    trainer.logger, trainer.checkpoint_callbacks = None, []
    assert find_last_checkpoint(trainer) == no_logger
    # a newest last.ckpt cut short (a kill during a write): named, skipped for the next newest
    trainer.logger = logger
    (tmp_path / "logs/tensorboard/version_3/checkpoints/last-v1.ckpt").unlink()
    bad = touch(tmp_path / "logs/tensorboard/version_4/checkpoints/last.ckpt", 5 * 10**18)
    bad.write_bytes(bad.read_bytes()[:200])
    os.utime(bad, ns=(5 * 10**18, 5 * 10**18))
    said: list[str] = []
    assert find_last_checkpoint(trainer, said.append) == no_logger
    assert len(said) == 1 and said[0].startswith(f"skipping {bad}: truncated or not a checkpoint")
    # no whole last*: the newest periodic, then the newest best
    for p in [no_logger, explicit, v0]:
        p.unlink()
    periodic = tmp_path / "logs/tensorboard/version_3/checkpoints/periodic-step=9.ckpt"
    best = touch(tmp_path / "logs/tensorboard/version_3/checkpoints/best-step=5.ckpt", 10**19)
    assert find_last_checkpoint(trainer, said.append) == periodic
    # a periodic checkpoint newer than every last* (a kill before last.ckpt was rewritten)
    v5 = tmp_path / "logs/tensorboard/version_5/checkpoints"
    newer = touch(v5 / "periodic-step=12.ckpt", 11 * 10**18)
    touch(v5 / "last.ckpt", 10 * 10**18)
    assert find_last_checkpoint(trainer, said.append) == newer
    for p in [newer, v5 / "last.ckpt"]:
        p.unlink()
    periodic.write_bytes(b"garbage")
    assert find_last_checkpoint(trainer, said.append) == best
    # leftovers of interrupted atomic writes are removed, and said so
    tmp = best.with_name(".last.ckpt.tmp-123")
    tmp.write_bytes(b"partial")
    said.clear()
    assert find_last_checkpoint(trainer, said.append) == best
    assert not tmp.exists() and said[0] == f"removed {tmp}, a checkpoint write that was interrupted"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_shipped_schedules_replace_the_whole_codebook_once_at_init(
    config, folder, tmp_path, lpips_env
):
    """Every shipped config's quantizer, its schedule scaled down by 100: exactly one
    whole-codebook replacement at its init step, by k-means init (the anime configs used to run a
    dead-mode re-estimation on the same step, which found every code dead and replaced them all
    a second time); the re-estimations run at later steps only."""
    from vqkit import KMeansInit, KMeansReestimate

    cli = build_cli(["--config", str(config), *tiny_args(folder, tmp_path)], run=False)
    q = cli.model.quantizer.train()
    k = q.codebook_size
    init = next(m for m in q.maintenance if isinstance(m, KMeansInit))
    init.warmup_steps //= 100
    every = 1
    for m in q.maintenance:
        if isinstance(m, KMeansReestimate):
            m.every, m.until = max(m.every // 100, 1), max(m.until // 100, 2)
            every = max(every, m.every)
    torch.manual_seed(0)
    events = []
    tokens = k // max(init.warmup_steps, 1) + 64  # enough for k-means at every event
    # through the init step and the first re-estimation after it
    for _ in range(init.warmup_steps + every + 1):
        q(torch.randn(tokens, q.dim, 1))  # (B, D, L) tokens, channel-first as configured
        events += q.pop_events()
    at_init = [e for e in events if e.step == init.warmup_steps]
    whole = [(e.strategy, e.step) for e in at_init if e.codes_replaced == k]
    assert whole == [("k-means init", init.warmup_steps)]
    assert all(e.codes_replaced < k for e in at_init if e.strategy != "k-means init"), at_init
    done = [e for e in events if e.strategy == "k-means re-estimation" and e.status == "done"]
    assert done, events  # they did run, after the init step
    assert all(e.step > init.warmup_steps and e.codes_replaced > 0 for e in done), done


def test_vqvae_module_perceptual_term():
    """Seed 004 phase 1: the VQ-VAE module takes a frozen perceptual module; the term is in the
    loss with its weight, the network stays frozen and in eval, and stays out of checkpoints."""
    from tests.test_vqgan import FakePerceptual
    from vqkit.models import ResNetVQModel
    from vqkit.quantize import VectorQuantizer
    from vqkit.training import VQTokenizerModule

    torch.manual_seed(0)
    q = VectorQuantizer(8, 16, channel_first=True)
    model = ResNetVQModel(q, resolution=16, base_channels=8, channel_mult=(1, 2), z_channels=8)
    fake = FakePerceptual()
    module = VQTokenizerModule(model, perceptual=fake, perceptual_weight=0.5).train()
    assert not fake.training and not any(p.requires_grad for p in fake.parameters())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = module.model(x)
    total, terms = module._reconstruction_terms(x, out)
    expected = 0.5 * fake(out.reconstructions, x).mean()
    torch.testing.assert_close(terms["perceptual"], expected)
    without = VQTokenizerModule(model)._reconstruction_terms(x, out)[0]
    torch.testing.assert_close(total, without + expected)
    assert not any(k.startswith("perceptual.") for k in module.state_dict())
    with pytest.raises(ValueError, match="perceptual_weight must be >= 0"):
        VQTokenizerModule(model, perceptual_weight=-1.0)


def test_schedules_count_forwards_with_gradient_accumulation(folder, tmp_path):
    """Documented in every config: maintenance steps are training forwards, so with
    accumulate_grad_batches=2 the quantizer counts two steps per optimizer step (k-means init at
    forward 4 is optimizer step 2)."""
    cli = build_cli(tiny_fit_args(folder, tmp_path, 3, "--trainer.accumulate_grad_batches=2"))
    assert cli.trainer.global_step == 3
    assert cli.model.quantizer.current_step == 6
    assert cli.model.quantizer.maintenance[0].is_done()


def test_atomic_save_never_leaves_a_half_file(tmp_path, monkeypatch):
    """A write that dies midway leaves the previous checkpoint whole under its name and no
    temporary file; a finished one replaces it."""
    from vqkit.training.checkpoint import AtomicCheckpointIO, atomic_save, checkpoint_problem

    path = tmp_path / "ckpts" / "last.ckpt"
    atomic_save({"state_dict": {"w": torch.ones(4)}}, path)
    assert checkpoint_problem(path) is None
    real_save = torch.save

    def dies_midway(obj, f, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # what a SIGINT during the write raises

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(4)}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(4))
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(4)}}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.zeros(4))
    # what a non-atomic writer killed midway leaves is found out without unpickling
    path.write_bytes(path.read_bytes()[:100])
    assert "truncated" in checkpoint_problem(path)


def test_ckpt_path_last_skips_a_truncated_last_for_the_newest_whole_one(folder, tmp_path, capsys):
    """A kill during a non-atomic write leaves last.ckpt cut short: `--ckpt_path last` names it,
    skips it and resumes the newest whole checkpoint (here the periodic one of step 8), where it
    used to die with a 40-line traceback. vqkit's own writes are atomic."""
    from vqkit.training.checkpoint import AtomicCheckpointIO

    out = tmp_path / "run"
    main(tiny_fit_args(folder, out, 8))
    last = next(out.rglob("last.ckpt"))
    periodic = next(out.rglob("periodic-step=8.ckpt"))
    assert not list(out.rglob(".*.tmp-*"))
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    capsys.readouterr()
    cli = build_cli(tiny_fit_args(folder, out, 10, "--ckpt_path=last"))
    err = capsys.readouterr().err
    assert f"--ckpt_path last: skipping {last}: truncated or not a checkpoint" in err
    assert f"vqkit fit: resuming {periodic}" in err
    assert cli.trainer.global_step == 10
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_too_few_images_for_a_batch_is_a_one_line_error(tmp_path, capsys):
    """27 good images and batch_size 32 used to end in a Python traceback; now one line naming
    the numbers, exit 1, before training starts. A missing folder too."""
    root = make_folder(tmp_path / "few", n=8)
    args = ["fit", "--config", str(TINY), *tiny_args(root, tmp_path / "run")]
    assert main([*args, "--data.batch_size=32"]) == 1
    err = capsys.readouterr().err
    assert "vqkit fit: error: batch_size=32 is larger than the 6 training images" in err
    assert "Traceback" not in err
    assert not list((tmp_path / "run").rglob("*.ckpt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.png").write_bytes(b"nope")
    assert main(["fit", "--config", str(TINY), *tiny_args(empty, tmp_path / "run2")]) == 1
    assert "vqkit fit: error: no usable image in" in capsys.readouterr().err


class _Touch:
    """A pickle that runs code when it is read: it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_checkpoints_are_read_safely_unless_trusted(tmp_path, capsys):
    """`vqkit analyze --ckpt someone_elses.ckpt` used to run whatever the pickle carried."""
    from vqkit.training import CheckpointError, read_checkpoint

    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _Touch(marker)}}, evil)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        read_checkpoint(evil)
    assert not marker.exists()
    argv = ["analyze", "--ckpt", str(evil), "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("vqkit analyze: error:") and "safe load refuses" in err
    assert not marker.exists()
    read_checkpoint(evil, trust=True)  # the user's explicit choice: the pickle runs
    assert marker.exists()


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(folder, tmp_path):
    """What a scheduler sends before it kills a job: the run saves last.ckpt after the current
    step, says so, exits 0, and `--ckpt_path last` carries on from there."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    vqkit = Path(sys.executable).with_name("vqkit")
    cmd = [str(vqkit), *tiny_fit_args(folder, out, 10_000)]
    env = {**os.environ, "COLUMNS": "240"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stderr:  # wait until it has quantized (k-means init at step 4)
        lines.append(line)
        if "k-means init at step 4" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, rest = proc.communicate(timeout=300)
    err = "".join(lines) + (rest or "")
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM at step " in err and "resume with --ckpt_path last" in err
    last = next(out.rglob("last.ckpt"))
    saved = torch.load(last, weights_only=True)
    step = saved["global_step"]
    assert 5 <= step < 10_000
    assert bool(saved["state_dict"]["model.quantizer.maintenance.0.done"])
    cli = build_cli(tiny_fit_args(folder, out, step + 3, "--ckpt_path=last"))
    assert cli.trainer.global_step == step + 3


class _Poison(L.Callback):
    """Makes chosen training steps non-finite: NaN in the encoder output (the quantizer's
    input), in the loss (the decoder's output), or in one gradient."""

    def __init__(self, where: str, steps: list[int]) -> None:
        self.where, self.steps = where, set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        model = pl_module.model
        poison = trainer.global_step in self.steps
        for attr in ("_poison_handle",):
            handle = getattr(self, attr, None)
            if handle is not None:
                handle.remove()
                setattr(self, attr, None)
        if not poison:
            return
        if self.where == "input":
            hook = model.quant_conv.register_forward_hook(lambda m, i, o: o * float("nan"))
        elif self.where == "loss":
            hook = model.decoder.register_forward_hook(lambda m, i, o: o + float("inf"))
        else:
            p = next(model.decoder.parameters())
            hook = p.register_hook(lambda g: g * float("nan"))
        self._poison_handle = hook


def _finite_state(module) -> bool:  # noqa: ANN001
    return all(
        bool(torch.isfinite(v.float()).all())
        for v in module.state_dict().values()
        if torch.is_floating_point(v)
    )


@pytest.mark.parametrize("mode", ["ema", "gradient"])
@pytest.mark.parametrize("where", ["input", "loss", "gradient"])
def test_non_finite_steps_are_skipped_and_counted(folder, tmp_path, where, mode):
    """NaN/Inf injected into the quantizer's input, the loss or a gradient, after k-means init:
    the step is skipped and counted, training goes on, and the codebook, EMA statistics and
    reservoirs never take a non-finite value."""
    import yaml

    cfg = yaml.safe_load(TINY.read_text())
    if mode == "gradient":
        cfg["model"]["model"]["init_args"]["quantizer"]["init_args"]["ema"] = None
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    poison = _Poison(where, [5, 6])
    cli = build_cli(
        [
            "--config",
            str(config),
            *tiny_args(folder, tmp_path / "run"),
            "--trainer.max_steps=8",
        ],
        run=False,
    )
    cli.trainer.callbacks.append(poison)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    module = cli.model
    assert module.quantizer.maintenance[0].is_done()  # it had quantized before the poison
    assert int(module.skipped_steps) == 2
    assert _finite_state(module)
    # a skipped step updates no weight but still counts as a step of max_steps
    assert cli.trainer.global_step == 8


def test_too_many_bad_steps_in_a_row_stop_the_run(folder, tmp_path):
    cli = build_cli(
        [
            "--config",
            str(TINY),
            *tiny_args(folder, tmp_path / "run"),
            "--trainer.max_steps=30",
            "--model.max_bad_steps=3",
        ],
        run=False,
    )
    cli.trainer.callbacks.append(_Poison("loss", list(range(5, 30))))
    with pytest.raises(
        FloatingPointError,
        match=r"3 training steps in a row were not finite "
        r"\(max_bad_steps=3\), the last at step 7: training loss is inf "
        r"\(first non-finite term l1",
    ):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert _finite_state(cli.model)


def test_fp16_overflow_is_left_to_the_grad_scaler():
    """Under fp16 AMP the grad scaler skips overflowing steps while it calibrates its scale;
    the module must not count those (10 in a row at the start would stop a healthy run)."""
    from types import SimpleNamespace

    from vqkit.models import ResNetVQModel
    from vqkit.quantize import VectorQuantizer
    from vqkit.training import VQTokenizerModule

    q = VectorQuantizer(8, 16, channel_first=True)
    model = ResNetVQModel(q, resolution=16, base_channels=8, channel_mult=(1, 2), z_channels=8)
    module = VQTokenizerModule(model)
    opt = torch.optim.AdamW(module.parameters())
    for p in module.parameters():
        p.grad = torch.full_like(p, float("inf"))
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()))
    module.on_before_optimizer_step(opt)
    assert int(module.skipped_steps) == 0
    assert all(p.grad is not None for p in module.parameters())  # the scaler's to handle


def test_atomic_writes_of_every_output_kind(tmp_path, monkeypatch):
    """JSON, text, .npy and PNG outputs (summaries, metrics, index maps, plots) go through
    the same write-fsync-rename: one that fails midway leaves the old file and no temporary."""
    import os

    from vqkit.evaluation.visual import save_png
    from vqkit.fileio import atomic_save_npy, atomic_write_text

    path = tmp_path / "out" / "summary.json"
    atomic_write_text(path, '{"old": 1}\n')
    atomic_save_npy(tmp_path / "out" / "indices.npy", np.arange(6, dtype=np.int32))
    assert np.load(tmp_path / "out" / "indices.npy").tolist() == list(range(6))
    save_png(torch.rand(3, 8, 8), tmp_path / "out" / "grid.png")
    assert Image.open(tmp_path / "out" / "grid.png").size == (8, 8)

    real_fsync = os.fsync

    def dying_fsync(fd: int) -> None:  # the disk fills / the process dies after the bytes
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", dying_fsync)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(path, '{"new": 2}\n')
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.read_text() == '{"old": 1}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "grid.png",
        "indices.npy",
        "summary.json",
    ]

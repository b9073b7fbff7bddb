"""`vqkit fit` under Lightning's DDP with 2 CPU processes (gloo): the training loader shards
itself, every process ends with the same weights and codebook, and a resumed DDP run matches
an uninterrupted one bitwise."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_training import QUICKSTART, TINY, make_folder, quick_overrides, tiny_args

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_env(probe: Path) -> dict[str, str]:
    """Environment of a 2-process gloo run on this machine that writes its probe to ``probe``."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
        "VQKIT_PROBE_DIR": str(probe),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }


def _fit_ddp(
    folder: Path,
    out: Path,
    probe: Path,
    steps: int,
    *extra: str,
    config: Path = TINY,
    check: bool = True,
) -> subprocess.CompletedProcess:
    probe.mkdir(parents=True, exist_ok=True)
    env = _ddp_env(probe)
    cmd = [
        sys.executable,
        "-m",
        "vqkit.cli",
        "fit",
        "--config",
        str(config),
        *tiny_args(folder, out),
        *quick_overrides(),
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=4",
        "--trainer.callbacks+=tests.ddp_probe.Probe",
        *extra,
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def _load(probe: Path) -> list[dict]:
    return [torch.load(probe / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    # 40 images, 10 of them validation: 30 training images -> 15 per process, 3 batches of 4.
    return make_folder(tmp_path_factory.mktemp("ddp_images"), n=40)


def test_ddp_fit_shards_data_and_keeps_processes_identical(folder, tmp_path):
    _fit_ddp(folder, tmp_path / "run", tmp_path / "probe", 8)
    a, b = _load(tmp_path / "probe")
    assert (a["world_size"], b["world_size"]) == (2, 2)
    assert a["global_step"] == b["global_step"] == 8
    # the events happened: k-means init at step 4, a re-estimation at step 6 (and restarts)
    q = "model.quantizer."
    assert bool(a["state"][q + "maintenance.0.done"])
    assert int(a["state"][q + "num_replacements"]) >= 2
    # Epoch 0: the two shards are disjoint halves of one permutation of the training set.
    sa, sb = set(a["shard_epoch0"]), set(b["shard_epoch0"])
    assert not sa & sb
    assert len(sa) == len(sb) == a["n"] // 2
    # ... and the batches each process trained on really differ.
    assert not torch.equal(a["batch_sums"][0], b["batch_sums"][0])
    # Gradients are all-reduced, quantizer statistics all-reduced and reservoirs replicated:
    # every parameter and buffer ends bitwise identical on both processes.
    # (Validation counts are the exception: each process counts its own shard of the
    # validation set and the figures are summed when they are read.)
    assert a["state"].keys() == b["state"].keys()
    local = {"model.quantizer.usage.eval_counts"}
    for k in a["state"].keys() - local:
        assert torch.equal(a["state"][k], b["state"][k]), k
    both = (
        a["state"]["model.quantizer.usage.eval_counts"]
        + b["state"]["model.quantizer.usage.eval_counts"]
    )
    summary = json.loads(next((tmp_path / "run").rglob("summary.json")).read_text())
    assert summary["used_codes"] == int((both > 0).sum())
    summaries = list((tmp_path / "run").rglob("summary.json"))
    assert len(summaries) == 1  # written once, by rank 0


def test_ddp_resume_matches_uninterrupted_run(folder, tmp_path):
    periodic = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint"]
    periodic += ["--trainer.callbacks.every_n_train_steps=5", "--trainer.callbacks.save_top_k=-1"]
    periodic += ["--trainer.callbacks.filename=p-{step}"]
    _fit_ddp(folder, tmp_path / "whole", tmp_path / "pw", 10, *periodic)
    ck = next((tmp_path / "whole").rglob("p-step=5.ckpt"))
    _fit_ddp(folder, tmp_path / "resumed", tmp_path / "pr", 10, *periodic, f"--ckpt_path={ck}")
    whole, resumed = _load(tmp_path / "pw"), _load(tmp_path / "pr")
    # the checkpoint at step 5 is past k-means init (step 4); the re-estimation at step 6 and
    # any restarts after it ran in the resumed run
    mid = torch.load(ck, weights_only=False)["state_dict"]
    q = "model.quantizer."
    assert bool(mid[q + "maintenance.0.done"])
    assert int(whole[0]["state"][q + "num_replacements"]) > int(mid[q + "num_replacements"])
    for w, r in zip(whole, resumed, strict=True):
        assert r["global_step"] == 10
        # The resumed run trained on the same images in the same order after step 5.
        for bw, br in zip(w["batch_sums"][5:], r["batch_sums"], strict=True):
            torch.testing.assert_close(bw, br, rtol=0, atol=1e-9)
        for k in w["state"]:
            assert torch.equal(w["state"][k], r["state"][k]), k


def test_ddp_vqgan_keeps_processes_identical(folder, tmp_path):
    config = QUICKSTART.parent / "vqgan_quickstart.yaml"
    gan = ["--model.adversarial.init_args.disc_start=2"]
    # Two backward passes per step: plain DDP is refused up front with the fix in the message.
    r = _fit_ddp(folder, tmp_path / "plain", tmp_path / "p0", 4, *gan, config=config, check=False)
    assert r.returncode != 0
    assert "needs find_unused_parameters=True" in r.stderr
    _fit_ddp(
        folder,
        tmp_path / "run",
        tmp_path / "probe",
        6,
        *gan,
        "--trainer.strategy=ddp_find_unused_parameters_true",
        config=config,
    )
    a, b = _load(tmp_path / "probe")
    assert a["global_step"] == b["global_step"] == 6
    # Generator and discriminator weights agree on both processes; BatchNorm running
    # statistics are each process's own, as with any DDP model without SyncBatchNorm.
    for k in a["state"]:
        if "eval_counts" in k or "running_" in k or "num_batches_tracked" in k:
            continue
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert any(k.startswith("adversarial.discriminator") for k in a["state"])


def test_ddp_prior_fit_shards_grids_and_keeps_processes_identical(tmp_path):
    from tests.test_training import fit_tiny_checkpoint

    tokenizer, _ = fit_tiny_checkpoint(tmp_path / "tok")
    probe = tmp_path / "probe"
    probe.mkdir()
    env = _ddp_env(probe)
    out = tmp_path / "prior"
    cmd = [
        sys.executable,
        "-m",
        "vqkit.cli",
        "prior",
        "fit",
        "--config",
        str(TESTS.parent / "configs" / "prior" / "quickstart.yaml"),
        f"--model.tokenizer={tokenizer}",
        "--model.n_layer=1",
        "--model.n_head=2",
        "--model.n_embd=16",
        "--model.warmup_steps=1",
        "--model.num_log_samples=2",
        "--data.batch_size=4",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--trainer.accelerator=cpu",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.callbacks+=tests.ddp_probe.PriorProbe",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    a, b = _load(probe)
    assert (a["world_size"], b["world_size"]) == (2, 2)
    assert a["global_step"] == b["global_step"] == 3
    # 24 training grids (12 images and their mirror images): each process takes its own half
    seen_a, seen_b = torch.cat(a["batches"]), torch.cat(b["batches"])
    assert seen_a.shape == seen_b.shape == (12, 64)
    assert not torch.equal(seen_a, seen_b)
    for k, v in a["state"].items():
        torch.testing.assert_close(v, b["state"][k], rtol=0, atol=0, msg=k)
    assert a["val_nll"] == b["val_nll"]  # synced over the two processes' validation shards
    assert len(list(out.rglob("last.ckpt"))) == 1


def test_ddp_gradient_mode_through_warmup_and_maintenance(folder, tmp_path):
    """A gradient-mode codebook (no EMA) under plain DDP: during the warm-up the codebook takes
    no part in the loss, which DDP rejects unless every parameter still gets a gradient."""
    import yaml

    cfg = yaml.safe_load(TINY.read_text())
    cfg["model"]["model"]["init_args"]["quantizer"]["init_args"]["ema"] = None
    config = tmp_path / "tiny_gradient.yaml"
    config.write_text(yaml.safe_dump(cfg))
    _fit_ddp(folder, tmp_path / "run", tmp_path / "probe", 8, config=config)
    a, b = _load(tmp_path / "probe")
    assert a["global_step"] == b["global_step"] == 8
    q = "model.quantizer."
    # the events happened: 4 warm-up steps, k-means init at step 4, re-estimation at step 6
    assert int(a["state"][q + "step"]) == 8
    assert bool(a["state"][q + "maintenance.0.done"])
    assert int(a["state"][q + "num_replacements"]) >= 2
    assert isinstance(a["state"][q + "codebook"], torch.Tensor)
    for k in a["state"].keys() - {q + "usage.eval_counts"}:
        assert torch.equal(a["state"][k], b["state"][k]), k


def test_dying_rank_then_resume_on_one_process_and_back_on_two(folder, tmp_path):
    """Distributed faults: process 1 of 2 dies (SIGKILL) at step 7; process 0 stops with a
    one-line error instead of waiting forever. The run resumes from its step-6 checkpoint on
    one process, and that run's checkpoint resumes on two: each time every process starts from
    exactly the checkpoint's codebook, reservoirs, usage counts and schedule, and the
    maintenance goes on (k-means init is not repeated, the re-estimation at step 12 runs)."""
    import time

    every = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint"]
    every += ["--trainer.callbacks.every_n_train_steps=6", "--trainer.callbacks.save_top_k=-1"]
    every += ["--trainer.callbacks.filename=p-{step}", "--trainer.callbacks.save_last=true"]
    kill = '--trainer.callbacks+={"class_path": "tests.ddp_probe.KillRank", "init_args": {}}'
    out = tmp_path / "run"
    t0 = time.monotonic()
    r = _fit_ddp(folder, out, tmp_path / "p0", 20, *every, kill, check=False)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 300  # it stopped; it did not hang until a 30-min timeout
    errors = [ln for ln in r.stderr.splitlines() if "vqkit fit: error:" in ln]
    assert errors and "a process of the distributed run was lost" in errors[-1], r.stderr[-3000:]
    assert "resume with --ckpt_path last" in errors[-1]
    ck6 = next(out.rglob("p-step=6.ckpt"))
    assert not list(out.rglob("p-step=12.ckpt"))
    q = "model.quantizer."
    mid = torch.load(ck6, weights_only=True)["state_dict"]
    assert bool(mid[q + "maintenance.0.done"]) and int(mid[q + "num_replacements"]) >= 2

    def same(a: dict, b: dict) -> None:
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k

    # 2 -> 1 process: this process starts from the 2-process checkpoint exactly
    probe1 = tmp_path / "p1"
    probe1.mkdir()
    env = _ddp_env(probe1)
    cmd = [sys.executable, "-m", "vqkit.cli", "fit", "--config", str(TINY)]
    cmd += [*tiny_args(folder, out), *quick_overrides(), "--trainer.max_steps=12"]
    cmd += ["--trainer.val_check_interval=4", "--trainer.callbacks+=tests.ddp_probe.Probe"]
    cmd += [*every, "--ckpt_path=last"]
    r1 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r1.returncode == 0, r1.stderr[-3000:]
    one = torch.load(probe1 / "rank0.pt", weights_only=False)
    assert (one["world_size"], one["start_step"], one["global_step"]) == (1, 6, 12)
    same(one["start_state"], mid)
    ck12 = next(out.rglob("p-step=12.ckpt"))
    end12 = torch.load(ck12, weights_only=True)["state_dict"]
    # the re-estimation at step 12 ran on one process; k-means init did not run again
    assert int(end12[q + "num_replacements"]) > int(mid[q + "num_replacements"])
    assert int(end12[q + "step"]) == 12
    # 1 -> 2 processes: both start from the 1-process checkpoint and stay identical
    _fit_ddp(folder, out, tmp_path / "p2", 14, *every, f"--ckpt_path={ck12}")
    a, b = _load(tmp_path / "p2")
    assert (a["world_size"], a["start_step"], a["global_step"]) == (2, 12, 14)
    same(a["start_state"], end12)
    same(b["start_state"], end12)
    for k in a["state"].keys() - {q + "usage.eval_counts"}:
        assert torch.equal(a["state"][k], b["state"][k]), k

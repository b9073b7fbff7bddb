"""What a person sees: the console tells the codebook's story (issue "A fresh clone passes on
any machine, and the console tells the codebook's story")."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from tests.test_training import make_folder, tiny_args
from vqkit.cli import _pop_verbosity, main
from vqkit.training import StepProgressBar
from vqkit.training.console import RunLogFile, resolve_level, setup_logging

TINY = Path(__file__).resolve().parent / "configs" / "quickstart_tiny.yaml"


# --- levels, the file handler, the flag --------------------------------------------------------


def test_resolve_level(monkeypatch):
    monkeypatch.delenv("VQKIT_LOG_LEVEL", raising=False)
    assert resolve_level() == logging.INFO
    monkeypatch.setenv("VQKIT_LOG_LEVEL", "debug")
    assert resolve_level() == logging.DEBUG
    assert resolve_level("WARNING") == logging.WARNING  # the flag beats the environment
    with pytest.raises(ValueError, match="unknown log level 'LOUD'; use one of DEBUG, INFO"):
        resolve_level("LOUD")


def test_pop_verbosity_both_spellings():
    argv = ["fit", "--verbosity", "DEBUG", "--config", "c.yaml", "--verbosity=ERROR"]
    assert _pop_verbosity(argv) == "ERROR"
    assert argv == ["fit", "--config", "c.yaml"]
    with pytest.raises(ValueError, match="--verbosity needs a level"):
        _pop_verbosity(["fit", "--verbosity"])


def test_bad_verbosity_is_a_one_line_error(capsys):
    assert main(["--verbosity", "LOUD", "analyze", "--help"]) == 2
    assert "vqkit: error: unknown log level 'LOUD'" in capsys.readouterr().err


def test_run_log_file_keeps_records_until_the_folder_is_known(tmp_path):
    logger = logging.getLogger("vqkit.test_console")
    handler = RunLogFile()
    logger.addHandler(handler)
    try:
        logger.warning("before the run folder exists")
        path = handler.open(tmp_path / "run" / "vqkit.log")
        logger.warning("after")
        handler.close_file()
        logger.warning("not written: the file is closed")
    finally:
        logger.removeHandler(handler)
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("WARNING vqkit.test_console: before the run folder exists")
    assert lines[1].endswith("after")


def test_setup_logging_level_and_replacement(capsys, monkeypatch):
    monkeypatch.delenv("VQKIT_LOG_LEVEL", raising=False)
    logger = logging.getLogger("vqkit")
    before = list(logger.handlers)
    try:
        setup_logging("WARNING")
        setup_logging("WARNING")  # again: replaces, does not add a second pair
        ours = [h for h in logger.handlers if getattr(h, "_vqkit_cli", False)]
        assert len(ours) == 2
        logging.getLogger("vqkit.quantize").info("hidden at WARNING")
        logging.getLogger("vqkit.quantize").warning("shown at WARNING")
        err = capsys.readouterr().err
        assert "shown at WARNING" in err and "hidden" not in err
    finally:
        for h in list(logger.handlers):
            if h not in before:
                logger.removeHandler(h)
                h.close()


# --- the progress bar ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "total", "title"),
    [
        ({"max_steps": 1500}, 1500, "Step 0/1500 (epoch 15)"),  # was "Epoch 15/-2"
        ({"max_epochs": 3}, None, "Epoch 15/2"),  # epoch-bounded: Lightning's bar unchanged
    ],
)
def test_progress_bar_counts_steps_of_max_steps(kwargs, total, title, tmp_path):
    bar = StepProgressBar()
    trainer = L.Trainer(
        **kwargs, callbacks=[bar], logger=False, default_root_dir=tmp_path, accelerator="cpu"
    )
    bar.setup(trainer, L.LightningModule(), stage="fit")
    assert bar._get_train_description(15).strip() == title
    if total is not None:
        assert bar.total_train_batches == total
    assert trainer.progress_bar_callback is bar


class CountTasks(L.Callback):
    """Records, after each validation, the progress bar's tasks, the entries rich's columns
    cache for tasks the bar no longer has, and the bound on all entries (one per column and
    live task). Whether the current validation task was rendered yet depends on the refresh
    thread's timing, so the live tasks' entries are bounded, not counted."""

    seen: list[tuple[int, int]] = []
    within_bound: list[bool] = []

    def on_validation_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        bar = trainer.progress_bar_callback
        if bar is None or bar.progress is None:
            return
        alive = set(bar.progress.task_ids)
        caches = [getattr(c, "_renderable_cache", {}) for c in bar.progress.columns]
        stale = sum(1 for cache in caches for task_id in cache if task_id not in alive)
        entries = sum(len(cache) for cache in caches)
        CountTasks.seen.append((len(alive), stale))
        CountTasks.within_bound.append(entries <= len(alive) * len(caches))


def test_progress_bar_keeps_no_task_per_validation(tmp_path):
    """Lightning's rich bar adds a task at every validation and keeps the old ones (and rich
    caches a renderable per task): a long run grew by one per validation (the soak benchmark
    found it). vqkit's bar drops the replaced task and its cache entries."""
    CountTasks.seen, CountTasks.within_bound = [], []
    folder = make_folder(tmp_path / "images", n=16)
    argv = ["fit", "--config", str(TINY), *tiny_args(folder, tmp_path / "run")]
    argv += ["--trainer.max_steps=12", "--trainer.val_check_interval=2"]
    argv += ["--trainer.callbacks+=tests.test_console.CountTasks"]
    assert main(argv) == 0
    assert len(CountTasks.seen) >= 6  # six validations ran with the bar on
    tasks = {n for n, _ in CountTasks.seen[1:]}
    assert len(tasks) == 1, CountTasks.seen  # no task added per validation
    assert all(stale == 0 for _, stale in CountTasks.seen), CountTasks.seen
    assert all(CountTasks.within_bound), CountTasks.within_bound


# --- a whole run through the `vqkit` command ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`vqkit fit` of the shrunk quickstart as a user runs it (a process of its own, stderr
    captured), with two unreadable files in the folder."""
    root = make_folder(tmp_path_factory.mktemp("images"))
    (root / "broken.png").write_bytes(b"not a png")
    (root / "empty.jpg").write_bytes(b"")
    out = tmp_path_factory.mktemp("run")
    vqkit = Path(sys.executable).with_name("vqkit")
    cmd = [str(vqkit), "fit", "--config", str(TINY), *tiny_args(root, out), "--verbosity=DEBUG"]
    env = {**os.environ, "COLUMNS": "240"}  # no wrapping of the console lines
    env.pop("VQKIT_LOG_LEVEL", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "tensorboard" / "version_0", proc.stderr


def test_console_tells_the_maintenance_story(tiny_run):
    folder, err = tiny_run
    # the events happened (the schedule put them inside the run) ...
    expected = [
        # the schedule at the start
        "codebook schedule (steps are training forwards):",
        "codebook: 64 codes of dimension 64, l2 distance",
        "EMA codebook: moving averages of the assigned vectors, decay 0.99",
        "k-means init: all 64 codes set to the k-means centers (50 iterations) of a "
        "1024-vector reservoir at step 4",
        "k-means re-estimation (full) at steps 6, 12: the whole codebook replaced by k-means "
        "(20 iterations) on a 1024-vector reservoir",
        "dead-code restart every step: codes whose EMA usage falls below 0.5",
        # k-means: samples, codes replaced, inertia, milliseconds
        "k-means init at step 4: 1024 samples, 64 codes replaced, inertia",
        "k-means re-estimation at step 6: ",
        "k-means re-estimation at step 12",  # done or skipped with its reason
        # restarts: one DEBUG line each, and the summary
        "dead-code restart at step ",
        "dead-code restarts at steps ",
        # the health line at each validation
        "validation at step 8: ",
        "validation at step 16: ",
        # skipped files by name and reason
        "skipped 2 of 26 image files that could not be decoded",
        "broken.png: ",
        "2 image files skipped, all listed in ",
    ]
    missing = [e for e in expected if e not in err]
    assert not missing, f"missing from the console: {missing}\n{err[-4000:]}"
    assert "codes used (" in err and "perplexity" in err and "dead; L1" in err
    assert "; codebook min " in err and ", std " in err  # seed 001's codebook monitoring
    assert "Epoch 3/-2" not in err


def test_run_folder_log_skipped_list_and_tensorboard(tiny_run):
    folder, err = tiny_run
    log = (folder / "vqkit.log").read_text()
    # the same records as the console, including those from before the folder existed
    for line in (
        "skipped 2 of 26",
        "codebook schedule",
        "k-means init at step 4: 1024 samples",
        "validation at step 16: ",
    ):
        assert line in log, line
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["skipped_images"] == 2 and summary["steps"] == 16
    assert " cores, " in summary["machine"] and "torch " in summary["machine"]
    skipped = (folder / "skipped_files.txt").read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]).name for line in skipped) == ["broken.png", "empty.jpg"]
    assert all(line.split("\t")[1] for line in skipped)  # each with its reason

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    assert "maintenance/kmeans_init_codes_replaced" in scalars
    assert [e.value for e in acc.Scalars("maintenance/kmeans_init_codes_replaced")] == [64.0]
    assert [e.step for e in acc.Scalars("maintenance/kmeans_init_inertia")] == [5]
    assert "maintenance/kmeans_reestimate_codes_replaced" in scalars
    assert "maintenance/restarted_codes" in scalars
    assert {f"codebook/{n}" for n in ("min", "max", "mean", "std", "norm_mean")} <= scalars
    texts = set(acc.Tags()["tensors"])
    assert {"maintenance/text_summary", "codebook_health/text_summary"} <= texts

"""What a person sees during a run: vqkit's log records on the console (rich) and in the run
folder's ``vqkit.log``, and a callback that tells the codebook's story as it happens.

The library only logs (``logging.getLogger("vqkit...")``); :func:`setup_logging` is what the
``vqkit`` command calls to show those records. :class:`ConsoleLog` is the callback every
``vqkit fit`` carries: the maintenance schedule at the start, each k-means and a summary of the
dead-code restarts as they happen, a codebook health line at each validation, the same events as
TensorBoard scalars and text, and the skipped image files listed in ``skipped_files.txt``.
:func:`quiet_dependencies` drops the lines dependencies print that no user acts on, and
:func:`print_summary` prints a run's summary table; only the command calls either.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import IO

import lightning as L

from ..fileio import atomic_write_text
from .callbacks import run_dir

log = logging.getLogger("vqkit.training")

LEVEL_ENV = "VQKIT_LOG_LEVEL"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def resolve_level(value: str | int | None = None) -> int:
    """A logging level from ``value``, else ``$VQKIT_LOG_LEVEL``, else INFO."""
    if value is None:
        value = os.environ.get(LEVEL_ENV) or "INFO"
    if isinstance(value, int):
        return value
    name = str(value).strip().upper()
    if name.isdigit():
        return int(name)
    if name not in LEVELS:
        raise ValueError(f"unknown log level {value!r}; use one of {', '.join(LEVELS)}")
    return logging.getLevelName(name)


class _FirstProcess(logging.Filter):
    """Every DDP process runs the command; only the first one speaks."""

    def filter(self, record: logging.LogRecord) -> bool:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        return getattr(rank_zero_only, "rank", 0) == 0


class RunLogFile(logging.Handler):
    """Holds records until the run folder is known (the data module logs before it is), then
    writes them and every later one to ``vqkit.log`` there."""

    def __init__(self, capacity: int = 10_000) -> None:
        super().__init__()
        self.capacity = capacity
        self.path: Path | None = None
        self._pending: list[logging.LogRecord] = []
        self._stream: IO[str] | None = None
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if self._stream is None:
            if len(self._pending) < self.capacity:
                self._pending.append(record)
            return
        try:
            self._stream.write(self.format(record) + "\n")
            self._stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)

    def open(self, path: str | os.PathLike[str]) -> Path:
        """Write to ``path`` (appending: a resumed run continues its file) from now on."""
        path = Path(path)
        if self._stream is not None and self.path == path:
            return path
        self.close_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run
        self.path = path
        pending, self._pending = self._pending, []
        for record in pending:
            self.emit(record)
        return path

    def close_file(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream = None

    def close(self) -> None:
        self.close_file()
        super().close()


def setup_logging(level: str | int | None = None) -> RunLogFile:
    """Show the ``vqkit`` logger's records on stderr (rich) at ``level`` (default
    ``$VQKIT_LOG_LEVEL`` or INFO), from the first process only, and keep them for a run folder's
    ``vqkit.log`` (:func:`run_log_file`). Calling it again replaces the handlers it added."""
    from rich.console import Console
    from rich.logging import RichHandler

    lvl = resolve_level(level)
    logger = logging.getLogger("vqkit")
    for h in list(logger.handlers):
        if getattr(h, "_vqkit_cli", False):
            logger.removeHandler(h)
            h.close()
    console = RichHandler(
        console=Console(stderr=True),
        show_path=False,
        markup=False,
        rich_tracebacks=False,
        log_time_format="[%X]",
    )
    file = RunLogFile()
    for h in (console, file):
        h.setLevel(lvl)
        h.addFilter(_FirstProcess())
        h._vqkit_cli = True  # type: ignore[attr-defined]
        logger.addHandler(h)
    logger.setLevel(lvl)
    return file


# ---------------------------------------------------------------- what dependencies print
# Lines Lightning prints on every run that a vqkit user cannot act on, or that vqkit already
# handles. The `vqkit` command drops them (`quiet_dependencies`); `--verbosity debug` keeps
# them all. Importing vqkit changes no filter.
NOISY_WARNINGS = (
    # Lightning's own code calling an API torch deprecated: nothing a user can change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # Lightning logs every log_every_n_steps optimizer steps across epochs: a short epoch (a
    # small folder) loses no log point
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # frozen loss networks (LPIPS, Inception features) stay in eval mode on purpose
    r"Found \d+ module\(s\) in eval mode at the start of training",
)
# Lightning's info lines: its cloud-service tips and the accelerator lines. "GPU available but
# not used" is a warning of its own and stays.
NOISY_LINES = re.compile(r"(💡 )?Tip: |(GPU|TPU|HPU) available: |LOCAL_RANK: \d+ - ")
NOISY_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
)
# Lightning's "The 'train_dataloader' does not have many workers" hint: dropped only where the
# data is already in memory (`quiet_worker_hint`); on a folder decoded as it is read it matters
WORKER_HINT = r"The '\w+' does not have many workers"


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return NOISY_LINES.match(record.getMessage()) is None


def verbose(level: str | int | None = None) -> bool:
    """Whether ``level`` (default: ``$VQKIT_LOG_LEVEL``) is DEBUG or finer: show everything."""
    return resolve_level(level) <= logging.DEBUG


def quiet_dependencies(level: str | int | None = None) -> None:
    """Drop :data:`NOISY_WARNINGS` and Lightning's :data:`NOISY_LINES` in this process. At DEBUG
    (``--verbosity debug``), show everything instead: no filter of vqkit's, and, unless the user
    set warning options of their own (``-W``, ``$PYTHONWARNINGS``), the deprecation warnings
    Python hides by default. The `vqkit` command calls this, the library never does."""
    loud = verbose(level)
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, _DropNoise)]:
            logger.removeFilter(f)
        if not loud:
            logger.addFilter(_DropNoise())
    if loud:
        if not sys.warnoptions:
            warnings.simplefilter("default")  # ahead of every ignore, vqkit's included
        return
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def quiet_worker_hint(level: str | int | None = None) -> None:
    """Drop Lightning's hint to raise ``num_workers`` (unless ``level`` is DEBUG): for data held
    in memory (the prior's code grids, ``cache_images`` in memory), workers would only copy it.
    Images read from the disk cache (``cache_images="disk"``) keep the hint: workers help."""
    if not verbose(level):
        warnings.filterwarnings("ignore", message=WORKER_HINT)


def print_summary(summary: dict, title: str) -> None:
    """A run's summary (``summary.json``) as a rich table on stdout, then the machine and the
    files written."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        if k in ("files", "machine"):
            continue
        if isinstance(v, dict):  # e.g. the held-out meshes: one row per entry
            for name, figures in v.items():
                if isinstance(figures, dict):
                    text = ", ".join(
                        f"{f} {x:.4g}" if isinstance(x, float) else f"{f} {x}"
                        for f, x in figures.items()
                    )
                else:
                    text = str(figures)
                table.add_row(f"{k}: {name}", text)
            continue
        if isinstance(v, float):
            text = f"{v:.4f}"
        elif isinstance(v, (list, tuple)):
            text = "x".join(map(str, v))
        else:
            text = str(v)
        table.add_row(k, text)
    console = Console()
    console.print(table)
    if "machine" in summary:
        console.print(f"machine: {summary['machine']}")
    for k, v in summary.get("files", {}).items():
        console.print(f"{k}: {v}")


def run_log_file() -> RunLogFile | None:
    """The :class:`RunLogFile` that :func:`setup_logging` attached, if any."""
    for h in logging.getLogger("vqkit").handlers:
        if isinstance(h, RunLogFile):
            return h
    return None


_EVENT_KEYS = {
    "k-means init": "kmeans_init",
    "k-means re-estimation": "kmeans_reestimate",
    "low-usage reset": "low_usage_reset",
}


def _fmt(value: float, spec: str) -> str:
    return format(value, spec) if value == value else "nan"


class ConsoleLog(L.Callback):
    """Tells the codebook's story on the console, in ``vqkit.log`` and in TensorBoard.

    Args:
        log_file: name of the log in the run folder (None: no file).
        skipped_files: name of the list of skipped image files in the run folder.
        restart_summary_every: steps between the one-line summaries of dead-code restarts
            (each restart is a DEBUG line of its own).
    """

    def __init__(
        self,
        log_file: str | None = "vqkit.log",
        skipped_files: str = "skipped_files.txt",
        restart_summary_every: int = 100,
    ) -> None:
        super().__init__()
        if restart_summary_every < 1:
            raise ValueError(f"restart_summary_every must be >= 1, got {restart_summary_every}")
        self.log_file = log_file
        self.skipped_files = skipped_files
        self.restart_summary_every = restart_summary_every
        self._restarts: list = []
        self._opened: RunLogFile | None = None

    # -------------------------------------------------------------------------------- start
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        folder = run_dir(trainer)  # a broadcast under DDP: every process asks
        if trainer.global_rank != 0:
            return
        handler = run_log_file()
        if handler is not None and self.log_file:
            self._opened = handler
            log.info("run folder %s (log: %s)", folder, handler.open(folder / self.log_file))
        quantizer = getattr(pl_module, "quantizer", None)
        if quantizer is not None and hasattr(quantizer, "describe_schedule"):
            acc = trainer.accumulate_grad_batches
            note = f"; {acc} forwards per optimizer step" if acc > 1 else ""
            log.info("codebook schedule (steps are training forwards%s):", note)
            for line in quantizer.describe_schedule():
                log.info("  %s", line)
        self._write_skipped(trainer, folder)

    def _write_skipped(self, trainer: L.Trainer, folder: Path) -> None:
        dm = getattr(trainer, "datamodule", None)
        skipped = list(getattr(dm, "skipped", None) or [])
        if not skipped:
            return
        path = folder / self.skipped_files
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(f"{p}\t{reason}\n" for p, reason in skipped))
        log.warning("%d image files skipped, all listed in %s", len(skipped), path)

    # -------------------------------------------------------------------------------- events
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        quantizer = getattr(pl_module, "quantizer", None)
        if quantizer is None or not hasattr(quantizer, "pop_events"):
            return
        events = quantizer.pop_events()  # every process drains its own list
        if trainer.global_rank != 0:
            return
        for e in events:
            if e.strategy == "dead-code restart":
                self._restarts.append(e)
                continue
            key = _EVENT_KEYS.get(e.strategy, e.strategy.replace(" ", "_").replace("-", "_"))
            metrics = {f"maintenance/{key}_codes_replaced": float(e.codes_replaced)}
            if e.status == "done":
                metrics[f"maintenance/{key}_ms"] = e.ms
                if e.inertia is not None and e.inertia == e.inertia:
                    metrics[f"maintenance/{key}_inertia"] = float(e.inertia)
            self._to_loggers(trainer, metrics, e.message())
        if trainer.global_step % self.restart_summary_every == 0:
            self._summarize_restarts(trainer)

    def _summarize_restarts(self, trainer: L.Trainer) -> None:
        events, self._restarts = self._restarts, []
        if not events:
            return
        codes = sum(e.codes_replaced for e in events)
        mean = sum(e.usage_mean * e.codes_replaced for e in events) / max(codes, 1)
        top = max(e.usage_max for e in events)
        first, last = events[0].step, events[-1].step
        where = f"step {first}" if first == last else f"steps {first}-{last}"
        message = (
            f"dead-code restarts at {where}: {codes} codes at {len(events)} steps; their EMA "
            f"usage was {mean:.3g} on average, at most {top:.4g}"
        )
        log.info("%s", message)
        self._to_loggers(trainer, {"maintenance/restarted_codes": float(codes)}, message)

    @staticmethod
    def _to_loggers(trainer: L.Trainer, metrics: dict, text: str) -> None:
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            exp = getattr(logger, "experiment", None)
            if exp is not None and hasattr(exp, "add_text"):
                exp.add_text("maintenance", text, step)

    # -------------------------------------------------------------------------------- health
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if "val/used_codes" not in m:
            return
        k = getattr(getattr(pl_module, "quantizer", None), "codebook_size", None)
        used = int(m["val/used_codes"])
        line = (
            f"validation at step {trainer.global_step}: {used}"
            + (f"/{k}" if k else "")
            + f" codes used ({_fmt(m.get('val/utilization', float('nan')), '.1%')}), "
            f"perplexity {_fmt(m.get('val/perplexity', float('nan')), '.1f')}, "
            f"normalized entropy {_fmt(m.get('val/normalized_entropy', float('nan')), '.3f')}, "
            f"{int(m.get('val/dead_codes', 0))} dead"
        )
        if "val/l1" in m:
            line += f"; L1 {m['val/l1']:.4f}"
        if "val/psnr" in m:
            line += f", PSNR {m['val/psnr']:.2f} dB"
        quantizer = getattr(pl_module, "quantizer", None)
        if quantizer is not None and hasattr(quantizer, "codebook"):
            from .module import codebook_stats

            st = {k: float(v) for k, v in codebook_stats(quantizer).items()}
            line += (
                f"; codebook min {st['min']:.3g}, max {st['max']:.3g}, mean {st['mean']:.3g}, "
                f"std {st['std']:.3g}"
            )
        log.info("%s", line)
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if exp is not None and hasattr(exp, "add_text"):
                exp.add_text("codebook_health", line, trainer.global_step)

    # -------------------------------------------------------------------------------- end
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank == 0:
            self._summarize_restarts(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._opened is not None:
            self._opened.close_file()
            self._opened = None

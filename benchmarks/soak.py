"""Soak: a long `vqkit fit` of a tiny model with every kind of codebook maintenance kept on.

    python benchmarks/soak.py [--steps 5000] [--every 100] [--warmup 500]

Runs a real ``vqkit fit`` in this process (``vqkit.cli.main``) of the tests' tiny quickstart
(``tests/configs/quickstart_tiny.yaml``: ResNet VQ-VAE, 64 codes, EMA codebook, k-means init,
dead-mode k-means re-estimation, dead-code restart) on a synthetic image folder, with the
schedule stretched so that maintenance goes on for the whole run: re-estimation every
``--reestimate-every`` steps up to the last step (of the codes used fewer than
``--reestimate-min-usage`` times since the last one: the config's 1 would skip every one once
all 64 codes are in use), dead-code restarts every step, validation
every ``--val-every`` steps, periodic checkpoints every ``--ckpt-every`` steps (all kept),
reconstruction grids every ``--val-every`` steps.

A callback (:class:`SoakProbe`) samples the process every ``--every`` steps: resident memory
(VmRSS), open file descriptors, threads, Python objects after a ``gc.collect()`` (and how many
of them are tensors), the size of every quantizer reservoir, usage-window and other buffer, the
length of the quantizer's event queue, and the maintenance done so far (k-means runs, restart
steps and codes, ``num_replacements``). The warm-up ends at the first sample at or after
``--warmup`` steps that follows the k-means init, a validation and a checkpoint; every figure
after it is compared with the one at its end. Targets: RSS growth < 5% (max and final), buffer
sizes constant, file descriptors and threads not growing, and every descriptor and thread the
run opened gone once ``fit`` returns.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml

from vqkit.data.synthetic import make_image_folder

try:
    from benchmarks.common import machine_info, print_json, update_benchmarks_md
except ImportError:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import machine_info, print_json, update_benchmarks_md

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "quickstart_tiny.yaml"
#: the probe's import path: the config names it, so jsonargparse imports this file as
#: ``benchmarks.soak`` (a second copy when it runs as ``__main__``); ``PROBES`` there is shared
PROBE_CLASS = "benchmarks.soak.SoakProbe"
PROBES: list[SoakProbe] = []
RSS_TARGET = 0.05


# ---------------------------------------------------------------------------------- process
def _status() -> dict[str, int]:
    """VmRSS, VmHWM (kB) and Threads from /proc/self/status."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_targets() -> set[str]:
    """What every open descriptor points at (``fd -> target``)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            out.add(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
    return out


def _cached_font(target: str) -> bool:
    # matplotlib keeps the font files it rendered with open in its font cache (``get_font``,
    # an lru_cache): opened once per process by the first usage plot, not per run
    return "matplotlib" in target and target.endswith((".ttf", ".otf", ".afm"))


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _optimizer_bytes(trainer: L.Trainer) -> int:
    total = 0
    for opt in trainer.optimizers:
        for state in opt.state.values():
            total += _bytes(v for v in state.values() if isinstance(v, torch.Tensor))
    return total


# ---------------------------------------------------------------------------------- probe
class SoakProbe(L.Callback):
    """Samples memory, descriptors, threads, Python objects, quantizer buffers and maintenance
    counts every ``every`` training steps (and at the start and end of training)."""

    def __init__(self, every: int = 100) -> None:
        super().__init__()
        self.every = every
        self.samples: list[dict[str, Any]] = []
        self.validations = 0
        self.checkpoints = 0
        self.events: Counter[str] = Counter()
        self.codes_replaced: Counter[str] = Counter()
        self.event_queue_max = 0
        self.event_queue_maxlen: int | None = None
        self.t0 = time.perf_counter()
        PROBES.append(self)

    # Every ``vqkit fit`` drains ``quantizer.events`` in ConsoleLog.on_train_batch_end, which
    # may run before this callback's: tally the events as they are drained.
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        q = pl_module.quantizer
        pop = q.pop_events
        self.event_queue_maxlen = getattr(q.events, "maxlen", None)

        def counting_pop() -> list:
            self.event_queue_max = max(self.event_queue_max, len(q.events))
            events = pop()
            for e in events:
                key = f"{e.strategy} {e.status}"
                self.events[key] += 1
                self.codes_replaced[key] += e.codes_replaced
            return events

        q.pop_events = counting_pop
        self.t0 = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sample(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        step = trainer.global_step
        if step % self.every == 0 and (not self.samples or self.samples[-1]["step"] != step):
            self._sample(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.samples or self.samples[-1]["step"] != trainer.global_step:
            self._sample(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validations += 1

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:  # noqa: ANN001
        self.checkpoints += 1

    def _sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        q = pl_module.quantizer
        gc.collect()
        objects = gc.get_objects()
        # type(), not isinstance(): that reads __class__, and deprecated proxies warn on it
        tensors = sum(1 for o in objects if issubclass(type(o), torch.Tensor))
        # less this probe's own records (a dict per sample, its reservoirs dict and their dicts)
        n_objects = len(objects) - len(self.samples) * (2 + len(q.reservoirs))
        del objects
        st = _status()
        console = next((c for c in trainer.callbacks if hasattr(c, "_restarts")), None)
        self.samples.append(
            {
                "step": trainer.global_step,
                "seconds": time.perf_counter() - self.t0,
                "rss_kb": st["VmRSS"],
                "hwm_kb": st["VmHWM"],
                "threads": st["Threads"],
                "fds": open_fds(),
                "gc_objects": n_objects,
                "tensors": tensors,
                "reservoirs": {
                    name: {
                        "rows": int(r.buffer.shape[0]),
                        "bytes": _bytes(r.buffers()),  # buffer, seen, rng_state
                        "filled": r.filled,
                        "seen": r.seen,
                    }
                    for name, r in q.reservoirs.items()
                },
                "usage_buffer_bytes": _bytes(q.usage.buffers()),
                "usage_window_numel": q.usage.window_counts.numel(),
                "usage_window_forwards": int(q.usage.window_forwards),
                "quantizer_buffer_bytes": _bytes(q.buffers()),
                "module_state_bytes": _bytes(pl_module.parameters()) + _bytes(pl_module.buffers()),
                "optimizer_state_bytes": _optimizer_bytes(trainer),
                "event_queue": len(q.events),
                "console_pending_restarts": len(console._restarts) if console else None,
                "callback_metrics": len(trainer.callback_metrics),
                "num_replacements": int(q.num_replacements),
                "kmeans_runs": self.events["k-means init done"]
                + self.events["k-means re-estimation done"],
                "restart_steps": self.events["dead-code restart done"],
                "codes_restarted": self.codes_replaced["dead-code restart done"],
                "validations": self.validations,
                "checkpoints": self.checkpoints,
                "kmeans_init_done": all(
                    m.is_done() for m in q.maintenance if hasattr(m, "is_done")
                ),
            }
        )


# ---------------------------------------------------------------------------------- the run
def soak_config(args: argparse.Namespace, out: Path) -> Path:
    """The tiny quickstart with maintenance, validation and checkpoints over the whole run."""
    cfg = yaml.safe_load(TINY.read_text())
    t = cfg["trainer"]
    t.update(max_steps=args.steps, val_check_interval=args.val_every, log_every_n_steps=4)
    for cb in t["callbacks"]:
        init = cb.get("init_args", {})
        if cb["class_path"].endswith("ModelCheckpoint") and "every_n_train_steps" in init:
            init.update(every_n_train_steps=args.ckpt_every, save_top_k=-1, save_last=True)
    t["callbacks"].append({"class_path": PROBE_CLASS, "init_args": {"every": args.every}})
    quantizer = cfg["model"]["model"]["init_args"]["quantizer"]["init_args"]
    for m in quantizer["maintenance"]:
        if m["class_path"] == "vqkit.KMeansReestimate":
            m["init_args"].update(
                every=args.reestimate_every, until=args.steps, min_usage=args.reestimate_min_usage
            )
    cfg["model"]["log_images_every_n_steps"] = args.val_every
    cfg["console"]["restart_summary_every"] = 100
    path = out / "soak.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def fit(args: argparse.Namespace, tmp: Path) -> tuple[SoakProbe, dict[str, Any]]:
    import importlib

    from vqkit.cli import main as vqkit_main

    folder = make_image_folder(tmp / "images", args.images)
    out = tmp / "run"
    config = soak_config(args, tmp)
    argv = [
        "fit",
        "--config",
        str(config),
        f"--data.root={folder}",
        "--data.num_workers=0",
        "--data.batch_size=4",
        "--data.image_size=32",
        "--data.val_fraction=0.25",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
    ]
    probes = importlib.import_module("benchmarks.soak").PROBES
    gc.collect()
    fds_before = fd_targets()
    before = {"fds": len(fds_before), "threads": _status()["Threads"]}
    t0 = time.perf_counter()
    # the progress bar and Lightning's notes go to stderr: stdout is the JSON
    with contextlib.redirect_stdout(sys.stderr):
        rc = vqkit_main(argv)
    wall = time.perf_counter() - t0
    gc.collect()
    fds_after = fd_targets()
    still = sorted(fds_after - fds_before)
    after = {
        "fds": len(fds_after),
        "threads": _status()["Threads"],
        "new_fds": still,
        "new_fds_not_font_cache": [t for t in still if not _cached_font(t)],
    }
    if rc != 0 or not probes:
        raise SystemExit(f"vqkit fit failed (exit status {rc})")
    ckpts = sorted(p.name for p in out.rglob("*.ckpt"))
    return probes[-1], {
        "wall_seconds": wall,
        "process_before_fit": before,
        "process_after_fit": after,
        "checkpoint_files": ckpts,
    }


# ---------------------------------------------------------------------------------- report
def _slope_per_1000(steps: list[int], values: list[float]) -> float:
    """Least-squares slope of ``values`` over ``steps``, per 1,000 steps."""
    if len(steps) < 2:
        return float("nan")
    return float(np.polyfit(np.asarray(steps, float), np.asarray(values, float), 1)[0] * 1000)


def _range(rows: list[dict], key: Any) -> list:
    vals = [key(r) if callable(key) else r[key] for r in rows]
    return [min(vals), max(vals)]


def analyse(probe: SoakProbe, run: dict[str, Any], warmup: int) -> dict[str, Any]:
    s = probe.samples
    base_i = next(
        (
            i
            for i, r in enumerate(s)
            if r["step"] >= warmup
            and r["validations"] >= 1
            and r["checkpoints"] >= 1
            and r["kmeans_init_done"]
        ),
        None,
    )
    if base_i is None or base_i == len(s) - 1:
        raise SystemExit(
            f"no sample after the warm-up ({warmup} steps + k-means init, a validation and a "
            "checkpoint) to compare with: run more --steps or a shorter --warmup"
        )
    base, after, last = s[base_i], s[base_i:], s[-1]
    rss = [r["rss_kb"] for r in after]
    max_growth = (max(rss) - base["rss_kb"]) / base["rss_kb"]
    final_growth = (last["rss_kb"] - base["rss_kb"]) / base["rss_kb"]
    res_sizes = {
        name: _range(after, lambda r, n=name: r["reservoirs"][n]["bytes"])
        for name in base["reservoirs"]
    }
    constant_keys = (
        "usage_buffer_bytes",
        "usage_window_numel",
        "quantizer_buffer_bytes",
        "module_state_bytes",
        "optimizer_state_bytes",
    )
    buffers = {k: _range(after, k) for k in constant_keys}
    buffers_constant = all(a == b for a, b in [*res_sizes.values(), *buffers.values()])
    fds = _range(after, "fds")
    threads = _range(after, "threads")
    steps = last["step"] - s[0]["step"]
    kmeans_after = last["kmeans_runs"] - base["kmeans_runs"]
    train_s = last["seconds"] - s[0]["seconds"]
    checks = {
        "rss_growth_below_5pct": max_growth < RSS_TARGET and final_growth < RSS_TARGET,
        "buffers_constant": buffers_constant,
        # drained every step: never near the deque's cap (where it would start dropping events)
        "event_queue_bounded": probe.event_queue_max < (probe.event_queue_maxlen or 1024),
        "fds_not_growing": last["fds"] <= base["fds"] and fds[1] <= base["fds"] + 2,
        "threads_not_growing": last["threads"] <= base["threads"],
        "fds_closed_after_fit": not run["process_after_fit"]["new_fds_not_font_cache"],
        "threads_ended_after_fit": run["process_after_fit"]["threads"]
        <= run["process_before_fit"]["threads"],
        # the init, and k-means re-estimations after the warm-up too
        "maintenance_ran": base["kmeans_init_done"] and kmeans_after > 0,
    }
    return {
        "warmup_end_step": base["step"],
        "final_step": last["step"],
        "rss_mb": {
            "warmup_end": base["rss_kb"] / 1024,
            "max_after_warmup": max(rss) / 1024,
            "final": last["rss_kb"] / 1024,
            "first_sample": s[0]["rss_kb"] / 1024,
            "peak_hwm": last["hwm_kb"] / 1024,
        },
        "rss_growth_max": max_growth,
        "rss_growth_final": final_growth,
        "rss_slope_kb_per_1000_steps": _slope_per_1000([r["step"] for r in after], rss),
        "fds": {"first_sample": s[0]["fds"], "warmup_end": base["fds"], "after_warmup": fds},
        "fds_final": last["fds"],
        "threads": {"warmup_end": base["threads"], "after_warmup": threads},
        "gc_objects_after_warmup": _range(after, "gc_objects"),
        "gc_objects_slope_per_1000_steps": _slope_per_1000(
            [r["step"] for r in after], [r["gc_objects"] for r in after]
        ),
        "tensors_after_warmup": _range(after, "tensors"),
        "reservoir_bytes_after_warmup": res_sizes,
        "buffers_after_warmup": buffers,
        "event_queue_max": probe.event_queue_max,
        "event_queue_maxlen": probe.event_queue_maxlen,
        "event_queue_after_warmup": _range(after, "event_queue"),
        "console_pending_restarts_after_warmup": _range(
            after, lambda r: r["console_pending_restarts"] or 0
        ),
        "maintenance": {
            "events": dict(probe.events),
            "codes_replaced": dict(probe.codes_replaced),
            "kmeans_runs": last["kmeans_runs"],
            "restart_steps": last["restart_steps"],
            "codes_restarted": last["codes_restarted"],
            "num_replacements": last["num_replacements"],
            "after_warmup": {
                "kmeans_runs": kmeans_after,
                "restart_steps": last["restart_steps"] - base["restart_steps"],
                "codes_restarted": last["codes_restarted"] - base["codes_restarted"],
                "num_replacements": last["num_replacements"] - base["num_replacements"],
            },
        },
        "validations": probe.validations,
        "checkpoints_saved": probe.checkpoints,
        "wall_seconds": run["wall_seconds"],
        "steps_per_second_wall": last["step"] / run["wall_seconds"],
        "steps_per_second_training": steps / train_s if train_s > 0 else float("nan"),
        "checks": checks,
        "passed": all(checks.values()),
    }


def markdown(args: argparse.Namespace, r: dict[str, Any]) -> str:
    m, mb = r["maintenance"], r["rss_mb"]
    ok = {True: "pass", False: "**FAIL**"}
    c = r["checks"]
    res = "; ".join(
        f"{name}: {lo / 1024:.0f} KiB" + ("" if lo == hi else f" to {hi / 1024:.0f} KiB")
        for name, (lo, hi) in r["reservoir_bytes_after_warmup"].items()
    )
    b = r["buffers_after_warmup"]
    fonts = len(args._after["new_fds"]) - len(args._after["new_fds_not_font_cache"])
    reest = m["events"].get("k-means re-estimation done", 0)
    skipped = m["events"].get("k-means re-estimation skipped", 0)
    reest_codes = m["codes_replaced"].get("k-means re-estimation done", 0)
    w = m["after_warmup"]
    rows = [
        ("RSS at the end of the warm-up", f"{mb['warmup_end']:.1f} MiB", ""),
        ("RSS max after it / final", f"{mb['max_after_warmup']:.1f} / {mb['final']:.1f} MiB", ""),
        (
            "RSS growth (max / final)",
            f"{100 * r['rss_growth_max']:+.2f}% / {100 * r['rss_growth_final']:+.2f}%",
            f"< 5%: {ok[c['rss_growth_below_5pct']]}",
        ),
        (
            "RSS trend after the warm-up",
            f"{r['rss_slope_kb_per_1000_steps']:+.0f} kB / 1,000 steps",
            "",
        ),
        (
            "open file descriptors (warm-up end, max after, final)",
            f"{r['fds']['warmup_end']}, {r['fds']['after_warmup'][1]}, {r['fds_final']}",
            f"not growing: {ok[c['fds_not_growing']]}",
        ),
        (
            "descriptors before / after `fit`",
            f"{args._before['fds']} / {args._after['fds']}"
            + (f" ({fonts} font files matplotlib's font cache keeps open)" if fonts else ""),
            f"all the run's closed: {ok[c['fds_closed_after_fit']]}",
        ),
        (
            "threads before / after `fit`",
            f"{args._before['threads']} / {args._after['threads']}",
            f"all ended: {ok[c['threads_ended_after_fit']]}",
        ),
        (
            "threads (warm-up end, after it)",
            f"{r['threads']['warmup_end']}, {r['threads']['after_warmup'][0]}-"
            f"{r['threads']['after_warmup'][1]}",
            f"not growing: {ok[c['threads_not_growing']]}",
        ),
        ("reservoirs (bytes after the warm-up)", res, f"constant: {ok[c['buffers_constant']]}"),
        (
            "usage buffers / all quantizer buffers",
            f"{b['usage_buffer_bytes'][0]:,} B / {b['quantizer_buffer_bytes'][0]:,} B"
            + ("" if c["buffers_constant"] else " (changed)"),
            "",
        ),
        (
            "maintenance event queue (max length)",
            f"{r['event_queue_max']}",
            f"bounded: {ok[c['event_queue_bounded']]}",
        ),
        (
            "Python objects after the warm-up (after `gc.collect()`), trend",
            f"{r['gc_objects_after_warmup'][0]:,}-{r['gc_objects_after_warmup'][1]:,}, "
            f"{r['gc_objects_slope_per_1000_steps']:+.1f} / 1,000 steps",
            "",
        ),
        (
            "tensors after the warm-up",
            f"{r['tensors_after_warmup'][0]:,}-{r['tensors_after_warmup'][1]:,}",
            "",
        ),
        (
            "k-means runs: init + re-estimations (after the warm-up)",
            f"1 + {reest} ({w['kmeans_runs']}); {skipped} re-estimations skipped (nothing "
            f"under min_usage), {reest_codes:,} codes re-placed",
            f"ran after the warm-up: {ok[c['maintenance_ran']]}",
        ),
        (
            "dead-code restarts (after the warm-up)",
            f"{m['codes_restarted']:,} codes at {m['restart_steps']:,} steps "
            f"({w['codes_restarted']:,} at {w['restart_steps']:,})",
            "",
        ),
        (
            "`replace_codes` calls, `num_replacements` (after the warm-up)",
            f"{m['num_replacements']:,} ({w['num_replacements']:,})",
            "",
        ),
        ("validations / checkpoints saved", f"{r['validations']} / {r['checkpoints_saved']}", ""),
        (
            "wall time / steps per second",
            f"{r['wall_seconds']:.0f} s / {r['steps_per_second_wall']:.1f} "
            f"({r['steps_per_second_training']:.1f} between the first and last sample)",
            "",
        ),
    ]
    head = (
        f"A real `vqkit fit` of the tests' tiny quickstart (`tests/configs/quickstart_tiny.yaml`: "
        f"ResNet VQ-VAE, 32 px, 64 codes, EMA codebook) on {args.images} synthetic images, batch "
        f"4, {args.steps:,} steps, fp32 CPU, {torch.get_num_threads()} torch thread(s), in one "
        "process, with maintenance on for the whole run: k-means init at step 4, dead-mode "
        f"k-means re-estimation every {args.reestimate_every} steps up to the last (codes used "
        f"< {args.reestimate_min_usage} times since the last one re-placed), dead-code restart "
        f"every step, validation and reconstruction grids every {args.val_every} steps, "
        f"a kept checkpoint every {args.ckpt_every}, TensorBoard logging every 4. "
        f"`benchmarks/soak.py` samples the process every {args.every} steps (VmRSS, "
        "`/proc/self/fd`, threads, Python objects after `gc.collect()`, every quantizer buffer "
        "and reservoir, the maintenance event queue). The warm-up ends at the first sample from "
        f"step {args.warmup} on that follows the k-means init, a validation and a checkpoint "
        f"(here step {r['warmup_end_step']}); later samples are compared with it. "
        f"Result: **{'all targets met' if r['passed'] else 'a target missed'}**. The first "
        "5,000-step soak found the Python objects growing by about 40 per validation: "
        "Lightning's rich progress bar keeps every validation's hidden task, and rich's columns "
        "a cached renderable for each; `StepProgressBar` now removes them."
    )
    table = ["| measured | value | target |", "|---|---|---|"]
    table += [f"| {a} | {v} | {t} |" for a, v, t in rows]
    return head + "\n\n" + "\n".join(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--every", type=int, default=100, help="steps between samples")
    p.add_argument("--warmup", type=int, default=500, help="first step a baseline may be taken")
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--reestimate-every", type=int, default=250)
    p.add_argument(
        "--reestimate-min-usage",
        type=int,
        default=500,
        help="re-place codes used fewer times since the last re-estimation (the tiny config's "
        "1 skips every re-estimation once all 64 codes are in use: about 1,000 uses per code "
        "per 250 steps)",
    )
    p.add_argument("--images", type=int, default=48, help="synthetic images (a quarter held out)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    p.add_argument("--samples", action="store_true", help="every sample in the JSON")
    p.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="vqkit-soak-") as tmp:
        probe, run = fit(args, Path(tmp))
    result = analyse(probe, run, args.warmup)
    args._before, args._after = run["process_before_fit"], run["process_after_fit"]
    print_json(
        {
            "benchmark": "soak",
            "machine": machine_info(),
            "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            **result,
            "process_before_fit": run["process_before_fit"],
            "process_after_fit": run["process_after_fit"],
            "checkpoint_files": run["checkpoint_files"],
            **({"samples": probe.samples} if args.samples else {}),
        }
    )
    md = markdown(args, result)
    print(md)
    if not args.no_write:
        update_benchmarks_md("soak", md)
    if not result["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

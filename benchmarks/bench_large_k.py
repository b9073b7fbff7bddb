"""The quantizer and its maintenance at large codebooks (K = 65,536 and 262,144), side by side in
one run: forward + backward of vqkit (gradient and EMA modes), the matmul + argmin floor (whole
and chunked), vector-quantize-pytorch where it fits in memory, the peak memory of each, and the
time of one k-means re-estimation.

    python benchmarks/bench_large_k.py [--tokens 4096 32768] [--codes 65536 262144] [--dim 256]
                                       [--threads 2] [--repeat 7] [--budget-gb 6] [--no-write]

Every case runs in its own forked process (one per implementation and (M, K)), so its peak
memory is its own: the worker builds its inputs and module, resets its peak resident set size
(``echo 5 > /proc/self/clear_refs``), then the timed calls run, and the peak extra memory is
``VmHWM - VmRSS`` read from ``/proc/self/status`` after and before them. The workers of one
(M, K) stay alive together and are driven in interleaved rounds (one call of each per round),
so a load change on a shared machine hits all of them alike; the table shows medians.

Memory guard: a case whose known need exceeds ``--budget-gb`` is not started and is reported as
out of memory with that need (the floor's M x K score matrix; vector-quantize-pytorch's need is
its measured peak per M x K element on the smallest case, or at least one M x K matrix before
that). Every worker also runs under ``RLIMIT_AS`` = its address space at start + the budget, so
an underestimate fails with an allocation error in the worker, reported the same way, instead
of exhausting the machine.

k-means re-estimation (``KMeansReestimate``: ``mode="full"``, k-means++ then ``iters=20`` Lloyd
iterations, on a reservoir of ``--reservoir-factor`` x K vectors) takes hours per call at these
sizes on a CPU, so its time is extrapolated from measured pieces, labelled as such: the
k-means++ seeding of the first ``--seed-centers`` centers, greedy (its cost per center grows with
``2 + ln k`` candidates and is otherwise constant) and plain (one candidate per center, the
default past 8,192 codes), and one full assignment pass (what every Lloyd iteration costs at
most; Hamerly's bounds skip most rows after the first) over ``--pass-rows`` reservoir rows,
scaled to the reservoir, also without the bounds (the default's one pass past 8,192 codes: a
random start and 1 Lloyd iteration without the final assignment pass). Up to
``--whole-call-max`` codes one whole default ``KMeansReestimate`` call is also timed, measured
rather than extrapolated. ``--kmeans-only``
measures the k-means pieces alone and keeps the quantizer rows of the saved ``--json-out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    from benchmarks.bench_kmeans import mixture
    from benchmarks.bench_quantizer import floor_fn, peer_fn, vqkit_fn
    from benchmarks.common import machine_info, print_json, update_benchmarks_md, write_json
except ImportError:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench_kmeans import mixture
    from benchmarks.bench_quantizer import floor_fn, peer_fn, vqkit_fn
    from benchmarks.common import machine_info, print_json, update_benchmarks_md, write_json
from vqkit.quantize import EMAUpdate, KMeansReestimate, VectorQuantizer
from vqkit.quantize.distance import DEFAULT_MAX_BLOCK, _rows_per_chunk
from vqkit.quantize.kmeans import _Assigner, greedy_local_trials, kmeans_plusplus
from vqkit.quantize.maintenance import default_local_trials

FLOOR = "floor (matmul + argmin)"
FLOOR_CHUNKED = "floor in row blocks"
GRAD = "vqkit gradient"
EMA = "vqkit EMA"
PEER = "vector-quantize-pytorch EMA"
IMPLS = (FLOOR, FLOOR_CHUNKED, GRAD, EMA, PEER)
TARGET = 1.25  # forward + backward over the floor, at K = 65,536
GB = 1e9
MIB = 2**20


def chunked_floor_fn(x: torch.Tensor, c: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The floor with the score matrix cut into row blocks of ``DEFAULT_MAX_BLOCK`` floats (all
    codes each, as vqkit's blocks were before column tiles): the same matmul and argmin, in the
    memory bound vqkit keeps."""
    csq = c.pow(2).sum(1)
    rows = _rows_per_chunk(c.shape[0], None, DEFAULT_MAX_BLOCK)

    def run() -> torch.Tensor:
        idx = torch.empty(x.shape[0], dtype=torch.long)
        for s in range(0, x.shape[0], rows):
            idx[s : s + rows] = torch.addmm(csq, x[s : s + rows], c.t(), alpha=-2.0).argmin(1)
        return idx

    return run


def make_step(impl: str, m: int, k: int, dim: int) -> Callable[[], Any]:
    x = torch.randn(m, dim, generator=torch.Generator().manual_seed(0))
    if impl in (FLOOR, FLOOR_CHUNKED):
        c = torch.randn(k, dim, generator=torch.Generator().manual_seed(1))
        return floor_fn(x, c) if impl == FLOOR else chunked_floor_fn(x, c)
    if impl in (GRAD, EMA):
        return vqkit_fn(x, k, ema=impl == EMA)
    return peer_fn(x, k)


# --------------------------------------------------------------------------------------------
# Worker processes: one case each, its memory measured alone
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _limit_memory(budget: float) -> None:
    # Address space, not RSS: thread stacks and malloc arenas count too, hence the margin.
    limit = _status_kib("VmSize") * 1024 + int(budget) + 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "can't allocate memory" in str(e)


def _serve(conn: Any, threads: int, budget: float, build: Callable[[], Callable[[], Any]]) -> None:
    """Build the case, report ready, then run it once per "run" message (sending seconds);
    "stop" sends the peak extra resident memory (bytes) since the case was built."""
    torch.set_num_threads(threads)
    torch.ones(64, 64) @ torch.ones(64, 64)  # start the thread pool before the limit
    _limit_memory(budget)
    try:
        fn = build()
        exact = _reset_peak()
        base = _status_kib("VmRSS") if exact else _status_kib("VmHWM")
        conn.send(("ready", exact))
        while conn.recv() == "run":
            t0 = time.perf_counter()
            fn()
            conn.send(("time", time.perf_counter() - t0))
        conn.send(("peak", (_status_kib("VmHWM") - base) * 1024))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
        conn.send(("oom" if _is_oom(e) else "error", f"{type(e).__name__}: {e}"[:300]))


def _step_worker(conn: Any, impl: str, m: int, k: int, dim: int, threads: int, budget: float):  # noqa: ANN201
    _serve(conn, threads, budget, lambda: make_step(impl, m, k, dim))


class Worker:
    def __init__(self, target: Callable[..., Any], *args: Any) -> None:
        # fork: the child starts with everything imported (a spawned one spends ~10 s importing
        # Lightning through benchmarks.common). Safe because this parent never runs a parallel
        # torch op, so no OpenMP pool is forked.
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()

    def recv(self) -> tuple[str, Any]:
        try:
            return self.conn.recv()
        except EOFError:
            self.proc.join()
            return "error", f"worker died (exit code {self.proc.exitcode})"

    def ask(self, msg: str) -> tuple[str, Any]:
        self.conn.send(msg)
        return self.recv()

    def close(self) -> None:
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


# --------------------------------------------------------------------------------------------
# Quantizer forward + backward
# --------------------------------------------------------------------------------------------


def repeats_for(m: int, k: int, args: argparse.Namespace) -> tuple[int, int]:
    """(warm-up calls, timed calls): fewer for the largest cases, which take a minute a call."""
    if m * k >= 2**33:
        return 0, args.huge_repeat
    if m * k >= 2**30:
        return 0, args.large_repeat
    return 1, args.repeat


def need_bytes(impl: str, m: int, k: int, peer_per_elem: float | None) -> tuple[float, str]:
    """Memory a case is known to need beyond its inputs, and how that is known."""
    mk = m * k * 4
    if impl == FLOOR:
        return mk, "its M x K score matrix"
    if impl == PEER:
        if peer_per_elem is None:
            return mk, "at least its M x K distance matrix"
        return peer_per_elem * m * k, "extrapolated from its measured peak per M x K element"
    return 0.0, ""


def run_case(
    m: int, k: int, args: argparse.Namespace, peer: bool, peer_per_elem: float | None
) -> list[dict[str, Any]]:
    warmup, repeat = repeats_for(m, k, args)
    rows: dict[str, dict[str, Any]] = {}
    workers: dict[str, Worker] = {}
    for impl in IMPLS:
        if impl == PEER and not peer:
            continue
        row = rows[impl] = {
            "tokens": m,
            "codes": k,
            "dim": args.dim,
            "impl": impl,
            "warmup": warmup,
            "repeat": repeat,
            "mk_mib": m * k * 4 / MIB,
        }
        need, why = need_bytes(impl, m, k, peer_per_elem)
        if need > args.budget_gb * GB:
            row["status"] = "out of memory"
            row["note"] = f"needs {need / GB:.1f} GB ({why}), budget {args.budget_gb:g} GB"
            continue
        workers[impl] = Worker(
            _step_worker, impl, m, k, args.dim, args.threads, args.budget_gb * GB
        )
    for impl, w in list(workers.items()):
        kind, info = w.recv()
        if kind != "ready":
            _fail(rows[impl], kind, info, args)
            w.close()
            del workers[impl]
    times: dict[str, list[float]] = {impl: [] for impl in workers}
    for r in range(warmup + repeat):
        for impl, w in list(workers.items()):
            if impl == PEER and r >= warmup + args.peer_repeat:
                continue  # the slowest by far: fewer timed calls
            kind, info = w.ask("run")
            if kind != "time":
                _fail(rows[impl], kind, info, args)
                w.close()
                del workers[impl]
                continue
            if r >= warmup:
                times[impl].append(info)
            print(f"M={m} K={k} round {r + 1}: {impl:<28} {info:8.3f} s", file=sys.stderr)
    for impl, w in workers.items():
        kind, info = w.ask("stop")
        row = rows[impl]
        row["repeat"] = len(times[impl])
        row["status"] = "ok"
        row["seconds"] = statistics.median(times[impl])
        row["seconds_all"] = times[impl]
        row["peak_extra_mib"] = info / MIB if kind == "peak" else None
        w.close()
    for name in (FLOOR, FLOOR_CHUNKED):
        base = rows.get(name, {}).get("seconds")
        key = "x_floor" if name == FLOOR else "x_floor_chunked"
        for row in rows.values():
            row[key] = row["seconds"] / base if base and "seconds" in row else None
    return list(rows.values())


def _fail(row: dict[str, Any], kind: str, info: str, args: argparse.Namespace) -> None:
    if kind == "oom":
        row["status"] = "out of memory"
        row["note"] = f"allocation failed under the {args.budget_gb:g} GB budget: {info}"
    else:
        row["status"] = "error"
        row["note"] = info


# --------------------------------------------------------------------------------------------
# k-means re-estimation
# --------------------------------------------------------------------------------------------


def _kmeans_pieces(
    k: int, n: int, dim: int, seed_centers: int, pass_rows: int, whole_call: bool = False
) -> Callable:
    def build() -> Callable[[], dict[str, float]]:
        # the reservoir: k clusters of n / k points each on average (bench_kmeans' mixture)
        x = mixture(n, dim, k, sigma=0.75)
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k]
        centers = x.index_select(0, pick)

        def run() -> dict[str, float]:
            # k-means++ of seed_centers // 3 and of seed_centers centers: the difference is the
            # steady cost of the centers in between (the first ones also pay the pool's start)
            t0 = time.perf_counter()
            kmeans_plusplus(x, seed_centers // 3, seed=0)
            t1 = time.perf_counter()
            kmeans_plusplus(x, seed_centers, seed=0)
            t2 = time.perf_counter()
            # the same with one candidate per step (plain k-means++, the default past 8,192)
            kmeans_plusplus(x, seed_centers // 3, seed=0, local_trials=1)
            p1 = time.perf_counter()
            kmeans_plusplus(x, seed_centers, seed=0, local_trials=1)
            p2 = time.perf_counter()
            # one full assignment pass (assignments, upper and lower bounds) over pass_rows rows:
            # the first Lloyd E-step, and the most any later one costs
            rows = x[:pass_rows]
            _Assigner(rows, rows.pow(2).sum(1), k, None).start(centers, None)
            t3 = time.perf_counter()
            # the same pass without the bounds: the one pass of the default past 8,192 codes
            # (a random start, 1 Lloyd iteration, no final assignment pass)
            _Assigner(rows, rows.pow(2).sum(1), k, None).start(centers, None, bounds=False)
            t4 = time.perf_counter()
            whole = {}
            if whole_call:
                # one real default KMeansReestimate call on the whole reservoir, not
                # extrapolated: a quantizer whose reservoir holds x, re-estimated once
                vq = VectorQuantizer(
                    dim,
                    k,
                    ema=EMAUpdate(),
                    maintenance=[KMeansReestimate(every=2**30, until=None, reservoir_size=n)],
                )
                re = vq.maintenance[0]
                re.reservoir.add(x)
                t5 = time.perf_counter()
                replaced = re.reestimate(vq, step=1, tokens_per_step=4096)
                whole = {"call_seconds": time.perf_counter() - t5, "call_replaced": replaced}
            return whole | {
                "seed_small_seconds": t1 - t0,
                "seed_seconds": t2 - t1,
                "plain_small_seconds": p1 - t2,
                "plain_seconds": p2 - p1,
                "pass_seconds": t3 - p2,
                "plain_pass_seconds": t4 - t3,
            }

        return run

    return build


def _kmeans_worker(  # noqa: ANN201
    conn: Any,
    k: int,
    n: int,
    dim: int,
    seed_centers: int,
    pass_rows: int,
    threads: int,
    budget: float,
    whole_call: bool = False,
):
    build = _kmeans_pieces(k, n, dim, seed_centers, pass_rows, whole_call)
    pieces: dict[str, float] = {}

    def step() -> Callable[[], None]:
        fn = build()
        return lambda: pieces.update(fn())

    _serve(conn, threads, budget, step)
    conn.send(("pieces", pieces))


def run_kmeans(k: int, args: argparse.Namespace) -> dict[str, Any]:
    n = args.reservoir_factor * k
    iters = 20  # KMeansReestimate's default
    seed_centers = min(args.seed_centers, k)
    pass_rows = min(args.pass_rows, n)
    row: dict[str, Any] = {
        "codes": k,
        "dim": args.dim,
        "reservoir": n,
        "iters": iters,
        "seed_centers_measured": seed_centers,
        "pass_rows_measured": pass_rows,
    }
    whole_call = k <= args.whole_call_max
    w = Worker(
        _kmeans_worker,
        k,
        n,
        args.dim,
        seed_centers,
        pass_rows,
        args.threads,
        args.budget_gb * GB,
        whole_call,
    )
    kind, info = w.recv()
    if kind == "ready":
        w.ask("run")
        kind, peak = w.ask("stop")
        _, pieces = w.recv()
        w.close()
        small = seed_centers // 3
        # seconds per center and candidate, from the centers between small and seed_centers
        per_center = (pieces["seed_seconds"] - pieces["seed_small_seconds"]) / (
            seed_centers * greedy_local_trials(seed_centers) - small * greedy_local_trials(small)
        )
        seed_s = pieces["seed_seconds"] + per_center * (
            k * greedy_local_trials(k) - seed_centers * greedy_local_trials(seed_centers)
        )
        # plain k-means++: one candidate per center
        plain_per_center = (pieces["plain_seconds"] - pieces["plain_small_seconds"]) / (
            seed_centers - small
        )
        plain_s = pieces["plain_seconds"] + plain_per_center * (k - seed_centers)
        pass_s = pieces["pass_seconds"] * n / pass_rows
        plain_pass_s = pieces["plain_pass_seconds"] * n / pass_rows
        default_plain = default_local_trials(k) == 1
        row |= {
            "status": "ok (extrapolated)",
            "seed_seconds_measured": pieces["seed_seconds"],
            "seed_small_seconds_measured": pieces["seed_small_seconds"],
            "pass_seconds_measured": pieces["pass_seconds"],
            "seed_seconds": seed_s,
            "pass_seconds": pass_s,
            "plain_pass_seconds_measured": pieces["plain_pass_seconds"],
            "plain_pass_seconds": plain_pass_s,
            # k-means++ hands over every point's nearest seed: iteration 1 is a full pass,
            # later ones at most that
            "call_seconds_full": seed_s + iters * pass_s,
            "plain_seconds_measured": pieces["plain_seconds"],
            "plain_small_seconds_measured": pieces["plain_small_seconds"],
            "seed_plain_seconds": plain_s,
            "call_seconds_plain": plain_s + iters * pass_s,
            # KMeansReestimate's seeding at this K with local_trials=None
            "default_seeding": "plain" if default_plain else "greedy",
            "call_seconds_warm_start": (1 + iters) * pass_s,
            # the default past 8,192 codes: a random start, 1 Lloyd iteration, no final
            # assignment pass: one pass without bounds
            "call_seconds_default": plain_pass_s,
            # and that call measured whole (K <= --whole-call-max)
            "call_seconds_default_measured": pieces.get("call_seconds"),
            "peak_extra_mib": peak / MIB if kind == "peak" else None,
            "reservoir_mib": n * args.dim * 4 / MIB,
        }
    else:
        w.close()
        _fail(row, kind, info, args)
    # vector-quantize-pytorch's kmeans (kmeans_init=True) computes the whole N x K distance
    # matrix in every iteration (cdist), several temporaries of it at once
    row["peer_needs_gb"] = n * k * 4 / GB
    row["peer_status"] = (
        "out of memory" if n * k * 4 > args.budget_gb * GB else "not run (within budget)"
    )
    return row


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt_s(s: float | None) -> str:
    return "-" if s is None else f"{s:.2f}"


def _fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _dur(s: float) -> str:
    return f"{s:,.0f} s" if s < 5400 else f"{s / 3600:,.1f} h"


def markdown(args: argparse.Namespace, rows: list[dict], km: list[dict], cmd: str) -> str:
    lines = [
        f"Forward + backward of one batch at large codebooks, D={args.dim}, fp32, CPU "
        f"({args.threads} threads, torch {torch.__version__}); median of {args.repeat} after one "
        f"warm-up call where M x K < 2^30, of {args.large_repeat} (no warm-up) below 2^33, of "
        f"{args.huge_repeat} beyond, vector-quantize-pytorch {args.peer_repeat}; implementations "
        "interleaved round by round. `x floor`: over one `addmm` + `argmin` on the whole M x K "
        "score matrix; `x chunked`: over the same in row blocks of 2^24 floats (64 MiB, the "
        "bound vqkit keeps; vqkit's own blocks are 1,024 rows x 16,384 codes past 16,384 codes). "
        "*Peak extra*: peak resident memory above the "
        "case's inputs and module, each case in its own process (VmHWM after clear_refs); "
        f"memory budget {args.budget_gb:g} GB per case. "
        + (
            "Command: "
            if len(cmd.splitlines()) == 1
            else "Commands (the quantizer rows, then the k-means rows): "
        )
        + ", then ".join(f"`{c.strip()}`" for c in cmd.splitlines())
        + ".",
        "",
        "| tokens M | codes K | implementation | seconds | x floor | x chunked "
        "| peak extra MiB | M x K fp32 MiB |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mk = f"{r['mk_mib']:,.0f}"
        if r["status"] != "ok":
            lines.append(
                f"| {r['tokens']:,} | {r['codes']:,} | {r['impl']} | {r['status']}: "
                f"{r.get('note', '')} | | | | {mk} |"
            )
            continue
        n = "" if r["repeat"] == args.repeat else f" ({r['repeat']} run{'s' * (r['repeat'] > 1)})"
        peak = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:,.0f}"
        lines.append(
            f"| {r['tokens']:,} | {r['codes']:,} | {r['impl']} | {r['seconds']:.3f}{n} | "
            f"{_fmt_x(r['x_floor'])} | {_fmt_x(r['x_floor_chunked'])} | {peak} | {mk} |"
        )
    growth = memory_growth(rows, args.dim)
    if growth:
        lines += ["", "Growth of vqkit's peak extra memory with the tokens, per K:", ""]
        lines += [f"- {g['text']}" for g in growth]
    if km:
        lines += [
            "",
            'k-means re-estimation, one `KMeansReestimate` call (`mode="full"`: k-means++ then 20'
            " Lloyd iterations, or the default past 8,192 codes: a random start and 1 Lloyd "
            "iteration without the final assignment pass, one full pass without Hamerly's bounds)"
            " on a reservoir of "
            f"{args.reservoir_factor} x K vectors (a Gaussian mixture as in `bench_kmeans`). "
            "**Extrapolated** from measured pieces: the seeding of the first centers (cost per "
            "center and candidate between the first third and all of the measured centers, times "
            "K x (2 + ln K) for greedy k-means++, times K for plain k-means++, the seeding of "
            "`local_trials=None` past 8,192 codes) and one full assignment pass over some "
            "reservoir rows (times the reservoir's rows), with and without the bounds; a Lloyd "
            "iteration costs at most one full pass, so the call figures are upper bounds for the "
            "Lloyd part. *measured: default call*: one whole default call timed, where K <= "
            f"{args.whole_call_max:,} (`--whole-call-max`). Peak extra: "
            "above the reservoir, during the measured pieces (the whole call included where it "
            "ran: its quantizer keeps a copy of the reservoir).",
            "",
            "| codes K | reservoir | measured | seeding: greedy / plain "
            "| one full pass: bounds / none "
            "| call: greedy / plain | call: random start, 1 iteration (default) "
            "| measured: default call | call (warm_start) | peak extra MiB "
            "| vector-quantize-pytorch kmeans |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in km:
            peer = f"{r['peer_status']} (needs {r['peer_needs_gb']:,.0f} GB: N x K distances)"
            if not r.get("status", "").startswith("ok"):
                lines.append(
                    f"| {r['codes']:,} | {r['reservoir']:,} | {r['status']}: {r.get('note', '')} "
                    f"| | | | | | | | {peer} |"
                )
                continue
            measured = (
                f"{r['seed_centers_measured']:,} centers in {r['seed_seconds_measured']:.1f} s "
                f"greedy, {r['plain_seconds_measured']:.2f} s plain; "
                f"{r['pass_rows_measured']:,} rows in {r['pass_seconds_measured']:.1f} s"
            )
            peak = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:,.0f}"
            plain_pass = r.get("plain_pass_seconds")
            whole = r.get("call_seconds_default_measured")
            if plain_pass is not None:
                measured += f" ({r['plain_pass_seconds_measured']:.1f} s without bounds)"
            lines.append(
                f"| {r['codes']:,} | {r['reservoir']:,} | {measured} | {_dur(r['seed_seconds'])}"
                f" / {_dur(r['seed_plain_seconds'])} | {_dur(r['pass_seconds'])} / "
                f"{'-' if plain_pass is None else _dur(plain_pass)} | "
                f"{_dur(r['call_seconds_full'])} / {_dur(r['call_seconds_plain'])} | "
                f"{_dur(r.get('call_seconds_default', 2 * r['pass_seconds']))} | "
                f"{'-' if whole is None else _dur(whole)} | "
                f"{_dur(r['call_seconds_warm_start'])} | {peak} | {peer} |"
            )
    return "\n".join(lines)


def memory_growth(rows: list[dict], dim: int) -> list[dict[str, Any]]:
    """For each K and vqkit mode measured at several M: how the peak extra memory grew from the
    smallest M to the largest, against what an M x K matrix would have grown."""
    out = []
    for impl in (GRAD, EMA):
        for k in sorted({r["codes"] for r in rows}):
            ok = [
                r
                for r in rows
                if r["impl"] == impl and r["codes"] == k and r.get("peak_extra_mib") is not None
            ]
            if len(ok) < 2:
                continue
            lo, hi = min(ok, key=lambda r: r["tokens"]), max(ok, key=lambda r: r["tokens"])
            d_peak = hi["peak_extra_mib"] - lo["peak_extra_mib"]
            d_mk = hi["mk_mib"] - lo["mk_mib"]
            d_md = (hi["tokens"] - lo["tokens"]) * dim * 4 / MIB
            out.append(
                {
                    "impl": impl,
                    "codes": k,
                    "tokens": [lo["tokens"], hi["tokens"]],
                    "peak_growth_mib": d_peak,
                    "mk_growth_mib": d_mk,
                    "md_growth_mib": d_md,
                    "text": (
                        f"{impl}, K={k:,}: from M = {lo['tokens']:,} to {hi['tokens']:,} the "
                        f"peak changes by {d_peak:+,.0f} MiB (the M x D input grows by "
                        f"{d_md:,.0f} MiB, an M x K matrix would grow by {d_mk:,.0f} MiB)"
                    ),
                }
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--codes", type=int, nargs="+", default=[65536, 262144])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument(
        "--large-repeat", type=int, default=3, help="timed calls for M*K in (2^30, 2^33)"
    )
    p.add_argument("--peer-repeat", type=int, default=3, help="timed calls of the peer")
    p.add_argument("--huge-repeat", type=int, default=1, help="timed calls for M*K >= 2^33")
    p.add_argument("--budget-gb", type=float, default=6.0, help="memory budget per case")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--no-kmeans", action="store_true")
    p.add_argument(
        "--kmeans-only",
        action="store_true",
        help="measure the k-means pieces only; keep the quantizer rows of --json-out",
    )
    p.add_argument("--reservoir-factor", type=int, default=4, help="k-means reservoir = this x K")
    p.add_argument("--seed-centers", type=int, default=96, help="k-means++ centers measured")
    p.add_argument("--pass-rows", type=int, default=4096, help="rows of the measured pass")
    p.add_argument(
        "--whole-call-max",
        type=int,
        default=65536,
        help="also time one whole default KMeansReestimate call up to this many codes",
    )
    p.add_argument("--json-out", type=Path, default=Path("benchmarks/results/large_k.json"))
    p.add_argument("--no-write", action="store_true", help="no JSON file, no BENCHMARKS.md")
    p.add_argument("--from-json", type=Path, default=None, help="re-render a saved run's tables")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cmd = " ".join(["python benchmarks/bench_large_k.py", *sys.argv[1:]])
    if args.from_json is not None:  # re-render a saved run's tables, measuring nothing
        saved = json.loads(args.from_json.read_text())
        for key, value in saved["config"].items():
            setattr(args, key, value)
        table = markdown(args, saved["rows"], saved["kmeans"], saved["command"].strip())
        print(table)
        if not args.no_write:
            update_benchmarks_md("large_k", table)
        return

    peer = not args.no_peer and importlib.util.find_spec("vector_quantize_pytorch") is not None
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    peer_per_elem = None
    saved: dict[str, Any] | None = None
    if args.kmeans_only:
        saved = json.loads(args.json_out.read_text())
        rows = saved["rows"]
    for m, k in sorted(
        ((m, k) for m in args.tokens for k in args.codes if saved is None),
        key=lambda t: t[0] * t[1],
    ):
        case = run_case(m, k, args, peer, peer_per_elem)
        rows += case
        for r in case:
            if r["impl"] == PEER and r.get("peak_extra_mib") and peer_per_elem is None:
                peer_per_elem = r["peak_extra_mib"] * MIB / (m * k)
    km = [] if args.no_kmeans else [run_kmeans(k, args) for k in sorted(args.codes)]
    if saved is not None:
        # the quantizer rows, their machine and command stay those of the saved run
        if saved["machine"]["cpu_model"] != machine_info()["cpu_model"]:
            raise SystemExit("--kmeans-only: the saved rows come from another CPU; run it all")
        cmd = f"{saved['command'].splitlines()[0]}\n{cmd}"

    target = [
        {
            "impl": r["impl"],
            "tokens": r["tokens"],
            "x_floor_chunked": r["x_floor_chunked"],
            "x_floor": r["x_floor"],
        }
        for r in rows
        if r["impl"] in (GRAD, EMA) and r["codes"] == 65536 and r["status"] == "ok"
    ]
    result = {
        "benchmark": "large_k",
        "machine": machine_info(),
        "command": cmd,
        "config": {
            k: v
            for k, v in vars(args).items()
            if k not in ("json_out", "no_write", "kmeans_only", "from_json")
        },
        "max_block": DEFAULT_MAX_BLOCK,
        "rows": rows,
        "memory_growth": memory_growth(rows, args.dim),
        "kmeans": km,
        "target": {"x_floor_max": TARGET, "at_codes": 65536, "cases": target},
        "seconds_total": time.perf_counter() - t_start,
    }
    print_json(result)
    table = markdown(args, rows, km, cmd)
    print(table)
    if not args.no_write:
        write_json(result, args.json_out)
        update_benchmarks_md("large_k", table)


if __name__ == "__main__":
    main()

"""The utilization study (issue 6): which codebook strategy keeps every code alive, on real images.

    python benchmarks/utilization_study.py                      # the full table, K=1024, 2 seeds
    python benchmarks/utilization_study.py --codebook-sizes 1024 8192
    python benchmarks/utilization_study.py --quick              # CI-sized check (~1 minute)

The full table (12 rows x 2 seeds x 1,000 steps at K=1024) is estimated at 1-1.5 hours on 2 idle
cores with ``--threads 2`` (at most ~1 h 52 min at the quickstart's Lightning step rate); how
that was estimated is in ``docs/utilization_study.md`` until the generated page replaces it.

Every row trains the quickstart model (``configs/quickstart.yaml``: 32 px, base 32, mult
[1, 2, 2], z 64, quantizer dim 64) on the bundled Fluent Emoji 3D set with the same split, the
same batches (the quickstart's seeded, resumable loader and augmentation), the same AdamW +
warm-up/cosine schedule, gradient clipping and step budget; only the quantizer differs. For a
seed index ``s`` the encoder/decoder start from the same weights and see the same batches in
every row. The loop is a plain PyTorch loop doing what ``VQTokenizerModule`` does under
Lightning (forward, ``VQLoss``, backward, clip, AdamW, scheduler, optimizer-row reset after a
gradient-mode codebook reset); training time is the sum of the step times, validation excluded.

Validation figures come from one function for every row: the validation split is encoded in
eval mode and the returned indices are counted by ``vqkit.CodeUsage`` (eval horizon), so the
peer (``vector_quantize_pytorch``, row 10) is measured by exactly the same code. The curve is the
validation-split utilization every ``--curve-every`` steps (not a training-window figure).

Results go to ``benchmarks/results/utilization_study.json`` (written after every finished run, so
an interrupted study resumes where it stopped; ``--fresh`` starts over) and
``docs/utilization_study.md`` with PNGs under ``docs/images/``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

try:
    from benchmarks.common import REPO_ROOT, write_json
except ImportError:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import REPO_ROOT, write_json

# What each row trains, how the runs are made and how the page is written live in
# benchmarks/utilization/ (rows.py, runner.py, report.py); this file is the command line.
from benchmarks.utilization.report import paths_for, write_report
from benchmarks.utilization.rows import ROWS
from benchmarks.utilization.runner import merge_studies, run_study, setting

QUICK_ROWS = ("plain", "default", "peer")
DEFAULT_STEPS = 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", nargs="+", default=None, help=f"rows to run, of {list(ROWS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seed indices (default 0 1)")
    p.add_argument(
        "--steps", type=int, default=None, help=f"step budget at K=1024 (default {DEFAULT_STEPS})"
    )
    p.add_argument(
        "--steps-large",
        type=int,
        default=None,
        help="step budget for K > 1024 (default: half of --steps)",
    )
    p.add_argument("--codebook-sizes", nargs="+", type=int, default=[1024])
    p.add_argument("--threads", type=int, default=2, help="torch threads (the study: 2)")
    p.add_argument("--out", type=Path, default=None, help="output root (default: the repository)")
    p.add_argument("--curve-every", type=int, default=None, help="validation every N steps")
    p.add_argument("--quick", action="store_true", help="3 rows, 1 seed, 30 steps, 64 val images")
    p.add_argument("--fresh", action="store_true", help="discard finished runs in the JSON")
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        help="train nothing: merge these study JSONs (made in parallel with --out) into the "
        "study's JSON and page",
    )
    p.add_argument(
        "--data",
        choices=["emoji", "avatars"],
        default="emoji",
        help="emoji: the bundled set (utilization_study.json); avatars: the avatar set "
        "(large_k_study.json), sized by --train-images / --val-images",
    )
    p.add_argument("--train-images", type=int, default=None, help="avatars: default 60,000")
    p.add_argument("--val-images", type=int, default=None, help="avatars: default 20,000")
    p.add_argument(
        "--curve-images", type=int, default=None, help="validation images for the curve points"
    )
    p.add_argument(
        "--flip-p",
        type=float,
        default=None,
        help="probability of a horizontal flip of a training image (default: 0.5 on emoji, "
        "the data module's; 0 on avatars, which DiceBear draws with one handedness)",
    )
    args = p.parse_args(argv)
    for path in args.merge or ():
        if not path.is_file():
            p.error(f"--merge: no study JSON at {path}")
    if args.flip_p is None:
        args.flip_p = 0.0 if args.data == "avatars" else 0.5
    if not 0.0 <= args.flip_p <= 1.0:
        p.error(f"--flip-p must be in [0, 1], got {args.flip_p}")
    if args.data == "avatars":
        args.train_images = args.train_images or (800 if args.quick else 60_000)
        args.val_images = args.val_images or (64 if args.quick else 20_000)
    elif args.train_images is not None:
        p.error("--train-images applies to --data avatars (emoji: the bundled split)")
    if args.quick:
        args.rows = args.rows or list(QUICK_ROWS)
        args.seeds = args.seeds or [0]
        args.steps = args.steps or 30
        args.out = args.out or REPO_ROOT / "runs" / "utilization_study_quick"
    args.rows = args.rows or list(ROWS)
    args.seeds = args.seeds if args.seeds is not None else [0, 1]
    args.steps = args.steps or DEFAULT_STEPS
    args.out = args.out or REPO_ROOT
    for r in args.rows:
        if r not in ROWS:
            p.error(f"unknown row {r!r}; rows are {list(ROWS)}")
    if args.steps < 1 or (args.steps_large is not None and args.steps_large < 1):
        p.error(f"--steps must be >= 1, got {args.steps}")
    for k in args.codebook_sizes:
        if k < 2:
            p.error(f"--codebook-sizes must be >= 2, got {k}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.merge:
        result = merge_studies(args.merge)
        json_path = args.out / paths_for(setting(result["settings"], "data"))[0]
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(result, json_path)
        md_path = write_report(result, args.out)
        print(f"merged {len(result['runs'])} runs into {json_path} and {md_path}")
        return result
    json_path = args.out / paths_for(args.data)[0]
    command = "python " + " ".join(
        shlex.quote(a)
        for a in ["benchmarks/utilization_study.py", *(argv if argv is not None else sys.argv[1:])]
    )
    result = run_study(
        rows=args.rows,
        seeds=args.seeds,
        codebook_sizes=args.codebook_sizes,
        steps=args.steps,
        steps_large=args.steps_large,
        curve_every=args.curve_every,
        threads=args.threads,
        quick=args.quick,
        json_path=json_path,
        fresh=args.fresh,
        command=command,
        data=args.data,
        train_images=args.train_images,
        val_images=args.val_images,
        curve_images=args.curve_images,
        flip_p=args.flip_p,
    )
    md_path = write_report(result, args.out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, json_path)
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    main()

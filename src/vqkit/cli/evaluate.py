"""``vqkit evaluate``: reconstruction metrics and codebook usage."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .common import _add_input_args, _analysis_data, _guarded, _load_inputs, _source


def _evaluate_parser() -> argparse.ArgumentParser:
    from ..evaluation.evaluate import DEFAULT_METRICS, METRICS

    p = argparse.ArgumentParser(
        prog="vqkit evaluate",
        description="Reconstruction metrics of a trained tokenizer (PSNR, SSIM, LPIPS, rFID, "
        "codebook usage) in metrics.json and metrics.md.",
    )
    _add_input_args(p)
    p.add_argument(
        "--metrics",
        default=None,
        help=f"comma-separated, from {','.join(METRICS)}; default: all, skipping with a note "
        "those that cannot run here (LPIPS without its weights)",
    )
    p.add_argument("--output-dir", required=True, help="where metrics.json and metrics.md go")
    p.add_argument(
        "--fid-cache-dir",
        default=None,
        help="cache of the originals' Inception statistics (default ~/.cache/vqkit/fid-stats)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(default_metrics=DEFAULT_METRICS)
    return p


def _run_evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from torch.utils.data import DataLoader, Subset

    from ..evaluation.evaluate import (
        LPIPSUnavailableError,
        check_metrics,
        evaluate,
        load_lpips,
        markdown_table,
    )
    from ..evaluation.fid import InceptionFeatures, InceptionNotFoundError
    from ..fileio import atomic_write_text

    explicit = args.metrics is not None
    metrics = list(check_metrics(args.metrics.split(",") if explicit else args.default_metrics))
    device, model, dm_hparams, size = _load_inputs(args)
    # Networks that may be missing here: asked for by name, their absence is an error; in the
    # default list, a note.
    notes, lpips, extractor = [], None, None
    for name, build, missing in (
        ("lpips", load_lpips, LPIPSUnavailableError),
        ("rfid", InceptionFeatures, InceptionNotFoundError),
    ):
        if name not in metrics:
            continue
        try:
            net = build()
        except missing as e:
            if explicit:
                raise
            metrics.remove(name)
            notes.append(f"{name} skipped: {e}")
            print(f"vqkit evaluate: note: {name} skipped: {e}", file=sys.stderr)
            continue
        lpips, extractor = (net, extractor) if name == "lpips" else (lpips, net)
    dataset, _, where = _analysis_data(args, dm_hparams, int(size))
    if args.max_images is not None and args.max_images < len(dataset):
        dataset = Subset(dataset, range(args.max_images))
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers
    )
    results = evaluate(
        model,
        loader,
        metrics,
        device=device,
        lpips=lpips,
        extractor=extractor,
        fid_cache_dir=args.fid_cache_dir,
        progress=not args.no_progress,
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "checkpoint": _source(args.ckpt),
        "data": where,
        "image_size": int(size),
        "device": str(device),
        "metrics": results,
        "notes": notes,
    }
    atomic_write_text(out / "metrics.json", json.dumps(record, indent=2) + "\n")
    title = f"{Path(args.ckpt).name} on {where} ({int(size)} px)"
    md = markdown_table(results, title) + "".join(f"\n_{n}_\n" for n in notes)
    atomic_write_text(out / "metrics.md", md)
    print(md, end="")
    print(f"wrote {out / 'metrics.json'}")
    print(f"wrote {out / 'metrics.md'}")
    return 0


def _evaluate_main(argv: Sequence[str]) -> int:
    args = _evaluate_parser().parse_args(list(argv))
    from ..evaluation.evaluate import LPIPSUnavailableError

    return _guarded("evaluate", _run_evaluate, args, LPIPSUnavailableError)

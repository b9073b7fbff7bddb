"""``vqkit analyze``: how a trained tokenizer uses its codebook."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .common import _add_input_args, _analysis_data, _guarded, _load_inputs, _source


def _analyze_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vqkit analyze",
        description="Measure how a trained tokenizer uses its codebook on a set of images: "
        "whole-set, per-batch and EMA-count figures side by side, in summary.json.",
    )
    _add_input_args(p)
    p.add_argument(
        "--output-dir", "--output_dir", required=True, help="where summary.json (and more) go"
    )
    p.add_argument("--plot", action="store_true", help="write the PNG plots")
    p.add_argument(
        "--save-details",
        "--save_details",
        action="store_true",
        help="write codes.csv and indices.npy (N, h, w) int32 with indices.txt naming each row",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="tau of softmax(-d / tau)")
    p.add_argument(
        "--codebook-size", type=int, default=None, help="fail unless the checkpoint has this K"
    )
    return p


def _print_analysis(report, written) -> None:  # noqa: ANN001
    w, b, e = report.whole_set, report.per_batch, report.ema_counts
    gh, gw = report.token_grid
    print(
        f"vqkit analyze: {report.images} images, {report.tokens} tokens ({gh}x{gw} each), "
        f"codebook_size {report.codebook_size}"
    )
    rows = [
        ("", "whole set", "per batch: mean [min, max]", "EMA counts (training history)"),
        (
            "used codes",
            f"{w.used_codes}",
            f"{b.used_codes_mean:.1f} [{b.used_codes_min}, {b.used_codes_max}]",
            f"{e.codes_above_threshold} with count >= {report.ema_threshold:g}" if e else "-",
        ),
        (
            "utilization",
            f"{w.utilization:.1%}",
            f"{b.utilization_mean:.1%} [{b.utilization_min:.1%}, {b.utilization_max:.1%}]",
            "-",
        ),
        (
            "perplexity",
            f"{w.perplexity:.1f}",
            f"{b.perplexity_mean:.1f} [{b.perplexity_min:.1f}, {b.perplexity_max:.1f}]",
            f"{e.ema_perplexity:.1f}" if e else "-",
        ),
        (
            "normalized entropy",
            f"{w.normalized_entropy:.3f}",
            "-",
            f"{e.ema_normalized_entropy:.3f}" if e else "-",
        ),
        ("dead codes", f"{w.dead_codes}", "-", "-"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(n) for c, n in zip(r, widths, strict=True)).rstrip())
    print(f"top 1% share {report.top1pct_share:.1%}, Gini {report.gini:.3f}")
    print(f"mean quantization error (||z - c||^2) {report.mean_quantization_error:.4g}")
    print(
        f"soft-assignment entropy (tau={report.temperature:g}) {report.soft_entropy:.3f} nats, "
        f"normalized {report.soft_normalized_entropy:.3f}"
    )
    print(f"reconstruction L1 {report.reconstruction_l1:.4f}, PSNR {report.psnr:.2f} dB")
    for path in written:
        print(f"wrote {path}")


def _run_analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    from torch.utils.data import DataLoader, Subset

    from ..evaluation.analyze import analyze
    from ..training.checkpoint import CheckpointError

    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    device, model, dm_hparams, size = _load_inputs(args)
    k = model.quantizer.codebook_size
    if args.codebook_size is not None and args.codebook_size != k:
        raise CheckpointError(
            f"{args.ckpt}: checkpoint has codebook_size {k}, expected {args.codebook_size}"
        )
    dataset, names, where = _analysis_data(args, dm_hparams, int(size))
    if args.max_images is not None and args.max_images < len(dataset):
        dataset, names = Subset(dataset, range(args.max_images)), names[: args.max_images]
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers
    )
    report = analyze(
        model,
        loader,
        temperature=args.temperature,
        device=device,
        keep_index_maps=args.save_details,
    )
    out = Path(args.output_dir)
    extra = {
        "checkpoint": _source(args.ckpt),
        "data": where,
        "image_size": int(size),
        "batch_size": args.batch_size,
        "device": str(device),
    }
    written = report.save(out, details=args.save_details, names=names, extra=extra)
    if args.plot:
        from ..evaluation.plots import save_report_plots

        written += save_report_plots(report, out)
    _print_analysis(report, written)
    return 0


def _analyze_main(argv: Sequence[str]) -> int:
    return _guarded("analyze", _run_analyze, _analyze_parser().parse_args(list(argv)))

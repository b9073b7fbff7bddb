"""``vqkit sample``: decode drawn codes and edit images' codes."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .common import _add_trust_arg, _guarded, _load_checkpoint


def _sample_parser() -> argparse.ArgumentParser:
    from ..evaluation.sampling import SOURCES

    p = argparse.ArgumentParser(
        prog="vqkit sample",
        description="Decode code grids drawn from a trained tokenizer's codebook, and edit the "
        "codes of real images (encode -> redraw or swap codes -> decode), to see what the codes "
        "mean. Not a generative model: codes are drawn independently per position.",
    )
    p.add_argument(
        "--ckpt",
        required=True,
        help="the tokenizer: a `vqkit fit` checkpoint, a `vqkit export` folder or a Hub id",
    )
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

    from ..data.images import load_image
    from ..evaluation.metrics import psnr
    from ..evaluation.sampling import (
        code_distribution,
        decode_codes,
        half_mask,
        mix_codes,
        perturb_codes,
        sample_codes,
    )
    from ..evaluation.visual import labelled_grid, sample_grid, save_png
    from ..fileio import atomic_save_npy

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
    from ..prior import load_prior_transformer

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

"""The README's pictures: a trained tokenizer's reconstructions of images from its training
split and of held-out images (its validation split), as ``vqkit`` draws every grid
(``vqkit.evaluation.visual.labelled_grid``: tiles of at least 128 px, labelled rows, the PSNR
in the title).

    python benchmarks/readme_pictures.py \\
        [--ckpt runs/quickstart/tensorboard/version_0/checkpoints/last.ckpt] [--num 8]
    python benchmarks/readme_pictures.py --name avatars64 \\
        --ckpt runs/avatars64/tensorboard/version_0/checkpoints/last.ckpt

Writes ``docs/images/<name>_train_reconstructions.png`` and
``docs/images/<name>_heldout_reconstructions.png`` (``--name`` quickstart by default); prints the
PSNR of each set shown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vqkit.evaluation.metrics import psnr  # noqa: E402
from vqkit.evaluation.visual import labelled_grid, save_png  # noqa: E402
from vqkit.tokens import tokenizer_split  # noqa: E402
from vqkit.training.export import load_any_tokenizer  # noqa: E402


def _picture(model, dataset, num: int, what: str, out: Path, name: str) -> float:  # noqa: ANN001
    step = max(len(dataset) // num, 1)  # spread over the set, not its first files
    images = torch.stack([dataset[i] for i in range(0, step * num, step)][:num])
    with torch.no_grad():
        codes = model.encode(images)
        recon = model.decode_indices(codes).clamp(-1, 1)
    value = float(psnr(recon, images))  # per-image PSNR on [0, 1], averaged
    h, w = codes.shape[-2:]
    k = model.quantizer.codebook_size
    title = f"{name} tokenizer, {what} images: PSNR {value:.1f} dB ({h}x{w} codes of {k:,})"
    save_png(labelled_grid([images, recon], ["original", "reconstruction"], title), out)
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="runs/quickstart/tensorboard/version_0/checkpoints/last.ckpt")
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--name", default="quickstart", help="names the files and the title")
    args = p.parse_args(argv)
    tok = load_any_tokenizer(args.ckpt)
    from vqkit.training.checkpoint import read_checkpoint

    data = read_checkpoint(args.ckpt)["datamodule_hyper_parameters"]
    dm = tokenizer_split(data, tok.image_size, tok.square)
    dm.prepare_data()
    dm.setup("fit")
    images = REPO / "docs" / "images"
    for what, dataset, name in (
        ("training", dm.train_dataset, f"{args.name}_train_reconstructions.png"),
        ("held-out (validation)", dm.val_dataset, f"{args.name}_heldout_reconstructions.png"),
    ):
        value = _picture(tok.model, dataset, args.num, what, images / name, args.name)
        print(f"{images / name}: PSNR {value:.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

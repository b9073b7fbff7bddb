"""Where the default loses codes at K = 65,536 on the avatar study (issue 13).

    python benchmarks/large_k_diagnosis.py                   # K = 65,536, 300 steps, seed 0
    python benchmarks/large_k_diagnosis.py --codebook-size 16384

Trains the study's ``default`` row exactly as ``benchmarks/utilization_study.py --data avatars``
does (same data, split, batches, schedule scale and seed: its utilization equals the study's
run), then, with the final encoder, counts how many codes of other codebooks the validation
tokens would use:

- the trained codebook, on the validation split and on 10,000 training images without the
  colour jitter (as many tokens): does the codebook fit the training images better?
- K training tokens of the final encoder drawn at random, used as codes;
- k-means (plain k-means++, 3 Lloyd iterations) of the final encoder's tokens: 60 steps of
  jittered training batches (what the last re-estimation of a 300-step run sees), and 60 / 120
  / 240 steps' worth of un-jittered training images;
- k-means of 60 steps' worth of validation tokens, counted on the other half of the split.

The gap between the trained codebook and k-means of the final encoder's tokens is what the
codebook loses after its last re-estimation (encoder drift and EMA updates); the gap between
k-means and random tokens is what averaging 1-4 tokens per code costs.

Writes ``benchmarks/results/large_k_diagnosis.json`` and prints a table. One torch thread;
about 45 minutes at K = 65,536 beside another one-thread job on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

try:
    from benchmarks.common import REPO_ROOT, machine_info, write_json
except ImportError:  # run as a script from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import REPO_ROOT, machine_info, write_json

from benchmarks.utilization.rows import load_quickstart, schedule_scale
from benchmarks.utilization.runner import load_data, run_one

from vqkit.data.avatars import fetch_avatars
from vqkit.data.images import ImageFolderDataset
from vqkit.quantize.distance import nearest
from vqkit.quantize.kmeans import kmeans


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--codebook-size", type=int, default=65536)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    default_out = REPO_ROOT / "benchmarks/results/large_k_diagnosis.json"
    p.add_argument("--out", type=Path, default=default_out)
    return p.parse_args(argv)


def tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pre-quantization encoder outputs (N x h x w, D) of ``images``."""
    zs = []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            z = model.quant_conv(model.encoder(images[i : i + 256]))
            zs.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
    return torch.cat(zs)


def utilization(codes: torch.Tensor, z: torch.Tensor) -> float:
    idx, _ = nearest(z, codes)
    return float((torch.bincount(idx, minlength=codes.shape[0]) > 0).float().mean())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    k = args.codebook_size
    qs = load_quickstart()
    data = load_data(
        qs, max_images=None, val_images=10000, data="avatars", train_images=60000, flip_p=0.0
    )
    built = fetch_avatars(60000, 10000)
    clean = ImageFolderDataset(
        built.train[:10000], qs["image_size"], augment=False, flip_p=0.0, validate=False, cache=True
    )
    # tokens of one training step: the batch times the code grid (32 x 8 x 8 = 2,048)
    grid = qs["image_size"] // 2 ** (len(qs["model"]["channel_mult"]) - 1)
    per_step = qs["batch_size"] * grid * grid

    def extra(model: torch.nn.Module) -> dict:
        model.eval()
        cb = model.quantizer.effective_codebook().detach()
        zv = tokens(model, data.val)
        zc = tokens(model, torch.stack([clean[i] for i in range(10000)]))
        torch.manual_seed(123)  # the jitter of the training images below
        zj = tokens(model, torch.stack([data.train[i] for i in range(7680)]))
        r: dict = {"val_tokens": zv.shape[0]}
        r["trained_cb_on_val"] = utilization(cb, zv)
        r["trained_cb_on_train_clean_640k"] = utilization(cb, zc)
        pick = torch.randperm(zc.shape[0], generator=torch.Generator().manual_seed(0))
        r["random_sample_codes_on_val"] = utilization(zc[pick[:k]], zv)
        print(r, flush=True)
        for name, z, n in [
            ("jit", zj, per_step * 60),
            ("clean", zc, per_step * 60),
            ("clean", zc, per_step * 120),
            ("clean", zc, per_step * 240),
        ]:
            t = time.time()
            km = kmeans(z[:n], k, iters=3, local_trials=1, seed=0)
            r[f"kmeans_{name}_{n}_on_val"] = utilization(km.centers, zv)
            r[f"kmeans_{name}_{n}_seconds"] = time.time() - t
            print(name, n, r[f"kmeans_{name}_{n}_on_val"], time.time() - t, flush=True)
        # same distribution, no drift: fit on 60 steps' worth of validation tokens, count the
        # other half of the split
        half = zv.shape[0] // 2
        km = kmeans(zv[: per_step * 60], k, iters=3, local_trials=1, seed=0)
        r["kmeans_val122880_on_otherhalf"] = utilization(km.centers, zv[half:])
        r["trained_cb_on_val_half"] = utilization(cb, zv[half:])
        model.train()
        return {"diag": r}

    scale = schedule_scale(args.steps, qs["schedule_reach"])
    run = run_one("default", k, args.seed, args.steps, data, qs, 100, scale, 2000, extra_eval=extra)
    run.pop("counts", None)
    result = {
        "benchmark": "large_k_diagnosis",
        "command": "python benchmarks/large_k_diagnosis.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "run": run,
    }
    write_json(result, args.out)
    d = run["diag"]
    print(f"\n| codebook (K = {k}) | codes used by the validation tokens |\n|---|---:|")
    for key, value in d.items():
        if key.endswith("_seconds") or key == "val_tokens":
            continue
        print(f"| {key} | {100 * value:.1f}% |")
    print(json.dumps(d, indent=1))
    return result


if __name__ == "__main__":
    main()

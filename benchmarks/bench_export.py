"""What ``vqkit export`` gives a user of a trained tokenizer: the folder's size against the
training checkpoint's, and the time to load it with ``VQModel.from_pretrained`` (core
dependencies, safetensors) against ``vqkit.training.load_model`` on the checkpoint (Lightning +
jsonargparse + a pickle read), the way every command loaded a tokenizer before.

    python benchmarks/bench_export.py [--threads 2] [--repeat 7] [--configs quickstart anime]
                                      [--no-write]

Each config's model comes from its YAML (``configs/quickstart.yaml``: 32 px, K = 1,024, 16,384-row
reservoir; ``configs/vqvae_anime.yaml``: seed 004's 256 px model, 65,536-row reservoir). A
training checkpoint is written the way ``vqkit fit`` holds one: a few training forwards with
Adam steps past the k-means initialization (warm-up shortened to 1 step), so the reservoirs,
EMA statistics and optimizer moments are all there. Both loads must give the same tokens
(checked bitwise). Load times are medians of ``--repeat`` (cold process caches are not
modelled: the files are in the page cache after the first read).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

try:
    from benchmarks.common import (
        REPO_ROOT,
        machine_info,
        print_json,
        timeit,
        update_benchmarks_md,
        write_json,
    )
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import (
        REPO_ROOT,
        machine_info,
        print_json,
        timeit,
        update_benchmarks_md,
        write_json,
    )

from vqkit.configurable import build
from vqkit.models import VQModel
from vqkit.training import load_model
from vqkit.training.export import export_checkpoint

CONFIGS = {
    "quickstart": ("configs/quickstart.yaml", 8),
    "anime": ("configs/vqvae_anime.yaml", 2),
}


def _size(path: Path) -> int:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        if path.is_dir()
        else (path.stat().st_size)
    )


def _checkpoint(name: str, folder: Path) -> tuple[Path, int]:
    config_file, batch = CONFIGS[name]
    cfg = yaml.safe_load((REPO_ROOT / config_file).read_text())
    model_config = copy.deepcopy(cfg["model"]["model"])
    for m in model_config["init_args"]["quantizer"]["init_args"].get("maintenance", []):
        if m["class_path"].endswith("KMeansInit"):
            m["init_args"]["warmup_steps"] = 1
    torch.manual_seed(0)
    model = build(model_config)
    size = int(model_config["init_args"]["resolution"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for _ in range(3):
        out = model(torch.rand(batch, 3, size, size) * 2 - 1)
        loss = out.vq_loss + out.reconstructions.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert int(model.quantizer.quantized_steps) > 0
    ckpt = {
        "global_step": 3,
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "optimizer_states": [opt.state_dict()],
        # as LightningCLI records them, so load_model instantiates the model from the config
        "hyper_parameters": {
            "_class_path": "vqkit.training.VQTokenizerModule",
            "model": model_config,
            "_instantiator": "lightning.pytorch.cli.instantiate_module",
        },
        "datamodule_hyper_parameters": {"image_size": size, "square": "crop"},
    }
    path = folder / f"{name}.ckpt"
    torch.save(ckpt, path)
    return path, size


def run(name: str, repeat: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="vqkit-bench-export-") as tmp:
        folder = Path(tmp)
        ckpt, size = _checkpoint(name, folder)
        t0 = time.perf_counter()
        out = export_checkpoint(ckpt, folder / "exported")
        export_s = time.perf_counter() - t0
        load_pretrained_s = timeit(lambda: VQModel.from_pretrained(out), repeat)
        load_ckpt_s = timeit(lambda: load_model(ckpt), repeat)
        images = torch.rand(2, 3, size, size) * 2 - 1
        same = torch.equal(
            VQModel.from_pretrained(out).encode(images), load_model(ckpt).encode(images)
        )
        params = sum(p.numel() for p in VQModel.from_pretrained(out).parameters())
        return {
            "config": name,
            "image_size": size,
            "params_m": params / 1e6,
            "checkpoint_mb": _size(ckpt) / 1e6,
            "export_mb": _size(out) / 1e6,
            "export_s": export_s,
            "from_pretrained_s": load_pretrained_s,
            "load_model_s": load_ckpt_s,
            "same_tokens": same,
        }


def markdown(rows: list[dict], info: dict, repeat: int) -> str:
    lines = [
        f"`vqkit export` folders against the training checkpoints they come from "
        f"({info['torch_threads']} thread(s), torch {info['torch']}; load times are medians "
        f"of {repeat}). Reference: `vqkit.training.load_model(ckpt)`, how the commands load a "
        "tokenizer from a checkpoint. `python benchmarks/bench_export.py`.",
        "",
        "| config | image | params (M) | checkpoint (MB) | export (MB) | export (s) "
        "| from_pretrained (s) | load_model (s) | same tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['image_size']} | {r['params_m']:.1f} | "
            f"{r['checkpoint_mb']:.1f} | {r['export_mb']:.1f} | {r['export_s']:.2f} | "
            f"{r['from_pretrained_s']:.3f} | {r['load_model_s']:.3f} | {r['same_tokens']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--json-out", default=None)
    p.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [run(name, args.repeat) for name in args.configs]
    info = machine_info()
    result = {"benchmark": "export", "machine": info, "rows": rows}
    print_json(result)
    md = markdown(rows, info, args.repeat)
    print(md)
    if args.json_out:
        write_json(result, args.json_out)
    if not args.no_write:
        update_benchmarks_md("export", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

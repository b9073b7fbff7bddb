"""Run by test_resume.py in fresh processes: train, checkpoint, resume."""

import sys

import torch
import torch.nn.functional as F
from torch import nn

from vqkit import DeadCodeRestart, EMAUpdate, KMeansInit, KMeansReestimate, VectorQuantizer


def build(mode: str) -> nn.Module:
    if mode == "ema":
        vq = VectorQuantizer(
            8,
            32,
            ema=EMAUpdate(decay=0.9),
            sample_temperature=0.5,
            maintenance=[
                KMeansInit(warmup_steps=3, reservoir_size=256),
                KMeansReestimate(every=4, until=20, reservoir_size=128, mode="dead"),
                DeadCodeRestart(threshold=1.0, source="reservoir", reservoir_size=64),
            ],
        )
    else:
        vq = VectorQuantizer(
            8, 32, maintenance=[KMeansReestimate(every=4, until=20, reservoir_size=128)]
        )
    return nn.ModuleDict({"enc": nn.Linear(4, 8), "vq": vq, "dec": nn.Linear(8, 4)})


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return torch.randn(40, 4, generator=g) * (1 + (torch.arange(40) % 5)[:, None])


def train(model: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int) -> None:
    from vqkit import reset_optimizer_state

    model.train()
    for step in range(start, stop):
        x = batch(step)
        out = model["vq"](model["enc"](x))
        loss = F.mse_loss(model["dec"](out.quantized), x) + out.loss
        opt.zero_grad()
        loss.backward()
        reset_optimizer_state(opt, model["vq"])
        opt.step()


def main(mode: str, phase: str, path: str, n: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build(mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if phase == "whole":
        train(model, opt, 0, 2 * n)
    elif phase == "first":
        train(model, opt, 0, n)
    else:
        ck = torch.load(path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        torch.set_rng_state(ck["rng"])
        train(model, opt, n, 2 * n)
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, path
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))

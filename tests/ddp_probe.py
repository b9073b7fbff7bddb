"""A callback the 2-process DDP fit test adds to `vqkit fit` (tests/ is on PYTHONPATH there):
each rank writes what it trained on and what it ended with, for the test to compare."""

import os
from pathlib import Path

import lightning as L
import torch


class Probe(L.Callback):
    def __init__(self) -> None:
        self.out = Path(os.environ["VQKIT_PROBE_DIR"])
        self.first_batches: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        # what a resumed run starts from (the checkpoint's state, as this process loaded it)
        self.start_state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        self.start_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        # One number per image identifies it (the tiny test images differ in colour).
        self.first_batches.append(images.detach().double().sum(dim=(1, 2, 3)).cpu())

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        loader = trainer.train_dataloader
        sampler = loader.sampler
        sampler.epoch = 0
        torch.save(
            {
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "shard_epoch0": sampler._shard(),
                "n": sampler.n,
                "batch_sums": self.first_batches,
                "state": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                "global_step": trainer.global_step,
                "start_state": self.start_state,
                "start_step": self.start_step,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


class KillRank(L.Callback):
    """Process ``rank`` kills itself with SIGKILL before training step ``step`` (a node that
    dies): the other processes must stop with an error, not wait forever."""

    def __init__(self, rank: int = 1, step: int = 7) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


class PriorProbe(L.Callback):
    """The same for `vqkit prior fit`: the code grids each rank trained on and its weights."""

    def __init__(self) -> None:
        self.out = Path(os.environ["VQKIT_PROBE_DIR"])
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.batches.append(batch[0].detach().long().flatten(1).cpu())

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        torch.save(
            {
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "batches": self.batches,
                "val_nll": float(trainer.callback_metrics["val/nll"]),
                "state": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                "global_step": trainer.global_step,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )

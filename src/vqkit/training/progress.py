"""A rich progress bar that counts optimizer steps when the run is bounded by ``max_steps``.

Lightning's bar counts batches of the current epoch and titles it ``Epoch 15/-2`` when a run
has ``max_steps`` and no ``max_epochs`` (``max_epochs`` is then -1). vqkit's runs are bounded by
steps, so the bar shows ``Step 750/1500 (epoch 15)`` and fills over the whole run. Epoch-bounded
runs get Lightning's bar unchanged.

Lightning's bar also adds a new (hidden once done) task to its ``rich`` display at every
validation and keeps the old ones (its own "TODO: remove old tasks"), so a long run grows by
one task and the renderables ``rich``'s columns cached for it (about 40 Python objects) per
validation; this bar removes the replaced task and those.
"""

from __future__ import annotations

import contextlib
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


def _step_bounded(trainer: L.Trainer) -> bool:
    max_epochs = trainer.max_epochs
    return (
        trainer.max_steps is not None
        and trainer.max_steps > 0
        and (max_epochs is None or max_epochs < 0)
    )


class StepProgressBar(RichProgressBar):
    """:class:`~lightning.pytorch.callbacks.RichProgressBar` over steps of ``max_steps``."""

    @property
    def total_train_batches(self) -> int | float:
        if _step_bounded(self.trainer):
            return self.trainer.max_steps
        return super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not _step_bounded(self.trainer):
            return super()._get_train_description(current_epoch)
        return f"Step {self.trainer.global_step}/{self.trainer.max_steps} (epoch {current_epoch})"

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        old = (self.val_sanity_progress_bar_id, self.val_progress_bar_id)
        super().on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        new = (self.val_sanity_progress_bar_id, self.val_progress_bar_id)
        if self.progress is None:
            return
        live = getattr(self.progress, "live", None)
        # rich's refresh thread renders the columns under the live display's lock: holding it,
        # no render of a task being removed can put its cache entry back after the sweep
        lock = getattr(live, "_lock", None) or contextlib.nullcontext()
        with lock:
            for before, after in zip(old, new, strict=True):
                # the parent hid the previous validation's task and added a new one: drop the old
                if before is not None and before != after and before in self.progress.task_ids:
                    self.progress.remove_task(before)
            # rich's columns cache a renderable per task id and never forget one
            alive = set(self.progress.task_ids)
            for column in self.progress.columns:
                cache = getattr(column, "_renderable_cache", None)
                if isinstance(cache, dict):
                    for task_id in [k for k in cache if k not in alive]:
                        del cache[task_id]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if _step_bounded(trainer):
            # the parent reset the bar to 0 for the new epoch; a step bar goes on where it was
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not _step_bounded(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # resumed mid-epoch
        if self.progress is not None and self.train_progress_bar_id is not None:
            description = self._get_train_description(trainer.current_epoch)
            if self.theme.description:
                description = f"[{self.theme.description}]{description}"
            self.progress.update(self.train_progress_bar_id, description=description)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

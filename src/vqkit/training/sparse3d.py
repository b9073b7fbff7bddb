"""The LightningModule of the sparse SDF example: a ``SparseSDFVQVAE`` trained on token lists.

It is a ``VQTokenizerModule`` (same optimizer, schedule, skipped non-finite steps, optimizer
rows reset after a gradient-mode re-estimation, usage windows, codebook health lines, summary)
whose batches are the dicts of ``vqkit.data.sparse3d`` instead of images. The figures:

- ``val/sdf_l1``: mean |reconstructed - original| of the normalized SDF (units of the
  truncation) over every voxel of the active patches; ``val/sdf_l1_voxels`` the same in voxels;
- ``val/iou``: IoU of the occupied voxels (SDF < 0) inside the active patches, over the whole
  validation set (inactive patches are given: the sparse structure is not what is coded);
- ``val/chamfer``: Chamfer distance (world units, the grid spans [-1, 1]) between the
  marching-cubes meshes of the original and reconstructed grids, mean over the first
  ``chamfer_shapes`` validation shapes;
- ``val/utilization`` and the rest of the whole-set usage (as for images), and per shape:
  ``val/shape_used_codes`` (distinct codes per shape), ``val/shape_perplexity`` and
  ``val/shape_used_per_token`` (distinct codes / patches), means over the shapes.

At the end of ``fit`` the held-out meshes are reconstructed and measured the same way, per
mesh, into ``summary.json``, and ``reconstructions.png`` shows original and reconstructed
meshes of validation shapes and held-out meshes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..models.sparse3d import SparseSDFVQVAE
from ..quantize import NonFiniteError
from .module import VQTokenizerModule, _bad_terms

_log = logging.getLogger("vqkit.training")


def dense_grids(batch: dict[str, Any], values: Tensor, resolution: int, patch: int) -> list:
    """Each sample's dense normalized SDF grid (numpy) from its patches ``values``."""
    from ..data.shapes import from_patches

    coords = batch["coords"].cpu().numpy()
    vals = values.detach().float().cpu().numpy()
    inside = batch["inside"].cpu().numpy()
    grids = []
    for b in range(int(batch["batch_size"])):
        rows = coords[:, 0] == b
        grids.append(
            from_patches(
                coords[rows, 1:], vals[rows], inside[b], resolution=resolution, patch=patch
            )
        )
    return grids


def patch_figures(values: Tensor, rec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean |rec - values| over the patches' voxels, and the intersection and union counts of
    their occupied voxels (SDF < 0)."""
    occ_a, occ_b = values < 0, rec < 0
    return (rec - values).abs().mean(), (occ_a & occ_b).sum(), (occ_a | occ_b).sum()


def shape_figures(original: np.ndarray, reconstructed: np.ndarray, seed: int = 0) -> dict:
    """Chamfer distance between the two grids' meshes and the dense occupancy IoU."""
    from ..evaluation.shapes import chamfer_distance, occupancy_iou, surface_mesh

    a, b = surface_mesh(original), surface_mesh(reconstructed)
    return {
        "chamfer": float(chamfer_distance(a, b, seed=seed)),
        "iou_dense": float(occupancy_iou(original, reconstructed)),
        "meshes": (a, b),
    }


class SparseSDFModule(VQTokenizerModule):
    """Train a sparse SDF VQ-VAE on ``ShapeDataModule`` batches.

    Args:
        model: the ``SparseSDFVQVAE``.
        lr, betas, weight_decay, warmup_steps, warmup_start_lr, min_lr, usage_window_steps,
            max_bad_steps: as ``VQTokenizerModule``'s.
        resolution: voxels per grid side of the data (for dense grids and meshes).
        chamfer_shapes: validation shapes (the first ones) whose meshes are compared at each
            validation (marching cubes + Chamfer cost ~0.1 s a shape).
        picture_shapes: validation shapes shown in the pictures.
    """

    summary_unit = "shapes"

    def __init__(
        self,
        model: SparseSDFVQVAE,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        warmup_start_lr: float = 1e-6,
        min_lr: float = 1e-5,
        usage_window_steps: int = 100,
        max_bad_steps: int = 10,
        resolution: int = 64,
        chamfer_shapes: int = 16,
        picture_shapes: int = 4,
    ) -> None:
        if chamfer_shapes < 0 or picture_shapes < 0:
            raise ValueError("chamfer_shapes and picture_shapes must be >= 0")
        if resolution != model.patch * model.grid:
            raise ValueError(
                f"resolution ({resolution}) must be the model's patch x grid "
                f"({model.patch} x {model.grid})"
            )
        super().__init__(
            model,
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            warmup_start_lr=warmup_start_lr,
            min_lr=min_lr,
            usage_window_steps=usage_window_steps,
            log_images_every_n_steps=0,
            num_log_images=picture_shapes,
            max_bad_steps=max_bad_steps,
        )
        self._sums: dict[str, Tensor] = {}
        self._val_shapes: list[tuple[str, dict]] = []  # (name, shape_figures) to picture

    # ------------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        values, coords, bs = batch["values"], batch["coords"], int(batch["batch_size"])
        try:
            out = self.model(values, coords, bs)
        except NonFiniteError as e:
            return self._skip_step(str(e))
        l1 = (out.reconstructions - values).abs().mean()
        total = l1 + out.vq_loss
        terms = {"l1": l1, **out.vq_losses}
        if self._not_finite(total):
            return self._skip_step(_bad_terms(total, terms))
        self._bad_in_a_row = 0
        self._reset_replaced_rows()
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=bs)
        k = self.quantizer.codebook_size
        self.log("train/quantized", 0.0 if out.passthrough else 1.0, batch_size=bs)
        if not out.passthrough:
            self.log("train/batch_utilization", out.used_codes.float() / k, batch_size=bs)
            self.log("train/batch_perplexity", out.perplexity, batch_size=bs)
            per = out.per_sample
            self.log("train/shape_used_codes", per.used_codes.float().mean(), batch_size=bs)
        self.log("train/lr", self._generator_optimizer().param_groups[0]["lr"], batch_size=bs)
        usage = self.quantizer.usage
        if int(usage.window_forwards) >= self.hparams.usage_window_steps:
            self._log_usage("train_window", usage.stats("window"))
            usage.reset_window()
        return total

    # ------------------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        names = ("inter", "union", "chamfer", "chamfer_n")
        self._sums = {name: zero.clone() for name in names}
        self._val_shapes = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        values, coords, bs = batch["values"], batch["coords"], int(batch["batch_size"])
        out = self.model(values, coords, bs)
        rec = out.reconstructions
        l1, inter, union = patch_figures(values, rec)
        self.log("val/sdf_l1", l1, prog_bar=True, sync_dist=True, batch_size=values.numel())
        self.log("val/vq_loss", out.vq_loss, sync_dist=True, batch_size=bs)
        per = out.per_sample
        for name in ("used_codes", "perplexity", "used_per_token"):
            v = getattr(per, name).float().mean()
            self.log(f"val/shape_{name}", v, sync_dist=True, batch_size=bs)
        self._sums["inter"] += inter
        self._sums["union"] += union
        self._meshes_of(batch, rec)

    def _meshes_of(self, batch: dict[str, Any], rec: Tensor) -> None:
        index = batch["index"].tolist()
        want = [
            b
            for b, i in enumerate(index)
            if i < max(self.hparams.chamfer_shapes, self.hparams.picture_shapes)
        ]
        if not want or "inside" not in batch:
            return
        res, patch = self.hparams.resolution, self.model.patch
        originals = dense_grids(batch, batch["values"], res, patch)
        recs = dense_grids(batch, rec, res, patch)
        for b in want:
            i = index[b]
            fig = shape_figures(originals[b], recs[b])  # meshes and figures, made once
            if i < self.hparams.chamfer_shapes:
                self._sums["chamfer"] += fig["chamfer"]
                self._sums["chamfer_n"] += 1
            if i < self.hparams.picture_shapes:
                self._val_shapes.append((f"validation shape {i}", fig))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        sums = self._sums
        if not sums:
            return
        if self._trainer is not None and self.trainer.world_size > 1:
            sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in sums.items()}
        if float(sums["union"]) > 0:
            self.log("val/iou", float(sums["inter"] / sums["union"]), rank_zero_only=False)
        if float(sums["chamfer_n"]) > 0:
            chamfer = float(sums["chamfer"] / sums["chamfer_n"])
            self.log("val/chamfer", chamfer, rank_zero_only=False)
        if self._val_shapes and not self.trainer.sanity_checking:
            self._log_mesh_picture()

    def _log_mesh_picture(self) -> None:
        exp = getattr(self.logger, "experiment", None)
        if exp is None or not hasattr(exp, "add_image") or self.global_rank != 0:
            return
        from ..evaluation.shapes import mesh_comparison_image

        rows = [(name, *fig["meshes"]) for name, fig in self._val_shapes]
        title = f"validation meshes, step {self.global_step}"
        image = mesh_comparison_image(rows, title=title, tile=160)
        exp.add_image("val/meshes", image, self.global_step, dataformats="HWC")

    # ------------------------------------------------------------------------------ the report
    @torch.no_grad()
    def fit_report(self, trainer: Any, folder: Path, summary: dict) -> dict[str, Path]:
        """Held-out meshes measured one by one into ``summary["held_out"]``, and
        ``reconstructions.png``: validation shapes and held-out meshes, original vs
        reconstruction. Runs on the first process only, in eval mode."""
        from ..evaluation.shapes import mesh_comparison_picture

        t0 = time.perf_counter()
        was_training = self.training
        self.eval()
        rows: list[tuple[str, Any, Any]] = []
        notes: list[str] = []
        for name, fig in self._val_shapes:  # the last validation's, measured there
            rows.append((name, *fig["meshes"]))
            notes.append(f"Chamfer {fig['chamfer']:.4f}, IoU {fig['iou_dense']:.3f}")
        dm = getattr(trainer, "datamodule", None)
        held = {}
        batches = (
            dm.held_out_batches(1) if dm is not None and hasattr(dm, "held_out_batches") else []
        )
        names = getattr(getattr(dm, "held_out_set", None), "names", [])
        for i, batch in enumerate(batches):
            batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            out = self.model(batch["values"], batch["coords"], 1)
            a = dense_grids(batch, batch["values"], self.hparams.resolution, self.model.patch)[0]
            b = dense_grids(batch, out.reconstructions, self.hparams.resolution, self.model.patch)[
                0
            ]
            fig = shape_figures(a, b)
            l1, inter, union = patch_figures(batch["values"], out.reconstructions)
            name = names[i] if i < len(names) else f"mesh {i}"
            held[name] = {
                "patches": int(batch["values"].shape[0]),
                "used_codes": int(out.per_sample.used_codes[0]),
                "used_per_token": round(float(out.per_sample.used_per_token[0]), 4),
                "sdf_l1": round(float(l1), 5),
                "iou": round(float(inter / union.clamp_min(1)), 4),
                "chamfer": round(fig["chamfer"], 5),
            }
            rows.append((f"{name} (held out)", *fig["meshes"]))
            notes.append(f"Chamfer {fig['chamfer']:.4f}, IoU {held[name]['iou']:.3f}")
        if held:
            summary["held_out"] = held
        files = {}
        if rows:
            title = f"sparse SDF VQ-VAE, {summary.get('steps', self.global_step)} training steps"
            files["reconstructions"] = mesh_comparison_picture(
                rows, folder / "reconstructions.png", title=title, notes=notes
            )
        self.train(was_training)
        _log.info("shape report: %d meshes in %.1f s", len(rows), time.perf_counter() - t0)
        return files

"""A trained prior as a folder: its ``CodeTransformer`` (``config.json`` + ``model.safetensors``)
with the tokenizer it was trained on in ``tokenizer/`` (a ``VQModel.save_pretrained`` folder),
tied by the tokenizer's sha256. Loads with vqkit's core dependencies only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..configurable import ConfigError, build, to_config
from ..models.vqmodel import VQModel
from ..pretrained import (
    CONFIG_NAME,
    TOKENIZER_FOLDER,
    WEIGHTS_NAME,
    PretrainedError,
    PretrainedMixin,
    load_weights,
    read_config,
    read_weights,
    resolve_folder,
    tokenizer_digest,
)
from .transformer import CodeTransformer


class PretrainedPrior(PretrainedMixin, nn.Module):
    """A prior and its tokenizer: ``sample`` draws code grids and decodes them to images.

    Args:
        transformer: the ``CodeTransformer`` over the tokenizer's code grid.
        tokenizer: the ``VQModel`` whose codes the prior learned (same codebook size and grid).
        image_size: the tokenizer's image size.
    """

    pretrained_kind = "prior"

    def __init__(self, transformer: CodeTransformer, tokenizer: VQModel, image_size: int) -> None:
        super().__init__()
        grid = tokenizer.token_grid(int(image_size))
        if transformer.codebook_size != tokenizer.quantizer.codebook_size:
            raise ValueError(
                f"the prior predicts {transformer.codebook_size} codes, the tokenizer has "
                f"{tokenizer.quantizer.codebook_size}"
            )
        if tuple(transformer.grid) != tuple(grid):
            raise ValueError(
                f"the prior's grid {tuple(transformer.grid)} is not the tokenizer's {grid} at "
                f"{image_size} px"
            )
        self.transformer = transformer
        self.tokenizer = tokenizer.requires_grad_(False).eval()
        self.image_size = int(image_size)

    @torch.no_grad()
    def sample(
        self,
        num: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(codes (num, h, w), images (num, C, H, W) in [-1, 1]) drawn from the prior."""
        device = self.transformer.pos_emb.device
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        codes = self.transformer.generate(
            num, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        return codes, self.tokenizer.decode_indices(codes).clamp(-1, 1)

    # ------------------------------------------------------------------------- pretrained
    def pretrained_config(self) -> dict:
        return to_config(self.transformer, "transformer")

    def pretrained_state_dict(self) -> dict[str, Tensor]:
        return self.transformer.state_dict()

    def pretrained_facts(self, **facts: Any) -> dict:
        """The grid, codebook size, and the tokenizer in ``tokenizer/`` with its sha256."""
        out = {
            "image_size": self.image_size,
            "token_grid": list(self.transformer.grid),
            "codebook_size": self.transformer.codebook_size,
            "tokenizer": TOKENIZER_FOLDER,
            "tokenizer_sha256": tokenizer_digest(self.tokenizer),
        }
        out.update({k: v for k, v in facts.items() if v is not None})
        return out

    def _save_parts(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder / TOKENIZER_FOLDER, image_size=self.image_size)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        *,
        map_location: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> PretrainedPrior:
        """The prior and its tokenizer from a folder (or Hub repository); the tokenizer must
        hash to the sha256 the prior recorded."""
        folder = resolve_folder(path_or_repo, **kwargs)
        config = read_config(folder, "prior")
        try:
            transformer = build(config["model"], "model")
        except ConfigError as e:
            raise PretrainedError(f"{folder / CONFIG_NAME}: {e}") from None
        if not isinstance(transformer, CodeTransformer):
            raise PretrainedError(f"{folder} builds a {type(transformer).__name__}, not a prior")
        load_weights(transformer, read_weights(folder), str(folder / WEIGHTS_NAME))
        tok_folder = folder / str(config.get("tokenizer", TOKENIZER_FOLDER))
        tokenizer = VQModel.from_pretrained(tok_folder)
        recorded = config.get("tokenizer_sha256")
        if recorded is not None and tokenizer_digest(tokenizer) != recorded:
            raise PretrainedError(
                f"{tok_folder} is not the tokenizer the prior in {folder} was trained on "
                f"(sha256 {tokenizer_digest(tokenizer)[:12]} != {str(recorded)[:12]})"
            )
        image_size = int(config.get("image_size") or read_config(tok_folder)["image_size"])
        return cls(transformer, tokenizer, image_size).to(map_location).eval()

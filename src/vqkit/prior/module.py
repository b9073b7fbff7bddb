"""Training a ``CodeTransformer`` prior on a frozen tokenizer's code grids (Lightning)."""

from __future__ import annotations

import inspect
import math
from contextvars import ContextVar
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from ..models import VQModel
from ..training.checkpoint import CheckpointError, read_checkpoint
from ..training.schedules import warmup_cosine
from .tokenizer import FrozenTokenizer, tokenizer_digest, tokenizer_mismatch
from .transformer import CodeTransformer

TRANSFORMER_KEY = "code_transformer"
TOKENIZER_KEY = "tokenizer"  # the tokenizer a prior checkpoint carries (FrozenTokenizer.record)

# The tokenizer ``load_prior`` rebuilt from a prior checkpoint, handed to ``PriorModule.__init__``
# in place of reading the file its ``tokenizer`` argument names.
_REBUILT_TOKENIZER: ContextVar[FrozenTokenizer | None] = ContextVar("tokenizer", default=None)


class PriorModule(L.LightningModule):
    """An autoregressive prior over the code grid of a trained tokenizer (seed 004, phase 3).

    Args:
        tokenizer: the tokenizer's checkpoint (``vqkit fit``) or its ``vqkit export`` folder.
            It gives the codebook size and the token grid, and decodes samples; it is frozen.
            This module's checkpoints carry it (config, weights and their sha256, under
            ``"tokenizer"``, beside the state dict), so ``load_prior`` needs no tokenizer file,
            and a tokenizer given to it or to a resumed run must hash to the recorded sha256.
        n_layer, n_head, n_embd, dropout: the ``CodeTransformer``.
        lr, betas, weight_decay: AdamW (decay on matrices only, not on embeddings, norms or
            biases), with ``warmup_steps`` of linear warm-up and a cosine to ``min_lr``.
        num_log_samples: grids sampled and decoded at each validation, logged as images
            (0: none); ``temperature`` / ``top_k`` shape those samples.

    Logged: ``train/nll`` and ``val/nll`` (nats per code), ``val/bits_per_code``,
    ``val/perplexity`` and, for reference, ``val/unigram_bits`` (the entropy of the training
    codes' frequencies: what a prior that ignores context would reach).
    """

    def __init__(
        self,
        tokenizer: str,
        n_layer: int = 8,
        n_head: int = 8,
        n_embd: int = 512,
        dropout: float = 0.1,
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        warmup_steps: int = 500,
        min_lr: float = 1e-5,
        num_log_samples: int = 16,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> None:
        super().__init__()
        if not tokenizer:
            raise ValueError("PriorModule needs tokenizer= (the checkpoint of a `vqkit fit`)")
        # absolute, so a checkpoint of this module loads from any working directory
        tokenizer = str(Path(tokenizer).expanduser().resolve())
        self.save_hyperparameters()
        tok = _REBUILT_TOKENIZER.get() or FrozenTokenizer.from_file(tokenizer)
        # Frozen and saved on its own (``on_save_checkpoint``): kept out of the module tree (no
        # state-dict keys, nothing for DDP or the optimizer); ``_apply`` moves it to the
        # module's device.
        self._tokenizer = tok
        model = tok.model
        grid = model.token_grid(tok.image_size)
        self.transformer = CodeTransformer(
            model.quantizer.codebook_size,
            grid,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            dropout=dropout,
        )
        self._unigram_bits: float | None = None

    @property
    def tokenizer_model(self) -> VQModel:
        return self._tokenizer.model

    @property
    def tokenizer_sha256(self) -> str:
        """The sha256 of the tokenizer's weights (``tokenizer_digest``)."""
        return self._tokenizer.sha256

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202
        out = super()._apply(fn, recurse)
        # The device only: a cast of the prior (``.half()``, ``bf16-true``) leaves the tokenizer
        # as it was trained, the weights its sha256 describes (it decodes integer codes).
        self._tokenizer.model.to(next(self.transformer.parameters()).device)
        return out

    # ------------------------------------------------------------------------------ steps
    @staticmethod
    def _codes(batch) -> Tensor:  # noqa: ANN001
        return (batch[0] if isinstance(batch, (list, tuple)) else batch).long()

    def training_step(self, batch, batch_idx: int) -> Tensor:  # noqa: ANN001
        codes = self._codes(batch)
        loss = self.transformer.nll(codes)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"prior loss is {float(loss)} at step {self.global_step}")
        self.log("train/nll", loss, prog_bar=True, batch_size=codes.shape[0])
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:  # noqa: ANN001
        codes = self._codes(batch)
        nll = self.transformer.nll(codes)
        self.log("val/nll", nll, prog_bar=True, batch_size=codes.shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        nll = self.trainer.callback_metrics.get("val/nll")
        if nll is not None:
            self.log("val/bits_per_code", float(nll) / math.log(2))
            self.log("val/perplexity", math.exp(float(nll)))
        unigram = self._unigram()
        if unigram is not None:
            self.log("val/unigram_bits", unigram)
        self._log_samples()

    def _unigram(self) -> float | None:
        if self._unigram_bits is None:
            dm = getattr(self.trainer, "datamodule", None)
            codes = getattr(dm, "train_codes", None)
            if codes is None:
                return None
            k = self.transformer.codebook_size
            p = torch.bincount(codes.flatten().long(), minlength=k).double()
            p = p[p > 0] / p.sum()
            self._unigram_bits = float(-(p * p.log2()).sum())
        return self._unigram_bits

    def _log_samples(self) -> None:
        hp = self.hparams
        # read on every process, like on_validation_epoch_end does: a metric reduced over
        # processes must not be asked for by one alone
        nll = self.trainer.callback_metrics.get("val/nll")
        exp = getattr(self.logger, "experiment", None)
        if hp.num_log_samples <= 0 or exp is None or not hasattr(exp, "add_image"):
            return
        if self.global_rank != 0:
            return
        from ..evaluation.sampling import decode_codes
        from ..evaluation.visual import sample_grid

        g = torch.Generator(device=self.device).manual_seed(0)
        codes = self.transformer.generate(
            hp.num_log_samples, temperature=hp.temperature, top_k=hp.top_k, generator=g
        )
        images = decode_codes(self.tokenizer_model, codes)
        title = "prior samples"
        if nll is not None:
            title += f", {float(nll) / math.log(2):.2f} bits per code"
        title += f", temperature {hp.temperature:g}, step {self.global_step}"
        exp.add_image("val/samples", sample_grid(images, title), self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The transformer's own arguments: `load_prior_transformer` rebuilds it for sampling
        # without reading the tokenizer again.
        checkpoint[TRANSFORMER_KEY] = dict(self.transformer.config)
        # The tokenizer itself (config, weights, sha256): `load_prior` rebuilds it from here.
        checkpoint[TOKENIZER_KEY] = self._tokenizer.record()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A resumed run (or `load_from_checkpoint`) built its tokenizer from the file named by
        # `tokenizer`: it must be the one the checkpoint was trained on.
        recorded = _recorded_sha256(checkpoint)
        if recorded is not None and recorded != self.tokenizer_sha256:
            trainer = getattr(self, "_trainer", None)
            prior = getattr(trainer, "ckpt_path", None) or "the checkpoint"
            raise tokenizer_mismatch(prior, self.hparams.tokenizer, self.tokenizer_sha256, recorded)

    # ------------------------------------------------------------------------------ optim
    def configure_optimizers(self):  # noqa: ANN201
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.transformer.named_parameters():
            is_matrix = p.dim() >= 2 and "emb" not in name
            (decay if is_matrix else no_decay).append(p)
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        total = int(total) if total and math.isfinite(total) else max(10 * hp.warmup_steps, 1)

        def factor(step: int) -> float:
            lr = warmup_cosine(
                step,
                base_lr=hp.lr,
                warmup_steps=hp.warmup_steps,
                total_steps=total,
                start_lr=hp.lr * 0.01,
                min_lr=hp.min_lr,
            )
            return lr / hp.lr

        sched = LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _recorded_sha256(ckpt: dict) -> str | None:
    record = ckpt.get(TOKENIZER_KEY)
    digest = record.get("sha256") if isinstance(record, dict) else None
    return digest if isinstance(digest, str) else None


def load_prior(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    tokenizer: str | Path | None = None,
    trust: bool = False,
) -> PriorModule:
    """A ``PriorModule`` from its checkpoint, in eval mode, its tokenizer rebuilt from the
    checkpoint itself (the file it was trained from is not read: it may be moved or gone).

    ``tokenizer``: a ``vqkit fit`` checkpoint that must be the tokenizer the prior was trained
    on (its weights must hash to the recorded sha256, else a ``CheckpointError``); it is also
    the tokenizer of a checkpoint written before priors carried theirs, which record only its
    path. ``trust``: see ``read_checkpoint``.
    """
    ckpt = read_checkpoint(path, map_location, trust=trust)
    hp = ckpt.get("hyper_parameters") or {}
    if "tokenizer" not in hp or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a vqkit prior checkpoint (no tokenizer recorded)")
    if not any(k.startswith("transformer.") for k in ckpt["state_dict"]):
        raise CheckpointError(f"{path} is not a vqkit prior checkpoint (no transformer weights)")
    record = ckpt.get(TOKENIZER_KEY)
    recorded = _recorded_sha256(ckpt)
    given = None
    if tokenizer is not None:
        given = FrozenTokenizer.from_file(tokenizer, trust=trust)
        if recorded is not None and given.sha256 != recorded:
            raise tokenizer_mismatch(path, tokenizer, given.sha256, recorded)
    if isinstance(record, dict) and "state_dict" in record:
        tok = FrozenTokenizer.from_record(record, path)
    elif given is not None:
        tok = given
    else:  # a checkpoint that records its tokenizer's path only
        file = Path(hp["tokenizer"])
        if not file.is_file():
            raise CheckpointError(
                f"{path} records its tokenizer by path only and {file} is gone; pass the "
                f"tokenizer it was trained on: load_prior(path, tokenizer=...)"
            )
        tok = FrozenTokenizer.from_file(file, trust=trust)
        if recorded is not None and tok.sha256 != recorded:
            raise tokenizer_mismatch(path, file, tok.sha256, recorded)
    # LightningCLI adds its own keys (``_instantiator``, ...) to the hyperparameters
    names = inspect.signature(PriorModule.__init__).parameters
    reset = _REBUILT_TOKENIZER.set(tok)
    try:
        module = PriorModule(**{k: v for k, v in hp.items() if k in names})
    finally:
        _REBUILT_TOKENIZER.reset(reset)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def load_prior_transformer(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    trust: bool = False,
    tokenizer: VQModel | str | Path | None = None,
    tokenizer_file: str | Path | None = None,
) -> CodeTransformer:
    """The ``CodeTransformer`` of a prior checkpoint, in eval mode, without its tokenizer (which
    ``vqkit sample`` has already loaded from ``--ckpt``); ``trust``: see ``read_checkpoint``.

    ``tokenizer``: the tokenizer its codes will be decoded with, a ``VQModel`` (named
    ``tokenizer_file`` in errors) or a ``vqkit fit`` checkpoint. If the prior recorded its
    tokenizer's sha256, a tokenizer with other weights is a ``CheckpointError``.
    """
    ckpt = read_checkpoint(path, map_location, trust=trust)
    config = ckpt.get(TRANSFORMER_KEY)
    weights = {
        k.removeprefix("transformer."): v
        for k, v in ckpt["state_dict"].items()
        if k.startswith("transformer.")
    }
    if config is None or not weights:
        raise CheckpointError(f"{path} is not a vqkit prior checkpoint (no {TRANSFORMER_KEY})")
    recorded = _recorded_sha256(ckpt)
    if tokenizer is not None and recorded is not None:
        if isinstance(tokenizer, nn.Module):
            digest, name = tokenizer_digest(tokenizer), tokenizer_file or "the tokenizer given"
        else:
            digest, name = FrozenTokenizer.from_file(tokenizer, trust=trust).sha256, tokenizer
        if digest != recorded:
            raise tokenizer_mismatch(path, name, digest, recorded)
    transformer = CodeTransformer(**config)
    transformer.load_state_dict(weights)
    return transformer.eval()

"""``vqkit export``: a training checkpoint (pickle, optimizer and reservoirs included) to a
``save_pretrained`` folder (``config.json`` + ``model.safetensors`` + ``README.md``), and
``load_any_tokenizer`` for the commands that take either."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..configurable import ConfigError, build
from ..models import VQModel
from ..pretrained import (
    PretrainedError,
    inference_model_config,
    is_training_state,
    load_weights,
    tokenizer_digest,
)
from .checkpoint import CheckpointError, read_checkpoint


@dataclass
class LoadedTokenizer:
    """A tokenizer ready to encode: the model (eval mode, CPU), its image size, how it squares
    images (``"crop"`` / ``"pad"``), its weights' sha256, and where it came from."""

    model: VQModel
    image_size: int
    square: str
    sha256: str
    source: str


def _model_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The ``VQModel`` tensors of a training state dict (``model.`` keys), without the
    quantizer's training state."""
    out = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return {k: v for k, v in out.items() if not is_training_state(k)}


def tokenizer_from_checkpoint_dict(ckpt: dict, source: str) -> VQModel:
    """The inference ``VQModel`` of a ``vqkit fit`` checkpoint dict (or of the tokenizer record
    a prior checkpoint carries: same keys), built from its config without jsonargparse."""
    model_config = (ckpt.get("hyper_parameters") or {}).get("model")
    if not isinstance(model_config, dict):
        raise CheckpointError(f"{source} does not record its model config (not from `vqkit fit`)")
    try:
        model = build(inference_model_config(model_config), "model")
    except ConfigError as e:
        raise CheckpointError(f"{source}: cannot rebuild its model ({e})") from None
    if not isinstance(model, VQModel):
        raise CheckpointError(f"{source} holds a {type(model).__name__}, not a VQModel")
    try:
        load_weights(model, _model_state(ckpt["state_dict"]), source)
    except PretrainedError as e:
        raise CheckpointError(str(e)) from None
    return model.eval()


def find_summary(ckpt_path: Path, levels: int = 4) -> dict | None:
    """The ``summary.json`` of the run that wrote ``ckpt_path`` (the run folder is a few levels
    above ``<run>/tensorboard/version_N/checkpoints/``), or None."""
    folder = ckpt_path.resolve().parent
    for _ in range(levels):
        candidate = folder / "summary.json"
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return data if isinstance(data, dict) else None
        folder = folder.parent
    return None


def _plain(value: Any) -> Any:
    """``value`` if it is JSON-able, else its string (a config value from another version)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


def _trained_with(ckpt: dict) -> dict:
    data = {
        k: _plain(v)
        for k, v in (ckpt.get("datamodule_hyper_parameters") or {}).items()
        if not k.startswith("_")
    }
    return {
        "model": _plain((ckpt.get("hyper_parameters") or {}).get("model")),
        "data": data,
        "global_step": int(ckpt.get("global_step") or 0),
    }


def _card_summary(ckpt: dict, summary: dict | None) -> dict:
    dm = ckpt.get("datamodule_hyper_parameters") or {}
    out: dict[str, Any] = {
        "data": dm.get("root") or dm.get("dataset") or "unknown",
        "optimizer steps": int(ckpt.get("global_step") or 0),
    }
    out.update(summary or {})
    out.pop("machine", None)
    return out


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    trust: bool = False,
    command: str | None = None,
) -> Path:
    """Write the ``save_pretrained`` folder of a ``vqkit fit`` (tokenizer) or ``vqkit prior
    fit`` (prior + its tokenizer) checkpoint into ``out``; returns ``out``.

    The weights are the checkpoint's, bit for bit; the quantizer's EMA statistics, maintenance
    state, reservoirs, usage counts and the optimizer are left behind (they change no code).
    ``config.json`` records the full training config under ``trained_with``.
    """
    ckpt_path = Path(ckpt_path)
    ckpt = read_checkpoint(ckpt_path, trust=trust)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{ckpt_path} is not a Lightning checkpoint (no 'state_dict')")
    summary = _card_summary(ckpt, find_summary(ckpt_path))
    hp = ckpt.get("hyper_parameters") or {}
    if "tokenizer" in hp and "model" not in hp:
        return _export_prior(ckpt, ckpt_path, Path(out), summary, command)
    model_config = hp.get("model")
    if isinstance(model_config, dict) and str(model_config.get("class_path")).endswith(
        ".SparseSDFVQVAE"
    ):
        return _export_sdf(ckpt, ckpt_path, Path(out), summary, command)
    model = tokenizer_from_checkpoint_dict(ckpt, str(ckpt_path))
    expected = tokenizer_digest(_model_state(ckpt["state_dict"]))
    if tokenizer_digest(model) != expected:  # the config built another model
        raise CheckpointError(f"{ckpt_path}: the rebuilt tokenizer does not hash like its weights")
    from ..prior.tokenizer import tokenizer_image_size

    return model.save_pretrained(
        out,
        image_size=tokenizer_image_size(ckpt),
        square=(ckpt.get("datamodule_hyper_parameters") or {}).get("square", "crop"),
        trained_with=_trained_with(ckpt),
        summary=summary,
        command=command,
    )


def _export_sdf(ckpt: dict, ckpt_path: Path, out: Path, summary: dict, command: str | None) -> Path:
    """A sparse SDF tokenizer (``configs/sparse3d``): built from its full config (its quantizer
    may be the seed-001 drop-in, whose arguments are not ``VectorQuantizer``'s), the
    checkpoint's weights loaded, saved without training state by ``save_pretrained``."""
    from ..models.sparse3d import SparseSDFVQVAE

    try:
        model = build(ckpt["hyper_parameters"]["model"], "model")
    except ConfigError as e:
        raise CheckpointError(f"{ckpt_path}: cannot rebuild its model ({e})") from None
    if not isinstance(model, SparseSDFVQVAE):
        raise CheckpointError(f"{ckpt_path} holds a {type(model).__name__}")
    state = {
        k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")
    }
    try:
        load_weights(model, state, str(ckpt_path))
    except PretrainedError as e:
        raise CheckpointError(str(e)) from None
    return model.eval().save_pretrained(
        out, trained_with=_trained_with(ckpt), summary=summary, command=command
    )


def _export_prior(
    ckpt: dict, ckpt_path: Path, out: Path, summary: dict, command: str | None
) -> Path:
    from ..prior.module import TOKENIZER_KEY, TRANSFORMER_KEY
    from ..prior.pretrained import PretrainedPrior
    from ..prior.transformer import CodeTransformer

    record = ckpt.get(TOKENIZER_KEY)
    config = ckpt.get(TRANSFORMER_KEY)
    if not isinstance(record, dict) or "state_dict" not in record or config is None:
        raise CheckpointError(
            f"{ckpt_path} is a prior checkpoint that does not carry its tokenizer (written "
            "before vqkit recorded it); it cannot be exported on its own"
        )
    tok_ckpt = {
        "hyper_parameters": record.get("hyper_parameters"),
        "state_dict": {f"model.{k}": v for k, v in record["state_dict"].items()},
    }
    tokenizer = tokenizer_from_checkpoint_dict(tok_ckpt, f"the tokenizer in {ckpt_path}")
    if tokenizer_digest(tokenizer) != record.get("sha256"):
        raise CheckpointError(f"the tokenizer in {ckpt_path} does not hash to its recorded sha256")
    transformer = CodeTransformer(**config)
    weights = {
        k.removeprefix("transformer."): v
        for k, v in ckpt["state_dict"].items()
        if k.startswith("transformer.")
    }
    load_weights(transformer, weights, str(ckpt_path))
    prior = PretrainedPrior(transformer.eval(), tokenizer, int(record["image_size"]))
    trained_with = {
        "prior": {k: _plain(v) for k, v in (ckpt.get("hyper_parameters") or {}).items()},
        "global_step": int(ckpt.get("global_step") or 0),
    }
    summary = {k: v for k, v in summary.items() if k != "data"}
    return prior.save_pretrained(out, trained_with=trained_with, summary=summary, command=command)


def load_any_tokenizer(path: str | os.PathLike, *, trust: bool = False) -> LoadedTokenizer:
    """A tokenizer from a ``vqkit fit`` checkpoint, a ``save_pretrained`` / ``vqkit export``
    folder, a prior's folder or a Hub id, on the CPU in eval mode, without training state
    (read by ``vqkit.prior.tokenizer.read_tokenizer``, the one reader)."""
    from ..prior.tokenizer import (
        PRETRAINED_KEY,
        read_tokenizer,
        tokenizer_image_size,
        tokenizer_model,
    )

    ckpt = read_tokenizer(path, trust=trust)
    model = tokenizer_model(path, ckpt, training_state=False)
    data = ckpt.get("datamodule_hyper_parameters") or {}
    source = str(ckpt.get(PRETRAINED_KEY) or Path(path).expanduser())
    return LoadedTokenizer(
        model,
        tokenizer_image_size(ckpt),
        str(data.get("square", "crop")),
        tokenizer_digest(model),
        source,
    )

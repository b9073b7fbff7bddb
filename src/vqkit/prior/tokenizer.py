"""The tokenizer a prior is trained on: its image size, a content hash of its weights, and the
copy of it that a prior checkpoint carries.

A prior is only meaningful with the tokenizer whose codes it learned. Its checkpoint therefore
carries that tokenizer (config and weights) and a sha256 of the weights, rather than a path to a
file that can move or be replaced: ``load_prior`` rebuilds the tokenizer from the prior checkpoint
alone, and a tokenizer passed in (``load_prior(path, tokenizer=...)``, ``vqkit sample --ckpt``,
a resumed ``vqkit prior fit``) must hash to the recorded digest.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ..models import VQModel
from ..pretrained import TOKENIZER_FOLDER, tokenizer_digest
from ..training.checkpoint import (
    CheckpointError,
    load_model,
    load_tokenizer,
    read_checkpoint,
    refuse_prior,
)

PRETRAINED_KEY = "pretrained_folder"  # set by read_tokenizer for a save_pretrained folder
# a path with one of these suffixes is a checkpoint file, never a folder or Hub id
_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


def read_tokenizer(path: str | Path, *, trust: bool = False) -> dict:
    """A tokenizer as a ``vqkit fit`` checkpoint dict, from any place a tokenizer is kept: the
    checkpoint itself, or the same keys (model config, data settings, ``model.``-prefixed
    weights) built from a ``save_pretrained`` / ``vqkit export`` folder, a prior's folder (its
    ``tokenizer/``) or a Hugging Face Hub id (``user/name``). This is the one reader every
    command that takes a tokenizer goes through."""
    p = Path(path).expanduser()
    if p.is_file() or (not p.exists() and p.suffix in _CHECKPOINT_SUFFIXES):
        return read_checkpoint(p, trust=trust)  # a missing checkpoint: its own error
    from ..pretrained import PretrainedError, read_config, read_weights, resolve_folder

    try:
        folder = resolve_folder(path)
        config = read_config(folder)
        if config["vqkit"].get("kind") == "prior":  # a prior's folder: the tokenizer it holds
            folder = folder / str(config.get("tokenizer", TOKENIZER_FOLDER))
        config = read_config(folder, "tokenizer")
        state = read_weights(folder)
    except PretrainedError as e:
        raise CheckpointError(str(e)) from None
    data = dict((config.get("trained_with") or {}).get("data") or {})
    data["image_size"] = int(config["image_size"])
    data["square"] = config.get("square", data.get("square", "crop"))
    return {
        "hyper_parameters": {
            "_class_path": "vqkit.training.VQTokenizerModule",
            "model": config["model"],
            "_instantiator": "lightning.pytorch.cli.instantiate_module",
        },
        "datamodule_hyper_parameters": data,
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        PRETRAINED_KEY: str(folder),
    }


def tokenizer_model(path: str | Path, ckpt: dict, *, training_state: bool = True) -> VQModel:
    """The ``VQModel`` of a ``read_tokenizer`` dict, in eval mode, on the CPU.

    From a checkpoint, ``training_state=True`` rebuilds the training module as ``vqkit fit``
    wrote it, usage counts, EMA statistics and maintenance included (what ``vqkit analyze``
    reads); ``False`` builds only what inference needs, without jsonargparse. A folder holds no
    training state: its model is the same either way."""
    folder = ckpt.get(PRETRAINED_KEY)
    if folder is not None:
        return VQModel.from_pretrained(folder)
    refuse_prior(ckpt, path)
    if training_state:
        return load_model(path, checkpoint=ckpt)
    from ..training.export import tokenizer_from_checkpoint_dict

    return tokenizer_from_checkpoint_dict(ckpt, str(path))


def tokenizer_image_size(ckpt: dict) -> int:
    """The image size a ``vqkit fit`` checkpoint trained at."""
    dm = ckpt.get("datamodule_hyper_parameters") or {}
    model_args = ((ckpt.get("hyper_parameters") or {}).get("model") or {}).get("init_args") or {}
    size = dm.get("image_size") or model_args.get("resolution")
    if size is None:
        raise ValueError("the tokenizer checkpoint does not record its image size")
    return int(size)


def checkpoint_model_state(ckpt: dict) -> dict[str, Tensor]:
    """The ``VQModel`` state dict inside a ``vqkit fit`` checkpoint (its ``model.`` keys)."""
    return {
        k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")
    }


def tokenizer_mismatch(
    prior: object, tokenizer: object, given: str, recorded: str
) -> CheckpointError:
    """The error for a tokenizer that is not the one a prior was trained on."""
    return CheckpointError(
        f"{tokenizer} is not the tokenizer {prior} was trained on (its weights hash to sha256 "
        f"{given[:12]}, the prior recorded {recorded[:12]}): the prior was trained on other "
        "codes and would decode to nonsense; use the tokenizer it was trained on, or train a "
        "prior for this one"
    )


@dataclass
class FrozenTokenizer:
    """A tokenizer as a prior uses it: the ``VQModel`` (frozen, eval mode), the image size it
    was trained at, the sha256 of its weights, the config that rebuilds it, and where it came
    from."""

    model: VQModel
    image_size: int
    sha256: str
    hyper_parameters: dict
    datamodule_hyper_parameters: dict
    file: str

    def __post_init__(self) -> None:
        self.model.requires_grad_(False).eval()

    @classmethod
    def from_file(cls, path: str | Path, *, trust: bool = False) -> FrozenTokenizer:
        """From a ``vqkit fit`` checkpoint or a ``vqkit export`` folder."""
        ckpt = read_tokenizer(path, trust=trust)
        # copies taken first: building the model turns parts of the config into jsonargparse
        # Namespaces in place, which a safe load of the prior checkpoint would refuse
        hparams = copy.deepcopy(dict(ckpt.get("hyper_parameters") or {}))
        data_hparams = copy.deepcopy(dict(ckpt.get("datamodule_hyper_parameters") or {}))
        model = tokenizer_model(path, ckpt)
        return cls(
            model,
            tokenizer_image_size(ckpt),
            tokenizer_digest(model),
            hparams,
            data_hparams,
            str(path),
        )

    def record(self) -> dict:
        """What a prior checkpoint carries: plain containers of tensors, strings and numbers
        (``torch.load(weights_only=True)`` reads them)."""
        return {
            "file": self.file,
            "sha256": self.sha256,
            "image_size": self.image_size,
            "hyper_parameters": self.hyper_parameters,
            "datamodule_hyper_parameters": self.datamodule_hyper_parameters,
            "state_dict": self.model.state_dict(),
        }

    @classmethod
    def from_record(cls, record: dict, prior: str | Path) -> FrozenTokenizer:
        """Rebuilt from the ``record()`` inside the prior checkpoint ``prior``, its weights
        checked against the recorded sha256."""
        fields = {
            "sha256": str,
            "image_size": int,
            "hyper_parameters": dict,
            "datamodule_hyper_parameters": dict,
            "state_dict": dict,
        }
        for name, kind in fields.items():
            if not isinstance(record.get(name), kind):
                raise CheckpointError(
                    f"{prior} carries an incomplete tokenizer (no {name}); pass the tokenizer "
                    "it was trained on"
                )
        state = record["state_dict"]
        checkpoint = {  # a copy of the config: building the model changes it in place
            "hyper_parameters": copy.deepcopy(record["hyper_parameters"]),
            "datamodule_hyper_parameters": record["datamodule_hyper_parameters"],
            "state_dict": {f"model.{k}": v for k, v in state.items()},
        }
        # The record holds the VQModel's weights only, not the rest of the training module
        # (a VQ-GAN's discriminator, counters): Lightning warns about those; the model's own
        # keys are checked below.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Found keys that are")
            module = load_tokenizer(
                f"the tokenizer in {prior}", checkpoint=checkpoint, strict=False
            )
        model = module.model
        expected = set(model.state_dict())
        if expected != set(state):
            odd = sorted(expected ^ set(state))
            raise CheckpointError(
                f"the tokenizer in {prior} does not fit its own config ({len(odd)} keys differ, "
                f"e.g. {odd[0]})"
            )
        digest = tokenizer_digest(model)
        if digest != record["sha256"]:
            raise CheckpointError(
                f"the tokenizer in {prior} does not match the sha256 recorded with it "
                f"({digest[:12]} != {record['sha256'][:12]}): the file was altered or damaged"
            )
        return cls(
            model,
            record["image_size"],
            digest,
            record["hyper_parameters"],
            record["datamodule_hyper_parameters"],
            str(record.get("file", "")),
        )

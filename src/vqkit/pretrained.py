"""Trained tokenizers, quantizers and priors as a folder anyone can load: ``config.json`` (what
rebuilds the module, versioned) + ``model.safetensors`` (its weights, codebook included; no
optimizer, no reservoirs, no usage statistics) + ``README.md`` (a model card).

It is the layout diffusers, timm and ``huggingface_hub``'s ``PyTorchModelHubMixin`` share, so a
local folder loads offline with vqkit's core dependencies only (torch, numpy, einops,
safetensors), and with ``huggingface_hub`` installed (``pip install vqkit[hub]``) the same calls
take a Hub repository id and ``push_to_hub`` uploads.

    model.save_pretrained("my-tokenizer")
    model = VQModel.from_pretrained("my-tokenizer")      # or "user/repo" with vqkit[hub]
    codes = model.encode(images)                          # (B, h, w) in [0, K)
    images = model.decode_indices(codes)                  # (B, 3, H, W) in [-1, 1]

``config.json`` names vqkit classes only (``vqkit.configurable.build`` refuses others), and a
tokenizer's folder records the sha256 of its weights (``tokenizer_digest``): a folder whose
weights were altered or swapped fails to load, and a prior's folder carries its tokenizer in
``tokenizer/`` with that digest.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .configurable import ConfigError, build, to_config
from .fileio import atomic_write_bytes, atomic_write_text

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
TOKENIZER_FOLDER = "tokenizer"  # a prior's tokenizer, inside the prior's folder
OFFLINE_ENV = "VQKIT_OFFLINE"

DIGEST_VERSION = b"vqkit tokenizer sha256 v1\0"
# The quantizer's training state: statistics and bookkeeping that change neither which code an
# input gets nor what a code decodes to. Neither the digest nor a saved folder holds them.
_STATE_NAMES = frozenset({"step", "quantized_steps", "replaced_mask", "num_replacements"})
_STATE_FOLDERS = ("usage.", "reservoirs.", "ema.", "maintenance.", "regularizers.")
# What a saved quantizer drops from its config: it learns nothing at inference.
_TRAINING_ONLY_ARGS = {"ema": None, "maintenance": [], "regularizers": []}


class PretrainedError(ValueError):
    """A folder (or Hub repository) that cannot be saved or loaded as asked; the message names
    the file and the problem."""


def is_training_state(key: str, quantizer_prefix: str = "quantizer.") -> bool:
    """Whether the state-dict ``key`` is quantizer training state (see ``_STATE_NAMES``)."""
    if not key.startswith(quantizer_prefix):
        return False
    rest = key[len(quantizer_prefix) :]
    return rest in _STATE_NAMES or rest.startswith(_STATE_FOLDERS)


def tokenizer_digest(tokenizer: nn.Module | Mapping[str, Tensor]) -> str:
    """sha256 (hex) of what makes a tokenizer's codes and pictures: every tensor of its state
    dict (a ``VQModel`` or its state dict) in sorted key order, each with its key, dtype and
    shape, except the quantizer's training state (usage counts, step counters, replacement
    records, EMA statistics, maintenance and reservoir state)."""
    state = tokenizer.state_dict() if isinstance(tokenizer, nn.Module) else tokenizer
    h = hashlib.sha256(DIGEST_VERSION)
    for key in sorted(state):
        if is_training_state(key):
            continue
        t = state[key].detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}\0{str(t.dtype)}\0{tuple(state[key].shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def _version() -> str:
    from . import __version__

    return __version__


def inference_quantizer_config(config: Mapping) -> dict:
    """A quantizer's ``class_path`` / ``init_args`` config without what only training uses
    (EMA, maintenance, regularizers): the codes and the assignment are unchanged."""
    config = copy.deepcopy(dict(config))
    init_args = dict(config.get("init_args") or {})
    init_args.update(copy.deepcopy(_TRAINING_ONLY_ARGS))
    config["init_args"] = init_args
    return config


def inference_model_config(config: Mapping) -> dict:
    """A ``VQModel`` config (``class_path`` / ``init_args``, as in a ``vqkit fit`` checkpoint)
    whose quantizer keeps only what inference needs."""
    config = copy.deepcopy(dict(config))
    init_args = dict(config.get("init_args") or {})
    if "quantizer" not in init_args:
        raise ConfigError("the model config has no quantizer")
    init_args["quantizer"] = inference_quantizer_config(init_args["quantizer"])
    config["init_args"] = init_args
    return config


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0") or os.environ.get(
        "HF_HUB_OFFLINE", ""
    ) not in ("", "0")


def resolve_folder(
    path_or_repo: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | None = None,
) -> Path:
    """The local folder of ``path_or_repo``: the folder itself, or a Hugging Face Hub
    repository (``"user/name"``) downloaded with ``huggingface_hub`` into its cache (only
    cached files with ``local_files_only`` or ``$VQKIT_OFFLINE=1``)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo)
    if path.exists():
        raise PretrainedError(f"{name} is a file; from_pretrained takes the folder it is in")
    looks_like_repo = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise PretrainedError(f"no folder {name} (and it is not a Hub repository id user/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PretrainedError(
            f"no folder {name}; to download it from the Hugging Face Hub install "
            "huggingface_hub (pip install 'vqkit[hub]')"
        ) from None
    try:
        folder = snapshot_download(
            name,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only or _offline(),
            token=token,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, f"{TOKENIZER_FOLDER}/*"],
        )
    except Exception as e:  # network, auth, missing repo: one line that names it
        raise PretrainedError(f"could not get {name} from the Hugging Face Hub: {e}") from e
    return Path(folder)


def read_config(folder: Path, kind: str | None = None) -> dict:
    """``config.json`` of a saved folder, its format and (if given) kind checked."""
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise PretrainedError(f"{folder} has no {CONFIG_NAME}: not a vqkit folder")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{file} is not valid JSON ({e})") from None
    meta = config.get("vqkit") if isinstance(config, dict) else None
    if not isinstance(meta, dict) or "format" not in meta:
        raise PretrainedError(f"{file} is not a vqkit config (no 'vqkit' format record)")
    if not isinstance(meta["format"], int) or meta["format"] > FORMAT_VERSION:
        raise PretrainedError(
            f"{file} has format {meta['format']} (vqkit {meta.get('version')}); this vqkit "
            f"{_version()} reads format {FORMAT_VERSION} and older: upgrade vqkit"
        )
    if kind is not None and meta.get("kind") != kind:
        raise PretrainedError(f"{folder} holds a {meta.get('kind')}, not a {kind}")
    return config


def read_weights(folder: Path, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = folder / WEIGHTS_NAME
    if not file.is_file():
        raise PretrainedError(f"{folder} has no {WEIGHTS_NAME}")
    device = str(torch.device(map_location))
    try:
        return load_file(file, device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise PretrainedError(f"{file} is not a readable safetensors file ({e})") from None


def load_weights(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load ``state`` into ``module``: every saved tensor must have a place, and every missing
    one must be quantizer training state (which a saved folder leaves out)."""
    expected = module.state_dict()
    unexpected = sorted(set(state) - set(expected))
    quantizer_prefix = getattr(module, "pretrained_quantizer_prefix", None)
    if quantizer_prefix is None:
        quantizer_prefix = "quantizer." if any(k.startswith("quantizer.") for k in expected) else ""
    missing = sorted(
        k for k in set(expected) - set(state) if not is_training_state(k, quantizer_prefix)
    )
    if unexpected or missing:
        raise PretrainedError(
            f"{source} does not fit the model its config builds: "
            f"{len(missing)} tensors missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    wrong = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise PretrainedError(f"{source} has tensors of other shapes: {wrong[:3]}")
    module.load_state_dict(dict(state), strict=False)


def _save_weights(folder: Path, state: Mapping[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    plain = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    atomic_write_bytes(folder / WEIGHTS_NAME, save(plain, metadata=metadata))


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


# --------------------------------------------------------------------------------- model card
def model_card(
    config: Mapping,
    summary: Mapping | None = None,
    *,
    title: str | None = None,
    command: str | None = None,
) -> str:
    """A ``README.md`` for a saved folder: Hub metadata, what the model is, how to load it, and
    the figures of the run's ``summary.json`` when there is one."""
    meta = config.get("vqkit", {})
    kind = meta.get("kind", "model")
    lines = [
        "---",
        "library_name: vqkit",
        "tags:",
        "- vqkit",
        f"- {kind}",
        "- vector-quantization",
        "---",
        "",
        f"# {title or f'vqkit {kind}'}",
        "",
    ]
    facts = [
        ("kind", kind),
        ("image size", config.get("image_size")),
        ("token grid", "x".join(str(g) for g in config["token_grid"])
         if config.get("token_grid") else None),
        ("codebook size", config.get("codebook_size")),
        ("code dimension", config.get("codebook_dim")),
        ("weights sha256 (tokenizer digest)", config.get("sha256")),
        ("vqkit version", meta.get("version")),
    ]  # fmt: skip
    lines += ["| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts if v is not None]
    loader = {
        "tokenizer": ("vqkit.models", "VQModel"),
        "quantizer": ("vqkit", "VectorQuantizer"),
        "prior": ("vqkit.prior.transformer", "CodeTransformer"),
        "sdf_tokenizer": ("vqkit.models", "SparseSDFVQVAE"),
    }.get(kind)
    load = f"{loader[1]}.from_pretrained" if loader else "load_pretrained"
    lines += [
        "",
        "## Use",
        "",
        "```python",
        f"from {loader[0]} import {loader[1]}"
        if loader
        else "from vqkit.pretrained import load_pretrained",
        "",
        f'model = {load}("path/or/user-repo")',
    ]
    if kind == "tokenizer":
        lines += [
            "codes = model.encode(images)          # images (B, 3, H, W) in [-1, 1]",
            "recon = model.decode_indices(codes)   # back to images",
        ]
    if kind == "sdf_tokenizer":
        lines += [
            "codes = model.tokenize(values, coords)      # patches (N, patch^3), (N, 4) coords",
            "sdf = model.decode_indices(codes, coords)   # back to normalized SDF values",
        ]
    lines += ["```", ""]
    if summary:
        lines += ["## Training run", ""]
        if command:
            lines += ["```", command, "```", ""]
        lines += ["| figure | value |", "|---|---|"]
        for k, v in summary.items():
            if k in ("files",) or isinstance(v, (dict, list)):
                continue
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines.append("")
    elif command:
        lines += ["## Made with", "", "```", command, "```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- the mixin
class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for a vqkit module that is
    also a ``Configurable``. Subclasses name their ``pretrained_kind`` and may override
    ``pretrained_config`` (what rebuilds them) and ``pretrained_facts`` (extra config keys)."""

    pretrained_kind: ClassVar[str] = "model"
    # where the quantizer's state sits in the state dict ("": this module is the quantizer)
    pretrained_quantizer_prefix: ClassVar[str] = ""

    def pretrained_config(self) -> dict:
        return to_config(self, type(self).__name__)

    def pretrained_state_dict(self) -> dict[str, Tensor]:
        prefix = self.pretrained_quantizer_prefix
        state = self.state_dict()  # type: ignore[attr-defined]
        return {k: v for k, v in state.items() if not is_training_state(k, prefix)}

    def pretrained_facts(self, **facts: Any) -> dict:
        """Config keys beside ``model`` (``facts``: what the caller of ``save_pretrained``
        adds)."""
        return {k: v for k, v in facts.items() if v is not None}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        summary: Mapping | None = None,
        card: str | None = None,
        command: str | None = None,
        **facts: Any,
    ) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``README.md`` into
        ``save_directory`` (created; files replaced whole). ``summary``: a run's
        ``summary.json`` for the model card (or give the whole ``card`` text); ``facts``:
        extra config keys (a tokenizer's ``image_size``)."""
        folder = Path(save_directory).expanduser()
        if folder.exists() and not folder.is_dir():
            raise PretrainedError(f"{folder} is a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "vqkit": {
                "format": FORMAT_VERSION,
                "version": _version(),
                "kind": self.pretrained_kind,
            },
            "model": self.pretrained_config(),
            **self.pretrained_facts(**facts),
        }
        json.dumps(config)  # anything not JSON-able fails before a file is written
        self._save_parts(folder)
        _save_weights(
            folder,
            self.pretrained_state_dict(),
            {"format": "pt", "vqkit_kind": self.pretrained_kind},
        )
        atomic_write_text(folder / CONFIG_NAME, _json(config))
        text = card if card is not None else model_card(config, summary, command=command)
        atomic_write_text(folder / CARD_NAME, text)
        return folder

    def _save_parts(self, folder: Path) -> None:
        """A subclass's extra files (a prior's tokenizer), written before this folder's own."""

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        *,
        map_location: str | torch.device = "cpu",
        model: nn.Module | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | None = None,
    ):  # noqa: ANN206
        """The module saved in ``path_or_repo`` (a folder, or a Hub repository id with
        ``huggingface_hub`` installed), in eval mode on ``map_location``.

        ``model``: load the weights into this module instead of building one from the config
        (for modules built from classes outside vqkit); its shapes must match.
        """
        folder = resolve_folder(
            path_or_repo,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        config = read_config(folder, cls.pretrained_kind)
        if model is None:
            try:
                model = build(config["model"], "model")
            except ConfigError as e:
                raise PretrainedError(f"{folder / CONFIG_NAME}: {e}") from None
        if not isinstance(model, cls):
            raise PretrainedError(f"{folder} builds a {type(model).__name__}, not a {cls.__name__}")
        load_weights(model, read_weights(folder, "cpu"), str(folder / WEIGHTS_NAME))
        model._check_loaded(folder, config)
        return model.to(map_location).eval()

    def _check_loaded(self, folder: Path, config: dict) -> None:
        """After loading: weights that do not hash to the ``sha256`` the config records (a
        tokenizer's, digest of ``pretrained_state_dict``) are refused; subclasses add checks."""
        recorded = config.get("sha256")
        if recorded is None:
            return
        actual = tokenizer_digest(self.pretrained_state_dict())
        if actual != recorded:
            raise PretrainedError(
                f"the weights in {folder} do not hash to the sha256 its config.json records "
                f"({actual[:12]} != {str(recorded)[:12]}): altered or damaged"
            )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload vqkit model",
        **save_kwargs: Any,
    ) -> str:
        """``save_pretrained`` into a temporary folder and upload it to the Hugging Face Hub
        repository ``repo_id`` (created if needed); returns the commit's URL. Needs
        ``huggingface_hub`` and network."""
        with tempfile.TemporaryDirectory(prefix="vqkit-push-") as tmp:
            self.save_pretrained(tmp, **save_kwargs)
            return upload_folder(
                tmp, repo_id, private=private, token=token, commit_message=commit_message
            )


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload vqkit model",
) -> str:
    """Upload a saved folder to the Hugging Face Hub repository ``repo_id`` (created if
    needed); returns the commit's URL. Needs ``huggingface_hub`` and network."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise PretrainedError(
            "uploading to the Hub needs huggingface_hub (pip install 'vqkit[hub]')"
        ) from None
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message
    )
    return str(getattr(info, "commit_url", info))


# --------------------------------------------------------------------------- any saved folder
def load_pretrained(
    path_or_repo: str | os.PathLike, *, map_location: str | torch.device = "cpu", **kwargs: Any
):  # noqa: ANN201
    """Whatever ``path_or_repo`` holds: a ``VQModel`` (tokenizer), a ``VectorQuantizer``, a
    ``PretrainedPrior`` (the prior's transformer with its tokenizer) or a ``SparseSDFVQVAE``
    (a 3D shape tokenizer)."""
    folder = resolve_folder(path_or_repo, **kwargs)
    kind = read_config(folder).get("vqkit", {}).get("kind")
    if kind == "tokenizer":
        from .models.vqmodel import VQModel

        return VQModel.from_pretrained(folder, map_location=map_location)
    if kind == "quantizer":
        from .quantize.quantizer import VectorQuantizer

        return VectorQuantizer.from_pretrained(folder, map_location=map_location)
    if kind == "prior":
        from .prior.pretrained import PretrainedPrior

        return PretrainedPrior.from_pretrained(folder, map_location=map_location)
    if kind == "sdf_tokenizer":
        from .models.sparse3d import SparseSDFVQVAE

        return SparseSDFVQVAE.from_pretrained(folder, map_location=map_location)
    raise PretrainedError(f"{folder} holds a {kind!r}, which this vqkit cannot load")

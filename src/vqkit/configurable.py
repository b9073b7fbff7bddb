"""Modules that remember how they were built, so a saved folder can rebuild them.

A ``Configurable`` records the arguments its constructor was called with (in ``__new__``, so the
constructor's signature stays what jsonargparse and LightningCLI read). ``to_config`` turns a
module into the ``class_path`` / ``init_args`` tree that LightningCLI configs and ``vqkit fit``
checkpoints already use, and ``build`` turns such a tree back into modules without jsonargparse.

``build`` only instantiates vqkit's own ``Configurable`` classes: a ``config.json`` from another
machine or a model hub names classes, and naming ``os.system`` must not run it.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping
from typing import Any

_SIGNATURES: dict[type, inspect.Signature] = {}


class ConfigError(ValueError):
    """A config that cannot be recorded or rebuilt; the message names the argument or class."""


class Configurable:
    """Mixin for ``nn.Module`` classes whose constructor arguments are plain values or other
    ``Configurable`` modules. ``init_args`` holds what the constructor was called with (defaults
    filled in); objects built without calling the class (unpickled, deep-copied) keep the
    record of the original."""

    def __new__(cls, *args: Any, **kwargs: Any):  # noqa: ANN204
        self = super().__new__(cls)
        sig = _SIGNATURES.get(cls)
        if sig is None:
            sig = _SIGNATURES[cls] = inspect.signature(cls.__init__)
        try:
            bound = sig.bind(None, *args, **kwargs)
        except TypeError:  # copy / pickle call __new__ without the arguments: keep their record
            return self
        bound.apply_defaults()
        record = dict(bound.arguments)
        record.pop(next(iter(sig.parameters)))  # self
        object.__setattr__(self, "_vqkit_init_args", record)
        return self

    @property
    def init_args(self) -> dict[str, Any]:
        record = self.__dict__.get("_vqkit_init_args")
        if record is None:
            raise ConfigError(f"{type(self).__name__} was not built by calling its class")
        return dict(record)


def class_path(obj_or_cls: Any) -> str:
    """The shortest import path of the class among its already imported parent packages
    (``vqkit.VectorQuantizer``, ``vqkit.models.ResNetVQModel``), else its module's."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    parts = cls.__module__.split(".")
    for i in range(1, len(parts)):
        package = sys.modules.get(".".join(parts[:i]))
        if getattr(package, cls.__qualname__, None) is cls:
            return f"{package.__name__}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def to_config(value: Any, name: str = "value") -> Any:
    """A JSON-able tree of ``value``: ``Configurable`` modules become ``{"class_path": ...,
    "init_args": {...}}``, tuples become lists; anything else that is not a plain value raises
    ``ConfigError`` naming the argument."""
    if isinstance(value, Configurable):
        return {
            "class_path": class_path(value),
            "init_args": {k: to_config(v, f"{name}.{k}") for k, v in value.init_args.items()},
        }
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [to_config(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): to_config(v, f"{name}.{k}") for k, v in value.items()}
    raise ConfigError(
        f"{name} is a {type(value).__name__}, which a config cannot record (plain values and "
        "vqkit modules only)"
    )


def resolve_class(path: str) -> type:
    """The vqkit ``Configurable`` class ``path`` names (``vqkit.VectorQuantizer`` or the full
    module path); anything else raises ``ConfigError``."""
    if not isinstance(path, str) or not (path == "vqkit" or path.startswith("vqkit.")):
        raise ConfigError(f"class_path {path!r} is not a vqkit class; only vqkit's are rebuilt")
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"class_path {path!r} names no class of this vqkit ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Configurable)):
        raise ConfigError(f"class_path {path!r} is not a vqkit module class")
    return cls


def build(config: Any, name: str = "config") -> Any:
    """The modules a ``to_config`` tree (or a ``vqkit fit`` checkpoint's model config)
    describes."""
    if isinstance(config, Mapping) and "class_path" in config:
        extra = set(config) - {"class_path", "init_args"}
        if extra:
            raise ConfigError(f"{name} has keys {sorted(extra)} beside class_path and init_args")
        cls = resolve_class(config["class_path"])
        init_args = config.get("init_args") or {}
        if not isinstance(init_args, Mapping):
            raise ConfigError(f"{name}.init_args must be a mapping, got {type(init_args).__name__}")
        kwargs = {k: build(v, f"{name}.{k}") for k, v in init_args.items()}
        try:
            inspect.signature(cls.__init__).bind(None, **kwargs)
        except TypeError as e:
            raise ConfigError(f"{name}: {cls.__name__} does not take these arguments ({e})") from e
        return cls(**kwargs)
    if isinstance(config, list):
        return [build(v, f"{name}[{i}]") for i, v in enumerate(config)]
    if isinstance(config, Mapping):
        return {k: build(v, f"{name}.{k}") for k, v in config.items()}
    return config

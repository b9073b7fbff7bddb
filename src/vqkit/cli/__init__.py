"""The ``vqkit`` command: one module per command, a shared part and the dispatch.

    vqkit fit|validate|test --config configs/quickstart.yaml [--key value ...]   (fit.py)
    vqkit prior fit --config configs/prior/quickstart.yaml                     (fit.py)
    vqkit data fetch fluent-emoji-3d|meshes [--cache-dir DIR] [--tarball FILE] (data.py)
    vqkit analyze --ckpt PATH --output-dir DIR [--data DIR] [--plot] ...       (analyze.py)
    vqkit evaluate --ckpt PATH --output-dir DIR [--metrics psnr,ssim,rfid] ... (evaluate.py)
    vqkit sample --ckpt PATH --output-dir DIR [--prior PRIOR] ...              (sample.py)
    vqkit export --ckpt PATH --out DIR                                         (export.py)
    vqkit encode --tokenizer PATH --out DIR [--data DIR] [--flip] ...          (encode.py)
    vqkit decode --tokenizer PATH --tokens DIR --out DIR                       (encode.py)

``main.py`` reads ``--verbosity`` and dispatches; ``common.py`` holds the options, loading and
one-line error wrapper the tool commands share. ``fit``/``validate``/``test`` are Lightning's
CLI over typed signatures (jsonargparse): a misspelled key or a wrong type fails at parse time
naming the key. The library never imports this package.
"""

from .fit import _data_in_memory, build_cli, build_prior_cli, condense_parser_error
from .main import COMMANDS, _pop_verbosity, _setup_logging, main

__all__ = [
    "COMMANDS",
    "_data_in_memory",
    "_pop_verbosity",
    "_setup_logging",
    "build_cli",
    "build_prior_cli",
    "condense_parser_error",
    "main",
]

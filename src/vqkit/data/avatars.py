"""The avatar set: 256x256 illustrated avatars, built offline from fixed seeds, any number of them.

Seed 004 trains a tokenizer on anime avatars. No such set can be shipped (scraped art has no
license), so vqkit draws its own from three DiceBear styles whose artwork is CC0 1.0:

- Lorelei (Lisa Wischofsky), Notionists (Zoish) and Open Peeps (Pablo Stanley), each package's
  LICENSE file says "Design ... License: CC0 1.0" and MIT for the code, as does @dicebear/core;
- rendered to PNG by resvg (Rust, MPL-2.0) through its Node binding @resvg/resvg-js, whose
  prebuilt binary comes from npm as well, so nothing needs a compiler, a browser or a font.

Everything is fetched with ``npm pack`` at pinned versions and checked against pinned sha256, like
``vqkit.data.bundled``; then ``node`` runs a short script (``RENDER_SCRIPT``) in a few processes.
Image ``i`` of a split is a pure function of its seed: style ``seed % 3``, DiceBear seed
``"vqkit-<seed>"``, a pastel background (solid or a linear gradient) drawn by DiceBear's own seeded
generator. Training images use seeds ``0, 1, ...``, validation images seeds from ``VAL_START`` on,
so growing either split never changes the other, and ``--num 60000`` after ``--num 20000`` renders
only the 40,000 new ones.

Every file's sha256 goes into ``<split>.sha256`` (``sha256sum`` format); the manifest hash of the
first ``n`` images is the sha256 of those ``n`` lines. Builds are checked against
``PINNED_MANIFESTS`` (the first 64 images of each split, and the default sizes), so a renderer or
style package that draws differently fails loudly instead of silently changing the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .bundled import _check_tarball, _extract, _npm_pack, default_cache_dir, sha256_file

log = logging.getLogger("vqkit.data")

AVATARS = "avatars"  # the name ImageDataModule(dataset=...) and `vqkit data fetch` know it by
FORMAT_VERSION = 1  # bump when the drawing, the packages or the layout change
IMAGE_SIZE = 256
VAL_START = 10_000_000
DEFAULT_NUM = 20_000
DEFAULT_NUM_VAL = 2_000
STYLES = ("lorelei", "notionists", "open-peeps")
CHUNK = 1_000  # images per node process

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class NpmPackage:
    spec: str  # "<name>@<exact version>"
    sha256: str
    size: int
    license: str

    @property
    def name(self) -> str:
        return self.spec.rsplit("@", 1)[0]


PACKAGES = (
    NpmPackage(
        "@dicebear/core@9.4.3",
        "6ca7dae651c74ad547e548fbe7c41f49aaa377cf4617259277518389bf6b1a3d",
        7_921,
        "MIT",
    ),
    NpmPackage(
        "@dicebear/lorelei@9.4.3",
        "78cbba0a6c4d14e1af7c62ffa9a73bd98a8cda02e28690110e199348cd6a9c06",
        52_952,
        "artwork CC0 1.0 (Lisa Wischofsky), code MIT",
    ),
    NpmPackage(
        "@dicebear/notionists@9.4.3",
        "edb28f4a346e50b9a810b754960cda924cfb2e05763cefddb4acb940dfb96445",
        123_862,
        "artwork CC0 1.0 (Zoish), code MIT",
    ),
    NpmPackage(
        "@dicebear/open-peeps@9.4.3",
        "65b664ec00dc69c068051461f2b5bd97c8335af676e36c284e906a3017c23d4f",
        108_320,
        "artwork CC0 1.0 (Pablo Stanley), code MIT",
    ),
    NpmPackage(
        "@resvg/resvg-js@2.6.2",
        "5b4c67c32d593a42bca6d97320b57465cf340bee441f4cb6bf250b1086872a43",
        12_941,
        "MPL-2.0",
    ),
)

# resvg's prebuilt binary for each platform (npm installs the one that matches as an optional
# dependency; we pick it ourselves). Other platforms: build resvg-js from source, or copy the
# rendered folder from a machine listed here.
RESVG_BINARIES = {
    key: NpmPackage(f"@resvg/resvg-js-{key}@2.6.2", sha, size, "MPL-2.0")
    for key, sha, size in (
        (
            "linux-x64-gnu",
            "ead221101ab0c8f27821c6ad4e65259ff6796d49978831b2992abb0ecdbaf96a",
            2_019_767,
        ),
        (
            "linux-x64-musl",
            "542af5fc32188ab040eabc11e1cda13a5198f67c0a16a526d806b3534ec050a6",
            2_017_778,
        ),
        (
            "linux-arm64-gnu",
            "4f666017abc3ea74ea3e8fe32ed38fa2b7c2fd7a61f64fa1032728da43ab0054",
            1_935_948,
        ),
        (
            "darwin-arm64",
            "15b46d346a220a38592423a986e8c5d10b740aa5cf6cf4755585738b4538daa8",
            1_772_997,
        ),
        (
            "darwin-x64",
            "92e243f9f57c6e6dcdf02899a8349a4a8fded9354434c15c5b274038c924b5ec",
            1_871_161,
        ),
        (
            "win32-x64-msvc",
            "fe36f57bcf0654f5cac5a3af4d860a00b3a03404d107b05283bd76bbb4a0eeeb",
            2_012_568,
        ),
    )
}

# Manifest hashes (see the module docstring) of what the pinned packages draw: (split, n) ->
# sha256 of the first n lines of <split>.sha256. Measured on linux-x64-gnu.
PINNED_MANIFESTS: dict[tuple[str, int], str] = {
    ("train", 64): "dfb10b0f0ea398ac134cea03bef34c070de20c377030b3a76470d682ec5e0767",
    ("val", 64): "a9d6b6bcf3f1177a96a223bd9590a438b2cbd78824d3163c1450004548443c12",
    ("train", 20_000): "0f40bc57eaac1ab34de92a990722702accf0e1bc30e89e77fd1e07ef3f777c5b",
    ("train", 60_000): "7667ea8b33870735a971ed15eb2d4afd5682f11c36d404d068a5e6db35a7b0f9",
    ("val", 2_000): "4e8d555bbb403e8f512e7bb028cd14c7e4379d42bdf34baa590853ab53c9052d",
    ("val", 20_000): "b583ebe4d4631da8903309911f1e1a56c9f8b21c5119310a5c5e242c75b7cac4",
}

BACKGROUNDS = (
    "b6e3f4",
    "c0aede",
    "d1d4f9",
    "ffd5dc",
    "ffdfbf",
    "c1f0d0",
    "f9e79f",
    "aed6f1",
    "f5cba7",
    "d7bde2",
    "a3e4d7",
    "fadbd8",
)

# One process renders the images [start, end) of a split: seeds base + start ... base + end - 1.
# Each PNG is written under a temporary name and renamed, so an interrupted build leaves only
# whole files; existing files are skipped (the Python side hashes and checks all of them).
# resvg's native objects are freed only when V8 collects them, which it does not hurry to do
# (a process grew to 4 GB over 13,000 images), so a process draws at most CHUNK images.
RENDER_SCRIPT = """\
import { createAvatar } from '@dicebear/core';
import * as lorelei from '@dicebear/lorelei';
import * as notionists from '@dicebear/notionists';
import * as openPeeps from '@dicebear/open-peeps';
import { Resvg } from '@resvg/resvg-js';
import { existsSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const [outDir, base, start, end, size, backgrounds] = process.argv.slice(2);
const styles = [lorelei, notionists, openPeeps];
const palette = backgrounds.split(',');
let done = 0;
for (let i = Number(start); i < Number(end); i++) {
  const file = join(outDir, String(i).padStart(7, '0') + '.png');
  if (!existsSync(file)) {
    const seed = Number(base) + i;
    const svg = createAvatar(styles[seed % styles.length], {
      seed: `vqkit-${seed}`,
      size: Number(size),
      backgroundColor: palette,
      backgroundType: ['solid', 'gradientLinear'],
    }).toString();
    const png = new Resvg(svg, {
      fitTo: { mode: 'width', value: Number(size) },
      font: { loadSystemFonts: false },  // no text is drawn: the machine's fonts never matter
    }).render().asPng();
    const tmp = `${file}.${process.pid}.tmp`;  // two builders of one folder never share it
    writeFileSync(tmp, png);
    renameSync(tmp, file);
  }
  if (++done % 100 === 0) console.log(done);
}
console.log(done);
"""


def resvg_platform() -> str:
    """The key of ``RESVG_BINARIES`` for this machine; raises if resvg ships no binary for it."""
    machine = platform.machine().lower()
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(machine)
    system = sys.platform
    if system.startswith("linux"):
        libc = "gnu" if platform.libc_ver()[0] == "glibc" else "musl"
        key = f"linux-{arch}-{libc}"
    elif system == "darwin":
        key = f"darwin-{arch}"
    elif system == "win32":
        key = f"win32-{arch}-msvc"
    else:
        key = f"{system}-{machine}"
    if key not in RESVG_BINARIES:
        raise RuntimeError(
            f"no pinned resvg binary for this platform ({key}); known: {sorted(RESVG_BINARIES)}. "
            "Build the avatar set on one of those and copy its folder, or train on your own "
            "images with --data.root DIR"
        )
    return key


def avatars_dir(cache_dir: PathLike | None = None, image_size: int = IMAGE_SIZE) -> Path:
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return cache / f"avatars-v{FORMAT_VERSION}-{image_size}px"


@dataclass(frozen=True)
class AvatarSet:
    """A built avatar set: its folder and the files of each split, in seed order."""

    root: Path
    train: list[Path]
    val: list[Path]
    manifest: dict[str, str]  # split -> manifest hash of the files listed
    build_seconds: float  # 0 when everything was already there


def manifest_hash(lines: list[str]) -> str:
    """sha256 of ``sha256sum`` lines ("<hash>  <name>\\n"), in order."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
    return h.hexdigest()


def _install_tools(root: Path, npm: str) -> Path:
    """node_modules with the pinned, checked packages; returns the folder holding render.mjs."""
    tools = root / "tools"
    packages = (*PACKAGES, RESVG_BINARIES[resvg_platform()])
    marker = tools / "installed.json"
    want = {p.spec: p.sha256 for p in packages}
    want["render.mjs"] = hashlib.sha256(RENDER_SCRIPT.encode()).hexdigest()
    try:
        if json.loads(marker.read_text()) == want:
            return tools
    except (OSError, ValueError):
        pass
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tools-", dir=root) as tmp_name:
        tmp = Path(tmp_name)
        staged = tmp / "tools"
        for pkg in packages:
            download = tmp / "download" / pkg.name.replace("/", "+")
            download.mkdir(parents=True)
            tgz = _npm_pack(pkg.spec, npm, download, timeout=300)
            _check_tarball(tgz, pkg.sha256, pkg.size, delete_bad=True)
            _extract(tgz, "package/", staged / "node_modules" / Path(*pkg.name.split("/")))
        (staged / "render.mjs").write_text(RENDER_SCRIPT)
        (staged / "installed.json").write_text(json.dumps(want))
        if tools.exists():
            shutil.rmtree(tools)
        os.replace(staged, tools)
    return tools


def _render(
    tools: Path, out: Path, base: int, count: int, image_size: int, workers: int, node: str
) -> None:
    """Render the missing images of [0, count) of a split, ``workers`` node processes at a time,
    each drawing one chunk of at most ``CHUNK`` images."""
    exe = shutil.which(node)
    if exe is None:
        raise RuntimeError(
            f"node was not found (looked for {node!r} on PATH); the avatar set is drawn by "
            "Node.js (https://nodejs.org), which comes with npm"
        )
    out.mkdir(parents=True, exist_ok=True)
    present = {p.name for p in out.glob("*.png")}
    chunks = [
        (a, min(a + CHUNK, count))
        for a in range(0, count, CHUNK)
        if any(f"{i:07d}.png" not in present for i in range(a, min(a + CHUNK, count)))
    ]

    def draw(chunk: tuple[int, int]) -> str | None:
        cmd = [exe, str(tools / "render.mjs"), str(out), str(base), str(chunk[0]), str(chunk[1])]
        cmd += [str(image_size), ",".join(BACKGROUNDS)]
        run = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        return "\n".join(run.stderr.strip().splitlines()[-10:]) if run.returncode else None

    done = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for error in pool.map(draw, chunks):
            if error is not None:
                raise RuntimeError(f"rendering avatars failed:\n{error}")
            done += 1
            if done % 10 == 0 or done == len(chunks):
                log.info("drew %d of %d chunks of %d avatars", done, len(chunks), CHUNK)


def _hash_split(out: Path, count: int) -> list[str]:
    names = [f"{i:07d}.png" for i in range(count)]
    missing = [n for n in names if not (out / n).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} avatars missing after rendering, e.g. {missing[0]}")
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        hashes = list(pool.map(lambda n: sha256_file(out / n), names))
    return [f"{h}  {n}\n" for h, n in zip(hashes, names, strict=True)]


def _check_pins(split: str, lines: list[str]) -> None:
    for (pin_split, n), want in PINNED_MANIFESTS.items():
        if pin_split != split or len(lines) < n:
            continue
        got = manifest_hash(lines[:n])
        if got != want:
            raise RuntimeError(
                f"the first {n} {split} avatars do not match the pinned manifest "
                f"(sha256 {got}, expected {want}): the renderer or a style package draws "
                "differently on this machine. Delete the folder and build again; if it "
                "persists, please report it with your platform"
            )


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines(keepends=True)
    except OSError:
        return []


def fetch_avatars(
    num: int = DEFAULT_NUM,
    num_val: int = DEFAULT_NUM_VAL,
    cache_dir: PathLike | None = None,
    *,
    image_size: int = IMAGE_SIZE,
    workers: int | None = None,
    npm: str = "npm",
    node: str = "node",
) -> AvatarSet:
    """Build (or reuse) ``num`` training and ``num_val`` validation avatars; see the module doc.

    Only images not yet on disk are drawn; every file is then hashed and the splits checked
    against ``PINNED_MANIFESTS``. A second call with the same or smaller sizes reads the
    ``.sha256`` lists only.
    """
    for name, value in (("num", num), ("num_val", num_val)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    root = avatars_dir(cache_dir, image_size)
    splits = {"train": (0, num), "val": (VAL_START, num_val)}
    files: dict[str, list[Path]] = {}
    manifest: dict[str, str] = {}
    started = time.perf_counter()
    built = False
    for split, (base, count) in splits.items():
        out = root / split
        listed = _read_lines(root / f"{split}.sha256")
        if len(listed) < count:
            tools = _install_tools(root, npm)
            workers = workers or os.cpu_count() or 1
            log.info("drawing %d %s avatars with %d node processes", count, split, workers)
            _render(tools, out, base, count, image_size, workers, node)
            lines = _hash_split(out, count)
            _check_pins(split, lines)
            if len(lines) > len(listed):
                tmp = root / f".{split}.sha256.tmp"
                tmp.write_text("".join(lines))
                os.replace(tmp, root / f"{split}.sha256")
            listed = lines if len(lines) > len(listed) else listed
            built = True
        lines = listed[:count]
        files[split] = [out / line.split("  ", 1)[1].rstrip("\n") for line in lines]
        gone = [p for p in files[split] if not p.is_file()]
        if gone:
            raise RuntimeError(
                f"{len(gone)} listed {split} avatars are missing (e.g. {gone[0]}); delete "
                f"{root / (split + '.sha256')} to draw them again"
            )
        manifest[split] = manifest_hash(lines)
    seconds = 0.0
    if built:
        seconds = time.perf_counter() - started
        info = {
            "format": FORMAT_VERSION,
            "image_size": image_size,
            "packages": {p.spec: p.license for p in PACKAGES},
            "renderer": RESVG_BINARIES[resvg_platform()].spec,
            "num": num,
            "num_val": num_val,
            "manifest": manifest,
            "seconds": seconds,
        }
        (root / "last_build.json").write_text(json.dumps(info, indent=1))
        log.info("built the avatar set in %.1f s: %s", seconds, root)
    return AvatarSet(root, files["train"], files["val"], manifest, seconds)

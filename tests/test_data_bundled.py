"""vqkit.data.bundled, offline: fake tarballs and a fake npm stand in for the registry."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from vqkit.data import (
    DATASETS,
    FLUENT_EMOJI_3D,
    ImageDataModule,
    bundled,
    default_cache_dir,
    fetch,
    fetch_fluent_emoji,
    find_images,
    load_image,
)

NAMES = ["1f44b.webp", "1f44b-1f3fb.webp", "1f600.webp", "1f680.webp", "2764-fe0f.webp"]


def _webp_bytes(seed: int, size: int = 16) -> bytes:
    img = Image.new("RGBA", (size, size), (seed * 40 % 256, 80, 160, 255))
    img.putpixel((0, 0), (0, 0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes, **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data))


def make_tarball(path: Path, extra: list[tarfile.TarInfo] | None = None) -> str:
    """An npm-style tarball with a few WebP emoji under package/assets/; returns its sha256."""
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "package/package.json", b'{"name": "fake"}')
        for i, name in enumerate(NAMES):
            _add(tar, f"package/assets/{name}", _webp_bytes(i))
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tgz(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "fake-1.1.0.tgz"
    return path, make_tarball(path)


def fake_npm(tmp_path: Path, tarball: Path | None, *, fail: str | None = None) -> Path:
    """A script that behaves like `npm pack SPEC --pack-destination DIR` (or fails like npm)."""
    script = tmp_path / "fake-npm"
    log = tmp_path / "npm-argv.json"
    body = [
        f"#!{sys.executable}",
        "import json, shutil, sys",
        f"json.dump(sys.argv[1:], open({str(log)!r}, 'w'))",
    ]
    if fail:
        body += [f"sys.stderr.write({fail!r})", "sys.exit(1)"]
    else:
        dest = "sys.argv[sys.argv.index('--pack-destination') + 1]"
        body += [f"shutil.copy({str(tarball)!r}, {dest} + '/lobehub-fluent-emoji-3d-1.1.0.tgz')"]
    script.write_text("\n".join(body) + "\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_registry_pins_the_published_tarball():
    assert DATASETS["fluent-emoji-3d"] is FLUENT_EMOJI_3D
    assert FLUENT_EMOJI_3D.package == "@lobehub/fluent-emoji-3d@1.1.0"
    assert FLUENT_EMOJI_3D.size == 15_792_027
    assert FLUENT_EMOJI_3D.sha256 == (
        "c1bb7eee7de090205a232518a9ab4adb3df458bfbe8a1f78232991194c8b2e58"
    )
    assert FLUENT_EMOJI_3D.num_images == 3391 and FLUENT_EMOJI_3D.prefix == "package/assets/"


def test_local_tarball_happy_path_then_reuse(tmp_path, tgz, monkeypatch):
    path, sha = tgz
    images = fetch_fluent_emoji(tmp_path / "cache", tarball=path, expected_sha256=sha)
    assert sorted(p.name for p in images.iterdir()) == sorted(NAMES)
    assert not (images.parent / "package.json").exists()  # only package/assets/* is extracted
    marker = json.loads((images.parent / bundled.MARKER).read_text())
    assert marker["sha256"] == sha and marker["files"] == len(NAMES)
    x = load_image(images / "1f600.webp", 16)
    assert torch.equal(x[:, 0, 0], torch.ones(3))  # the transparent pixel composites to white
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp

    def boom(*args, **kwargs):
        raise AssertionError("a complete cache must not be extracted again")

    monkeypatch.setattr(bundled, "_extract", boom)
    gone = tmp_path / "deleted.tgz"  # the tarball is not even looked at on reuse
    assert fetch_fluent_emoji(tmp_path / "cache", tarball=gone, expected_sha256=sha) == images


def test_incomplete_cache_is_unpacked_again(tmp_path, tgz):
    path, sha = tgz
    images = fetch_fluent_emoji(tmp_path / "cache", tarball=path, expected_sha256=sha)
    (images / "1f600.webp").unlink()
    again = fetch_fluent_emoji(tmp_path / "cache", tarball=path, expected_sha256=sha)
    assert again == images and len(list(images.iterdir())) == len(NAMES)


def test_checksum_mismatch_names_both_and_keeps_users_file(tmp_path, tgz):
    path, sha = tgz
    wrong = "0" * 64
    with pytest.raises(ValueError, match=f"expected sha256 {wrong}.*got sha256 {sha}"):
        fetch_fluent_emoji(tmp_path / "cache", tarball=path, expected_sha256=wrong)
    assert path.exists()  # a file the user handed us is never deleted
    assert not (tmp_path / "cache" / "fluent-emoji-3d-1.1.0").exists()
    with pytest.raises(ValueError, match="15792027 bytes"):  # the pinned size is checked too
        fetch_fluent_emoji(
            tmp_path / "cache", tarball=path, expected_sha256=sha, expected_size=15792027
        )


def test_npm_pack_is_called_and_the_bad_download_deleted(tmp_path, tgz):
    path, sha = tgz
    npm = fake_npm(tmp_path, path)
    images = fetch_fluent_emoji(tmp_path / "cache", npm=str(npm), expected_sha256=sha)
    assert len(find_images(images)) == len(NAMES)
    argv = json.loads((tmp_path / "npm-argv.json").read_text())
    assert argv[:2] == ["pack", "@lobehub/fluent-emoji-3d@1.1.0"] and "--pack-destination" in argv
    with pytest.raises(ValueError, match="checksum mismatch.*the download was deleted"):
        fetch_fluent_emoji(tmp_path / "cache2", npm=str(npm), expected_sha256="f" * 64)
    leftovers = list((tmp_path / "cache2").rglob("*.tgz"))
    assert leftovers == []


def test_missing_npm_says_what_to_do_instead(tmp_path):
    with pytest.raises(RuntimeError, match=r"npm was not found.*Node\.js.*tarball=.*--data\.root"):
        fetch_fluent_emoji(tmp_path / "cache", npm="/nonexistent/npm")


def test_missing_npm_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="npm was not found"):
        fetch_fluent_emoji(tmp_path / "cache")


def test_npm_failure_shows_its_stderr(tmp_path):
    npm = fake_npm(tmp_path, None, fail="npm ERR! code E404\nnpm ERR! 404 Not Found - GET ...\n")
    with pytest.raises(RuntimeError, match=r"exit code 1:\nnpm ERR! code E404\nnpm ERR! 404"):
        fetch_fluent_emoji(tmp_path / "cache", npm=str(npm))


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = 4 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    "member",
    [
        _member("package/assets/../../escaped.webp"),
        _member("package/assets/sub/../../../escaped.webp"),
        _member("package/assets/link.webp", tarfile.SYMTYPE, "/etc/passwd"),
        _member("package/assets/hard.webp", tarfile.LNKTYPE, "package/package.json"),
    ],
    ids=["dotdot", "nested-dotdot", "symlink", "hardlink"],
)
def test_unsafe_members_are_rejected(tmp_path, member):
    path = tmp_path / "evil.tgz"
    sha = make_tarball(path, extra=[member])
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(ValueError, match="refusing"):
        fetch_fluent_emoji(cache, tarball=path, expected_sha256=sha)
    assert not list(tmp_path.rglob("escaped.webp"))
    assert not (cache / "fluent-emoji-3d-1.1.0").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # temp dir cleaned up


def test_fetch_by_name_lists_valid_names(tmp_path, tgz):
    with pytest.raises(ValueError, match=r"unknown data set 'emoji'; known: \['fluent-emoji-3d'\]"):
        fetch("emoji", tmp_path)
    path, sha = tgz
    images = fetch("fluent-emoji-3d", tmp_path, tarball=path, expected_sha256=sha)
    assert images.name == "images"


def test_default_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VQKIT_DATA", str(tmp_path / "data"))
    assert default_cache_dir() == tmp_path / "data"
    monkeypatch.delenv("VQKIT_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "vqkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    if sys.platform.startswith("linux"):
        assert default_cache_dir() == Path.home() / ".cache" / "vqkit"


def test_datamodule_without_root_uses_the_bundled_cache(tmp_path, tgz, monkeypatch):
    path, sha = tgz
    fake = bundled.NpmDataset(
        **{**FLUENT_EMOJI_3D.__dict__, "sha256": sha, "size": path.stat().st_size}
    )
    monkeypatch.setitem(DATASETS, "fluent-emoji-3d", fake)
    monkeypatch.setenv("PATH", "")  # any attempt to run npm would fail loudly
    fetch("fluent-emoji-3d", tmp_path / "cache", tarball=path)
    dm = ImageDataModule(
        cache_dir=str(tmp_path / "cache"), image_size=8, batch_size=2, num_workers=0
    )
    dm.prepare_data()  # reuses the complete cache
    dm.setup("fit")
    assert dm.train_dataset is not None and dm.val_dataset is not None
    assert len(dm.train_dataset) + len(dm.val_dataset) == len(NAMES)
    assert next(iter(dm.train_dataloader())).shape == (2, 3, 8, 8)


def _real_images() -> Path | None:
    root = default_cache_dir() / "fluent-emoji-3d-1.1.0" / "images"
    return root if (root.parent / bundled.MARKER).exists() else None


@pytest.mark.skipif(_real_images() is None, reason="the real data set is not in the cache")
def test_real_cache_matches_the_published_numbers():
    root = _real_images()
    assert root is not None
    paths = find_images(root)
    assert len(paths) == 3391
    sizes = {}
    for p in paths:
        with Image.open(p) as im:
            assert (im.format, im.mode) == ("WEBP", "RGBA")
            sizes[p.name] = im.size
    assert sum(w != h for w, h in sizes.values()) == 4
    assert set(sizes.values()) == {(256, 256), (256, 264)}
    assert os.path.getsize(root / "1f44b.webp") > 0

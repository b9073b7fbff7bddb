"""The avatar set: pinned packages drawn by node + resvg, byte-identical from fixed seeds."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from vqkit.data import avatars
from vqkit.data.avatars import (
    PINNED_MANIFESTS,
    VAL_START,
    avatars_dir,
    fetch_avatars,
    manifest_hash,
    resvg_platform,
)

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None, reason="needs node and npm"
)


# npm errors that mean "no registry from here", not a fault of vqkit's
_OFFLINE = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "ENETUNREACH", "network")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    # The real packages from the npm registry, as `vqkit data fetch avatars` gets them (about
    # 2.3 MB); the first 64 images of each split are then compared with the pinned manifests.
    cache = tmp_path_factory.mktemp("avatars")
    try:
        return cache, fetch_avatars(64, 64, cache)
    except RuntimeError as err:
        if "npm pack" in str(err) and any(m in str(err) for m in _OFFLINE):
            pytest.skip(f"the npm registry is not reachable: {str(err).splitlines()[0]}")
        raise


def _copy_tools(built_cache, cache):
    # A second cache with the tools already installed: no npm pack again.
    root = avatars_dir(cache)
    root.mkdir(parents=True)
    shutil.copytree(avatars_dir(built_cache) / "tools", root / "tools")
    return root


def test_the_first_64_of_each_split_are_the_pinned_bytes(built):
    _, s = built
    assert s.manifest == {
        "train": PINNED_MANIFESTS[("train", 64)],
        "val": PINNED_MANIFESTS[("val", 64)],
    }
    assert [p.name for p in s.train[:3]] == ["0000000.png", "0000001.png", "0000002.png"]
    assert len(s.train) == len(s.val) == 64 and s.build_seconds > 0
    with Image.open(s.train[0]) as img:
        assert img.size == (256, 256) and img.format == "PNG"
        # backgrounds are opaque: no transparent pixel for the loader to composite
        assert img.convert("RGBA").getextrema()[3] == (255, 255)
    # three styles, a background each: every image differs, train never equals val
    digests = {line[:64] for line in (s.root / "train.sha256").read_text().splitlines()}
    digests |= {line[:64] for line in (s.root / "val.sha256").read_text().splitlines()}
    assert len(digests) == 128


def test_a_second_fetch_draws_nothing(built, monkeypatch):
    cache, first = built
    monkeypatch.setattr(avatars, "_render", lambda *a, **k: pytest.fail("drew again"))
    again = fetch_avatars(32, 16, cache)
    assert again.build_seconds == 0
    assert again.train == first.train[:32] and again.val == first.val[:16]
    assert again.manifest["train"] == manifest_hash(
        (first.root / "train.sha256").read_text().splitlines(keepends=True)[:32]
    )


def test_growing_a_split_draws_only_the_new_images(built, tmp_path):
    cache, first = built
    root = _copy_tools(cache, tmp_path)
    small = fetch_avatars(4, 2, tmp_path)
    stamps = [p.stat().st_mtime_ns for p in small.train]
    grown = fetch_avatars(6, 2, tmp_path)
    assert [p.stat().st_mtime_ns for p in grown.train[:4]] == stamps
    # same bytes as the same seeds drawn in one go
    lines = (root / "train.sha256").read_text().splitlines()
    assert lines == (first.root / "train.sha256").read_text().splitlines()[:6]
    assert grown.train[5].name == "0000005.png"


def test_an_interrupted_build_is_finished_and_a_lost_file_is_named(built, tmp_path):
    cache, _ = built
    root = _copy_tools(cache, tmp_path)
    (root / "train").mkdir()
    (root / "train" / "0000001.png.123.tmp").write_bytes(b"half a png")  # killed mid-write
    s = fetch_avatars(3, 1, tmp_path)
    assert (root / "train.sha256").read_text().splitlines()[1][:64] == (
        (cache / root.name / "train.sha256").read_text().splitlines()[1][:64]
    )
    s.train[2].unlink()
    with pytest.raises(RuntimeError, match=r"1 listed train avatars are missing.*0000002"):
        fetch_avatars(3, 1, tmp_path)


def test_a_renderer_that_draws_differently_is_refused(built, tmp_path, monkeypatch):
    cache, _ = built
    _copy_tools(cache, tmp_path)
    monkeypatch.setattr(avatars, "PINNED_MANIFESTS", {("train", 2): "0" * 64})
    with pytest.raises(RuntimeError, match="first 2 train avatars do not match the pinned"):
        fetch_avatars(2, 1, tmp_path)
    assert not (avatars_dir(tmp_path) / "train.sha256").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num": 0}, "num must be >= 1"),
        ({"num": 2.5}, "num must be an int"),
        ({"num_val": -1}, "num_val must be an int >= 0"),
        ({"image_size": 4}, "image_size must be >= 8"),
    ],
)
def test_bad_sizes_fail_with_the_value(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fetch_avatars(**{"num": 2, "num_val": 1, "cache_dir": tmp_path, **kwargs})


def test_resvg_platform_keys(monkeypatch):
    assert resvg_platform() in avatars.RESVG_BINARIES
    monkeypatch.setattr(avatars.sys, "platform", "darwin")
    monkeypatch.setattr(avatars.platform, "machine", lambda: "arm64")
    assert resvg_platform() == "darwin-arm64"
    monkeypatch.setattr(avatars.sys, "platform", "sunos5")
    with pytest.raises(RuntimeError, match="no pinned resvg binary for this platform"):
        resvg_platform()


def test_missing_node_says_what_to_install(built, tmp_path):
    cache, _ = built
    _copy_tools(cache, tmp_path)
    with pytest.raises(RuntimeError, match="node was not found"):
        fetch_avatars(2, 1, tmp_path, node="no-such-node")


def test_cli_fetch_avatars(built, tmp_path, capsys):
    from vqkit.cli.data import _data_main

    cache, _ = built
    _copy_tools(cache, tmp_path)
    args = ["fetch", "avatars", "--num", "3", "--num-val", "2", "--cache-dir", str(tmp_path)]
    assert _data_main(args) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(avatars_dir(tmp_path))
    assert "drew avatars in" in out.err and VAL_START == 10_000_000
    assert _data_main(["fetch", "fluent-emoji-3d", "--num", "3"]) == 1
    assert "--num, --num-val and --workers apply to `avatars` only" in capsys.readouterr().err


def test_the_data_module_trains_on_the_avatar_set(built, tmp_path, monkeypatch):
    import torch

    from vqkit.data import ImageDataModule
    from vqkit.data.images import load_image

    cache, s = built
    monkeypatch.setattr(avatars, "_render", lambda *a, **k: pytest.fail("drew again"))
    kw = dict(dataset="avatars", dataset_size=12, val_size=4, image_size=32, batch_size=4)
    dm = ImageDataModule(**kw, cache_dir=str(cache), cache_images=True, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    # the split is the set's own: the first 12 training seeds, the first 4 validation seeds
    assert dm.train_dataset.paths == s.train[:12] and dm.val_dataset.paths == s.val[:4]
    assert dm.skipped_count == 0 and dm.images_in_memory()
    torch.testing.assert_close(dm.val_dataset[1], load_image(s.val[1], 32), rtol=0, atol=0)
    # the disk cache streams the same pixels
    disk = ImageDataModule(**kw, cache_dir=str(cache), cache_images="disk", num_workers=0)
    disk.setup("fit")
    assert disk.cache_resolved == "disk"
    assert torch.equal(disk.train_dataset[5], dm.train_dataset[5])
    # --data.root overrides the set; its sizes are then unused
    folder = tmp_path / "mine"
    folder.mkdir()
    for p in s.train[:6]:
        (folder / p.name).write_bytes(p.read_bytes())
    own = ImageDataModule(**kw, root=str(folder), val_fraction=0.25, num_workers=0)
    own.setup("fit")
    assert len(own.train_dataset) + len(own.val_dataset) == 6
    with pytest.raises(ValueError, match="dataset_size must be an int >= 1, got 0"):
        ImageDataModule(dataset="avatars", dataset_size=0)
    with pytest.raises(ValueError, match=r"unknown dataset 'avatar'; known: \['avatars'"):
        ImageDataModule(dataset="avatar")

"""cache_images="disk": the decoded images in one file, built once (one decode pass that is also
the scan for unreadable files), reused by later runs and by concurrent processes, read one image
at a time without growing resident memory, and bit for bit the memory cache's pixels."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vqkit.data.images as images_mod
from vqkit.cli import _data_in_memory
from vqkit.data import ImageDataModule, ImageFolderDataset, load_image
from vqkit.data.diskcache import DiskImageCache, cache_inputs, cache_key, open_or_build
from vqkit.data.sampler import ResumableLoader

S = 16


def _smooth(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((w, h), Image.BICUBIC)


def _write_folder(root: Path, n: int = 40, seed: int = 0) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (24, 24) if i % 3 else (32, 20)  # some need a crop and a resize
        p = root / f"img_{i:03d}.png"
        _smooth(rng, w, h).save(p)
        paths.append(p)
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("not an image\n")
    cut = root / "cut.png"
    _smooth(rng, 64, 64).save(cut)
    cut.write_bytes(cut.read_bytes()[:200])
    return paths


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    _write_folder(tmp_path / "imgs")
    return tmp_path / "imgs"


def _dm(folder: Path, cache: object, cache_dir: Path, **kw: object) -> ImageDataModule:
    args = dict(
        root=str(folder),
        image_size=S,
        batch_size=4,
        num_workers=0,
        val_fraction=0.2,
        jitter=0.2,
        cache_images=cache,
        cache_dir=str(cache_dir),
    )
    args.update(kw)
    dm = ImageDataModule(**args)
    dm.setup("fit")
    return dm


def _items(ds: ImageFolderDataset, epoch_seed: int = 7) -> torch.Tensor:
    return torch.stack([ds[(i, epoch_seed * 1000 + i)] for i in range(len(ds))])


def _fail_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded a file although a complete cache exists")

    monkeypatch.setattr(images_mod, "_open_rgb", fail)


def test_disk_cache_is_the_memory_cache_bit_for_bit_with_the_same_split(folder, tmp_path):
    cache_dir = tmp_path / "cache"
    dms = {c: _dm(folder, c, cache_dir) for c in (False, True, "disk")}
    none, mem, disk = dms[False], dms[True], dms["disk"]
    assert disk.train_dataset.cache_mode == "disk" and mem.train_dataset.cache_mode == "memory"
    assert none.train_dataset.cache_mode == "none"
    # the same unreadable files, reasons and split as the scan gives without a cache
    assert disk.skipped_count == mem.skipped_count == none.skipped_count == 3
    assert disk.skipped == none.skipped
    for part in ("train_dataset", "val_dataset"):
        a, b, c = (getattr(d, part) for d in (none, mem, disk))
        assert a.paths == b.paths == c.paths
        assert torch.equal(_items(c), _items(b))  # augmented (per-sample seed): bit for bit
        assert torch.equal(_items(c), _items(a))  # and what decoding each file gives
    assert torch.equal(disk.val_dataset[0], load_image(disk.val_dataset.paths[0], S))
    batches = [list(d.train_dataloader()) for d in (mem, disk)]
    assert len(batches[0]) == len(disk.train_dataset) // 4
    assert all(torch.equal(x, y) for x, y in zip(*batches, strict=True))
    # one cache file for the folder, a complete sidecar that names the bad files
    (sidecar,) = (cache_dir / "image-cache").glob("*.json")
    meta = json.loads(sidecar.read_text())
    assert meta["complete"] and meta["num_images"] == 40 and meta["num_files"] == 43
    assert meta["image_size"] == S and len(meta["inputs"]["files"]) == 43
    assert sorted(Path(p).name for _, p, _ in meta["skipped"]) == [
        "cut.png",
        "empty.png",
        "text.png",
    ]
    data = sidecar.with_suffix(".u8")
    assert data.stat().st_size == 40 * 3 * S * S


def test_dataset_disk_cache_alone_matches_the_scan(folder, tmp_path):
    scanned = ImageFolderDataset(folder, S, cache=True)
    cached = ImageFolderDataset(folder, S, cache="disk", cache_dir=tmp_path / "c")
    assert cached.paths == scanned.paths and cached.skipped == scanned.skipped
    assert torch.equal(_items(cached), _items(scanned))
    with pytest.raises(ValueError, match=r"cache must be one of .*got 'ram'"):
        ImageFolderDataset(folder, S, cache="ram")


def test_complete_cache_is_reused_without_decoding_or_scanning(folder, tmp_path, monkeypatch):
    first = _dm(folder, "disk", tmp_path / "cache")
    expected = _items(first.train_dataset)
    _fail_decoding(monkeypatch)  # neither the scan nor a cache build may decode now
    again = _dm(folder, "disk", tmp_path / "cache")
    assert again.skipped == first.skipped and again.skipped_count == 3  # from the sidecar
    assert again.train_dataset.paths == first.train_dataset.paths
    assert again.val_dataset.paths == first.val_dataset.paths
    assert torch.equal(_items(again.train_dataset), expected)


def test_a_changed_file_makes_a_new_cache(folder, tmp_path):
    paths = sorted(folder.glob("img_*.png"))
    first = open_or_build(paths, S, cache_dir=tmp_path / "c")
    assert first.built
    assert not open_or_build(paths, S, cache_dir=tmp_path / "c").built
    changed = paths[5]
    Image.new("RGB", (24, 24), (10, 200, 30)).save(changed)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # even on coarse clocks
    second = open_or_build(paths, S, cache_dir=tmp_path / "c")
    assert second.built and second.cache.path != first.cache.path
    expected = torch.from_numpy(images_mod.load_image_uint8(changed, S))
    assert torch.equal(second.cache.read(5), expected)
    assert not torch.equal(first.cache.read(5), expected)  # the old file is left alone


def test_interrupted_build_leaves_no_complete_cache(folder, tmp_path, monkeypatch):
    paths = sorted(folder.glob("*.png"))
    real, calls = images_mod._open_rgb, []

    def dies_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) == 20:
            raise RuntimeError("killed mid-build")
        return real(*args, **kwargs)

    monkeypatch.setattr(images_mod, "_open_rgb", dies_midway)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        open_or_build(paths, S, cache_dir=tmp_path / "c", threads=2)
    left = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert all(name.endswith(".lock") for name in left), left  # no data, sidecar or temp file
    # what a build killed with SIGKILL leaves: a temporary file, removed by the next build
    key = cache_key(cache_inputs(paths, S, "crop", (255, 255, 255)))
    killed = tmp_path / "c" / f"{key}.u8.tmp-999999"
    killed.write_bytes(b"\0" * 1000)
    monkeypatch.setattr(images_mod, "_open_rgb", real)
    found = open_or_build(paths, S, cache_dir=tmp_path / "c", threads=2)
    assert found.built and len(found.cache) == 40 and len(found.skipped) == 3
    assert not killed.exists() and found.cache.path.name == f"{key}.u8"


def test_resume_mid_epoch_gives_the_uninterrupted_batches(folder, tmp_path):
    ds = _dm(folder, "disk", tmp_path / "cache").train_dataset
    reference = ResumableLoader(ds, batch_size=4, seed=3)
    epochs = [list(reference) for _ in range(2)]

    loader = ResumableLoader(ds, batch_size=4, seed=3)
    list(loader)  # epoch 0
    it = iter(loader)
    seen = [next(it), next(it)]  # 2 batches into epoch 1, then the run stops
    state = loader.state_dict()
    del it

    restarted = pickle.loads(pickle.dumps(ds))  # a new process's copy of the data set
    resumed = ResumableLoader(restarted, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(seen) + len(rest) == len(epochs[1])
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, epochs[1], strict=True))


def test_worker_processes_read_the_same_batches(folder, tmp_path):
    ds = _dm(folder, "disk", tmp_path / "cache").train_dataset
    ds[0]  # the main process opens its descriptor first; forked workers must open their own
    main = list(ResumableLoader(ds, batch_size=4, seed=1))
    workers = list(ResumableLoader(ds, batch_size=4, seed=1, num_workers=2))
    assert all(torch.equal(a, b) for a, b in zip(main, workers, strict=True))


def test_dataset_pickles_without_its_file_descriptor(folder, tmp_path):
    ds = _dm(folder, "disk", tmp_path / "cache").val_dataset
    first = ds[1]
    assert ds._disk._fd is not None
    blob = pickle.dumps(ds)
    copy = pickle.loads(blob)
    assert copy._disk._fd is None and ds._disk._fd is not None
    assert torch.equal(copy[1], first) and torch.equal(ds[1], first)
    assert len(blob) < 20_000  # paths and row numbers, no pixels


def _build_in_child(paths, cache_dir, barrier, queue) -> None:
    barrier.wait()  # both ask for the cache at the same moment
    found = open_or_build(paths, S, cache_dir=cache_dir, threads=1)
    digest = hashlib.sha256()
    for i in range(len(found.cache)):
        digest.update(found.cache.read(i).numpy().tobytes())
    queue.put((found.built, digest.hexdigest(), [p.name for p, _ in found.skipped]))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_two_processes_build_once_and_read_the_same(folder, tmp_path):
    paths = sorted(folder.glob("*.png"))
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_build_in_child, args=(paths, tmp_path / "c", barrier, queue))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sorted(built for built, _, _ in results) == [False, True]  # one built, one waited
    assert results[0][1:] == results[1][1:]
    here = open_or_build(paths, S, cache_dir=tmp_path / "c")
    assert not here.built
    digest = hashlib.sha256()
    for i in range(len(here.cache)):
        digest.update(here.cache.read(i).numpy().tobytes())
    assert digest.hexdigest() == results[0][1]
    assert len(list((tmp_path / "c").glob("*.u8"))) == 1


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_reading_every_image_keeps_resident_memory_small(tmp_path):
    size, n = 128, 1500  # 73.7 MB of rows
    row = 3 * size * size
    path = tmp_path / "big.u8"
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for _ in range(0, n, 100):
            f.write(rng.integers(0, 256, 100 * row, dtype=np.uint8).tobytes())
    cache = DiskImageCache(path, size, n)
    cache.read(0).float()  # allocator warm-up
    before = _rss_bytes()
    total = 0.0
    for i in range(n):
        total += float(cache.read(i)[0, 0, 0])
    grown = _rss_bytes() - before
    assert path.stat().st_size == n * row > 64e6
    assert grown < 8e6, f"RSS grew by {grown / 1e6:.1f} MB reading a {n * row / 1e6:.0f} MB cache"
    expected = np.fromfile(path, dtype=np.uint8, count=row, offset=(n - 1) * row)
    assert np.array_equal(cache.read(n - 1).numpy().ravel(), expected)


def test_bad_cache_images_value_names_it_and_the_choices(folder):
    with pytest.raises(ValueError, match=r"cache_images must be one of False, True, .*'disk'"):
        ImageDataModule(root=str(folder), cache_images="ram")
    with pytest.raises(ValueError, match="memory_cache_limit_gb must be >= 0"):
        ImageDataModule(root=str(folder), memory_cache_limit_gb=-1)
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ImageDataModule, "data")
    base = ["--data.root", str(folder)]
    assert parser.parse_args([*base, "--data.cache_images", "disk"]).data.cache_images == "disk"
    assert parser.parse_args([*base, "--data.cache_images", "true"]).data.cache_images is True
    with pytest.raises(jsonargparse.ArgumentError, match="cache_images"):
        parser.parse_args([*base, "--data.cache_images", "ram"])


def test_auto_keeps_small_sets_in_memory_and_large_ones_on_disk(folder, tmp_path):
    # 43 candidate files at 16 px are 33 kB decoded
    small = ImageDataModule(root=str(folder), image_size=S, cache_images="auto")
    assert small.images_in_memory() and _data_in_memory(small)  # decided before setup
    large = ImageDataModule(
        root=str(folder), image_size=S, cache_images="auto", memory_cache_limit_gb=1e-5
    )
    assert not large.images_in_memory() and not _data_in_memory(large)
    for dm, mode in ((small, "memory"), (large, "disk")):
        dm.cache_dir, dm.batch_size, dm.num_workers = str(tmp_path / "c"), 4, 0
        dm.setup()
        assert dm.cache_resolved == mode and dm.train_dataset.cache_mode == mode
    disk = ImageDataModule(root=str(folder), cache_images="disk")
    assert not _data_in_memory(disk) and _data_in_memory(
        ImageDataModule(root=str(folder), cache_images=True)
    )


def test_val_root_gets_its_own_cache_with_the_same_images(tmp_path):
    _write_folder(tmp_path / "train", n=12, seed=1)
    _write_folder(tmp_path / "val", n=6, seed=2)
    dms = [
        _dm(tmp_path / "train", c, tmp_path / "cache", val_root=str(tmp_path / "val"))
        for c in ("disk", True)
    ]
    for part in ("train_dataset", "val_dataset"):
        disk, mem = (getattr(d, part) for d in dms)
        assert disk.paths == mem.paths and torch.equal(_items(disk), _items(mem))
    assert dms[0].skipped == dms[1].skipped and dms[0].skipped_count == 6  # 3 bad in each
    assert len(list((tmp_path / "cache" / "image-cache").glob("*.u8"))) == 2

"""vqkit.data: decoding PIL modes, skipping broken files, splitting, augmentation, DataModule."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vqkit.data import (
    ImageDataModule,
    ImageFolderDataset,
    color_jitter,
    find_images,
    group_key,
    load_image,
    split_by_group,
)

S = 32  # every fixture image is S x S unless the test is about shape, so no resampling blurs values
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def _rgb(color: tuple[int, int, int], size: tuple[int, int] = (S, S)) -> Image.Image:
    return Image.new("RGB", size, color)


def _noise(size: int = 64, seed: int = 0) -> Image.Image:
    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB")


def _half_transparent(mode: str) -> Image.Image:
    """Left half fully transparent (hiding black), right half opaque."""
    img = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    img.paste(Image.new("RGBA", (S // 2, S), (*RED, 255)), (S // 2, 0))
    return img if mode == "RGBA" else img.convert(mode)


def _to_8bit(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1.0) * 127.5).round().to(torch.int64)


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_good(root: Path) -> dict[str, Path]:
    """One file per decoding path; returns name -> path."""
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        files[name] = root / name
        img.save(files[name], **kw)

    save("rgb.png", _rgb(RED))
    save("rgba.png", _half_transparent("RGBA"))
    la = Image.new("LA", (S, S), (0, 0))
    la.paste(Image.new("LA", (S // 2, S), (0, 255)), (S // 2, 0))
    save("la.png", la)
    p = Image.new("P", (S, S), 0)
    p.putpalette([0, 0, 0, *RED] + [0] * (256 - 2) * 3)
    p.paste(1, (S // 2, 0, S, S))
    save("p_transparent.png", p, transparency=0)
    save("grey.png", Image.new("L", (S, S), 128))
    save("grey16.png", Image.fromarray(np.full((S, S), 128 * 257, dtype=np.uint16)))
    save("cmyk.jpg", Image.new("CMYK", (S, S), (0, 255, 255, 0)), quality=95)
    frames = [_rgb(BLUE).convert("P"), _rgb(GREEN).convert("P")]
    (root / "sub").mkdir(exist_ok=True)
    files["anim.gif"] = root / "sub" / "anim.gif"
    frames[0].save(files["anim.gif"], save_all=True, append_images=frames[1:], duration=100)
    save("lossless.webp", _rgb(BLUE), lossless=True)
    save("UPPER.PNG", _rgb(GREEN))
    save("photo.jpeg", _noise(S), quality=90)
    save("bitmap.bmp", _rgb(RED))
    return files


def make_bad(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = {"empty.png": root / "empty.png", "text.png": root / "text.png"}
    files["empty.png"].write_bytes(b"")
    files["text.png"].write_text("this is not an image\n")
    for name, fmt in (("cut.png", "PNG"), ("cut.jpg", "JPEG")):
        files[name] = root / name
        _noise(128).save(files[name], format=fmt)
        _truncate(files[name])
    return files


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    root = tmp_path / "imgs"
    good, bad = make_good(root), make_bad(root)
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root, good, bad


# --- discovery and decoding ---------------------------------------------------------------------


def test_find_images_recursive_sorted_case_insensitive(mixed):
    root, good, bad = mixed
    found = find_images(root)
    assert found == sorted(found)
    assert set(found) == set(good.values()) | set(bad.values())  # .PNG in, .txt out, sub/ in


def test_find_images_missing_folder_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        find_images(missing)


def test_every_good_mode_loads_to_rgb_in_range(mixed):
    _, good, _ = mixed
    for name, path in good.items():
        x = load_image(path, 16)
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32, name
        assert x.min() >= -1.0 and x.max() <= 1.0, name


@pytest.mark.parametrize("name", ["rgba.png", "la.png", "p_transparent.png"])
def test_transparent_pixels_become_white(mixed, name):
    x = load_image(mixed[1][name], S)
    assert torch.equal(x[:, :, : S // 2], torch.ones(3, S, S // 2))  # alpha 0 hid black
    opaque = x[:, :, S // 2 :]
    if name == "la.png":
        assert torch.equal(opaque, -torch.ones_like(opaque))  # opaque black
    else:
        assert torch.equal(opaque[0], torch.ones(S, S // 2))  # opaque red
        assert torch.equal(opaque[1:], -torch.ones(2, S, S // 2))


def test_background_colour_is_configurable(mixed):
    x = load_image(mixed[1]["rgba.png"], S, background=(0, 0, 0))
    assert torch.equal(x[:, :, : S // 2], -torch.ones(3, S, S // 2))


def test_grey_and_16_bit_grey_scale_to_the_same_value(mixed):
    _, good, _ = mixed
    with Image.open(good["grey16.png"]) as im:
        assert im.mode.startswith("I")  # really a 16-bit file, not silently 8-bit
    for name in ("grey.png", "grey16.png"):
        x = load_image(good[name], S)
        assert torch.all(_to_8bit(x) == 128), name  # 16-bit 32896 -> 128, not clipped to 255


def test_16_bit_full_range_is_rescaled_not_clipped(tmp_path):
    ramp = np.array([[0, 257 * 64, 257 * 200, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    x = load_image(tmp_path / "ramp.png", 4, square="pad")
    got = _to_8bit(x[0, 0]).tolist()
    assert got == [0, 64, 200, 255]


def test_cmyk_jpeg_gif_first_frame_and_webp_colours(mixed):
    _, good, _ = mixed
    cmyk = load_image(good["cmyk.jpg"], S).mean(dim=(1, 2))
    assert cmyk[0] > 0.9 and cmyk[1] < -0.9 and cmyk[2] < -0.9  # C=0 M=Y=100%: red
    gif = load_image(good["anim.gif"], S).mean(dim=(1, 2))
    assert torch.allclose(gif, torch.tensor([-1.0, -1.0, 1.0]))  # frame 0 is blue, not green
    webp = load_image(good["lossless.webp"], S).mean(dim=(1, 2))
    assert torch.allclose(webp, torch.tensor([-1.0, -1.0, 1.0]))


def test_non_square_crop_vs_pad(tmp_path):
    img = _rgb(RED, (64, 32))
    img.paste(_rgb(GREEN, (32, 32)), (16, 0))  # red | green | red  (16 | 32 | 16)
    img.save(tmp_path / "wide.png")
    crop = load_image(tmp_path / "wide.png", 32, square="crop")
    assert torch.equal(crop, load_image(_save(_rgb(GREEN), tmp_path / "g.png"), 32))
    pad = load_image(tmp_path / "wide.png", 64, square="pad")
    assert pad.shape == (3, 64, 64)
    assert torch.equal(pad[:, :16], torch.ones(3, 16, 64))  # white bands top and bottom
    assert torch.equal(pad[:, 48:], torch.ones(3, 16, 64))
    assert torch.equal(pad[:, 16:48, 16:48], crop)
    with pytest.raises(ValueError, match="square must be one of"):
        load_image(tmp_path / "wide.png", 32, square="stretch")  # type: ignore[arg-type]


def _save(img: Image.Image, path: Path) -> Path:
    img.save(path)
    return path


def test_resize_keeps_a_flat_colour_flat(mixed):
    x = load_image(mixed[1]["rgb.png"], 7)  # odd size: Lanczos must not ring on a flat image
    assert torch.allclose(x, load_image(mixed[1]["rgb.png"], S)[:, :7, :7], atol=1e-6)


# --- the data set: skipping broken files ----------------------------------------------------------


def test_dataset_skips_and_reports_bad_files(mixed, caplog):
    root, good, bad = mixed
    with caplog.at_level(logging.WARNING, logger="vqkit.data"):
        ds = ImageFolderDataset(root, 16)
    assert sorted(ds.paths) == sorted(good.values())
    assert {p for p, _ in ds.skipped} == set(bad.values())  # the .txt is not even counted
    assert all(reason for _, reason in ds.skipped)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warnings) == 1
        and f"skipped {len(bad)} of {len(good) + len(bad)}" in warnings[0].msg % warnings[0].args
    )
    batch = torch.stack([ds[i] for i in range(len(ds))])
    assert batch.shape == (len(good), 3, 16, 16)
    assert batch.min() >= -1 and batch.max() <= 1


def test_only_bad_files_raises_value_error(tmp_path):
    make_bad(tmp_path / "bad")
    with pytest.raises(ValueError, match="no usable image.*4 files could not be decoded"):
        ImageFolderDataset(tmp_path / "bad", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable image"):
        ImageFolderDataset(tmp_path / "empty", 16)


def test_file_broken_after_scan_is_substituted_not_fatal(tmp_path):
    paths = [_save(_rgb(c), tmp_path / f"{i}.png") for i, c in enumerate((RED, GREEN, BLUE))]
    ds = ImageFolderDataset(paths, S)
    paths[1].write_bytes(b"")  # e.g. overwritten on a network share mid-run
    assert torch.equal(ds[1], ds[2])  # index 1 now yields the next image
    assert [p for p, _ in ds.skipped] == [paths[1]]


# --- augmentation ---------------------------------------------------------------------------------


def test_flip_with_p1_is_torch_flip(mixed):
    path = mixed[1]["photo.jpeg"]
    ds = ImageFolderDataset([path], S, augment=True, flip_p=1.0, jitter=0.0)
    assert torch.equal(ds[0], torch.flip(load_image(path, S), dims=(-1,)))
    ds = ImageFolderDataset([path], S, augment=True, flip_p=0.0, jitter=0.0)
    assert torch.equal(ds[0], load_image(path, S))


def test_augmentation_is_deterministic_given_the_torch_seed(mixed):
    path = mixed[1]["photo.jpeg"]
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        ds = ImageFolderDataset([path], S, augment=True, jitter=0.2)
        outs.append(torch.stack([ds[0] for _ in range(8)]))
    assert torch.equal(outs[0], outs[1])
    assert not all(torch.equal(outs[0][0], o) for o in outs[0][1:])  # but varies draw to draw


@settings(max_examples=40, deadline=None)
@given(strength=st.floats(0.0, 0.99), seed=st.integers(0, 2**31 - 1))
def test_jitter_stays_in_range(strength, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 8, 8, generator=g) * 2 - 1
    y = color_jitter(x, strength, g)
    assert y.shape == x.shape and y.min() >= -1.0 and y.max() <= 1.0


def test_jitter_zero_is_identity_and_small_jitter_is_small():
    x = torch.rand(3, 8, 8) * 1.6 - 0.8
    assert torch.equal(color_jitter(x, 0.0), x)
    assert (color_jitter(x, 0.1) - x).abs().max() < 0.5


def test_bad_augment_args_name_the_value(tmp_path):
    path = _save(_rgb(RED), tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"flip_p must be in \[0, 1\], got 1.5"):
        ImageFolderDataset([path], S, flip_p=1.5)
    with pytest.raises(ValueError, match="jitter must be in"):
        ImageFolderDataset([path], S, jitter=-0.1)


# --- split ----------------------------------------------------------------------------------------

TONES = ["1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"]


def test_group_key_strips_skin_tones_and_variation_selectors():
    base = group_key("e/1f44b.webp")
    assert base == "e/1f44b"
    for t in TONES:
        assert group_key(f"e/1f44b-{t}.webp") == base
        assert group_key(f"e/1F44B_{t.upper()}.png") == base
        assert group_key(f"e/emoji_u1f44b_{t}.png") == group_key("e/emoji_u1f44b.png")
    # Toned sequences drop FE0F: "1f3cb-fe0f" (base) and "1f3cb-1f3fb" are one emoji.
    assert group_key("e/1f3cb-fe0f.webp") == group_key("e/1f3cb-1f3fb.webp")
    # Multi-person sequences with two tones still land with their untoned base.
    assert group_key("e/1f9d1-1f3fb-200d-1f91d-200d-1f9d1-1f3fe.webp") == group_key(
        "e/1f9d1-200d-1f91d-200d-1f9d1.webp"
    )
    assert group_key("e/1f44c.webp") != base
    assert group_key("other/1f44b.webp") != base  # a different folder is a different image


def _emoji_names(n_groups: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n_groups):
        code = f"1f{i + 0x300:03x}"
        paths.append(Path(f"e/{code}.webp"))
        if rng.random() < 0.3:  # like the real set: some emoji have five toned siblings
            paths += [Path(f"e/{code}-{t}.webp") for t in TONES]
    return paths


def test_split_keeps_groups_together_and_hits_the_fraction():
    paths = _emoji_names(400)
    train, val = split_by_group(paths, val_fraction=0.1, seed=0)
    assert sorted(train + val) == sorted(paths)
    assert not {group_key(p) for p in train} & {group_key(p) for p in val}
    assert abs(len(val) - 0.1 * len(paths)) <= 3
    toned = [p for p in val if "-1f3f" in p.name]
    assert toned  # with ~30% toned families some land in val, whole
    for p in toned:
        assert Path(f"e/{p.stem.split('-')[0]}.webp") in val


def test_split_is_deterministic_order_free_and_seed_dependent():
    paths = _emoji_names(200)
    a = split_by_group(paths, 0.2, seed=1)
    assert split_by_group(list(reversed(paths)), 0.2, seed=1) == a
    assert split_by_group(paths, 0.2, seed=2)[1] != a[1]


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=60),
    frac=st.floats(0.01, 0.9),
    seed=st.integers(0, 1000),
)
def test_split_properties(sizes, frac, seed):
    names = [
        f"{g:05x}" + (f"-{TONES[k - 1]}" if k else "")
        for g, n in enumerate(sizes)
        for k in range(n)
    ]
    paths = [Path(f"{name}.png") for name in names]
    train, val = split_by_group(paths, frac, seed)
    assert train and val and sorted(train + val) == sorted(paths)
    assert not {group_key(p) for p in train} & {group_key(p) for p in val}
    assert abs(len(val) - frac * len(paths)) <= max(sizes)


def test_split_edge_cases():
    assert split_by_group([Path("a.png"), Path("b.png")], 0.0) == (
        [Path("a.png"), Path("b.png")],
        [],
    )
    with pytest.raises(ValueError, match="val_fraction must be in"):
        split_by_group([Path("a.png")], 1.0)
    with pytest.raises(ValueError, match="share the group"):
        split_by_group([Path("1f44b.png"), Path("1f44b-1f3fb.png")], 0.5)


# --- DataModule -----------------------------------------------------------------------------------


def _emoji_folder(root: Path, n_groups: int = 12) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_groups):
        names = [f"1f{i + 0x400:03x}"] + (
            [f"1f{i + 0x400:03x}-{t}" for t in TONES] if i % 3 == 0 else []
        )
        for j, name in enumerate(names):
            paths.append(_save(_noise(24, seed=100 * i + j), root / f"{name}.png"))
    return paths


def test_datamodule_batches_split_and_no_val_augmentation(tmp_path):
    paths = _emoji_folder(tmp_path / "d")
    (tmp_path / "d" / "broken.png").write_bytes(b"\x89PNG\r\n")
    dm = ImageDataModule(
        root=str(tmp_path / "d"),
        image_size=16,
        batch_size=4,
        num_workers=0,
        val_fraction=0.25,
        jitter=0.2,
    )
    dm.setup("fit")
    assert dm.skipped_count == 1 and dm.skipped[0][0].name == "broken.png"
    assert dm.train_dataset is not None and dm.val_dataset is not None
    train, val = dm.train_dataset.paths, dm.val_dataset.paths
    assert sorted(train + val) == sorted(paths)
    assert not {group_key(p) for p in train} & {group_key(p) for p in val}
    batches = list(dm.train_dataloader())
    assert len(batches) == len(train) // 4  # drop_last
    assert all(b.shape == (4, 3, 16, 16) for b in batches)
    assert dm.train_dataset.augment and not dm.val_dataset.augment
    val_batch = next(iter(dm.val_dataloader()))
    expected = torch.stack([load_image(p, 16) for p in val[: len(val_batch)]])
    assert torch.equal(val_batch, expected)  # no flip, no jitter, in order


def test_datamodule_split_is_deterministic_and_seeded(tmp_path):
    _emoji_folder(tmp_path / "d", n_groups=30)

    def val_paths(seed: int) -> list[Path]:
        dm = ImageDataModule(root=str(tmp_path / "d"), batch_size=2, num_workers=0, split_seed=seed)
        dm.setup()
        assert dm.val_dataset is not None
        return dm.val_dataset.paths

    assert val_paths(0) == val_paths(0)
    assert val_paths(0) != val_paths(1)


def test_datamodule_workers_give_identical_augmented_batches(tmp_path):
    _emoji_folder(tmp_path / "d")

    def first_batches() -> list[torch.Tensor]:
        dm = ImageDataModule(
            root=str(tmp_path / "d"),
            image_size=8,
            batch_size=4,
            num_workers=2,
            jitter=0.2,
            persistent_workers=False,
        )
        dm.setup()
        return list(dm.train_dataloader())[:3]

    a, b = first_batches(), first_batches()
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_datamodule_val_root_max_images_and_errors(tmp_path):
    _emoji_folder(tmp_path / "train", n_groups=20)
    _emoji_folder(tmp_path / "val", n_groups=3)
    dm = ImageDataModule(
        root=str(tmp_path / "train"),
        val_root=str(tmp_path / "val"),
        max_images=10,
        batch_size=2,
        num_workers=0,
    )
    dm.setup()
    assert dm.train_dataset is not None and dm.val_dataset is not None
    assert len(dm.train_dataset) == 10 and len(dm.val_dataset) == 8  # val keeps all of its folder
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing"))):
        ImageDataModule(root=str(tmp_path / "missing"))  # in __init__, before any model exists
    with pytest.raises(FileNotFoundError, match="val_root"):
        ImageDataModule(root=str(tmp_path / "train"), val_root=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="val_fraction must be in"):
        ImageDataModule(root=str(tmp_path / "train"), val_fraction=1.5)
    big = ImageDataModule(root=str(tmp_path / "train"), batch_size=500, num_workers=0)
    with pytest.raises(ValueError, match="batch_size=500 is larger than"):
        big.setup()


def test_datamodule_signature_parses_with_jsonargparse(tmp_path):
    jsonargparse = pytest.importorskip("jsonargparse")
    _emoji_folder(tmp_path / "d", n_groups=4)
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ImageDataModule, "data")
    cfg = parser.parse_args(["--data.root", str(tmp_path / "d"), "--data.square", "pad"])
    assert cfg.data.square == "pad" and cfg.data.root == str(tmp_path / "d")
    assert cfg.data.pin_memory is None and cfg.data.max_images is None
    with pytest.raises(jsonargparse.ArgumentError, match="square"):
        parser.parse_args(["--data.square", "stretch"])
    dm = ImageDataModule(**cfg.data.as_dict())
    assert dm.square == "pad"


def test_workers_do_not_share_an_augmentation_stream(tmp_path):
    path = _save(_noise(8), tmp_path / "one.png")
    ds = ImageFolderDataset([path] * 4, 8, augment=True, jitter=0.2)
    ds[0]  # creates the main process's generator, which forked workers inherit
    loader = torch.utils.data.DataLoader(
        ds, batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(0)
    )
    b0, b1, b2, b3 = list(loader)  # batches 0, 2 from worker 0; 1, 3 from worker 1
    assert not torch.equal(b0, b1) and not torch.equal(b2, b3)


def test_dataset_indexing_ends_at_its_length(tmp_path):
    from PIL import Image as _Image

    from vqkit.data import ImageFolderDataset

    for i in range(3):
        _Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    for cache in (False, True):
        ds = ImageFolderDataset(tmp_path, 8, cache=cache)
        items = list(ds)  # the sequence protocol stops at IndexError
        assert len(items) == 3
        assert torch.equal(ds[-1], items[-1])
        with pytest.raises(IndexError, match="index 3 out of range for 3 images"):
            ds[3]

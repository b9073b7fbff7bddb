"""Hostile and odd input, property-tested with hypothesis: every case gets a result or a one-line
error that names the problem; none gets a traceback from deep inside, a hang or a NaN."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vqkit import DeadCodeRestart, EMAUpdate, KMeansInit, KMeansReestimate, VectorQuantizer
from vqkit.data.images import UnreadableImageError, load_image
from vqkit.quantize.quantizer import NonFiniteError

FUZZ = settings(
    max_examples=60,
    deadline=None,  # no timing (slow shared CPUs); a hang hits pytest-timeout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,  # the same examples on every machine: a failure is reproducible
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def _quantizer(mode: str, dim: int, channel_first: bool) -> VectorQuantizer:
    torch.manual_seed(0)
    maintenance = [
        KMeansInit(warmup_steps=1, reservoir_size=64, iters=3),
        KMeansReestimate(every=2, until=6, reservoir_size=64, iters=3, mode="dead"),
        DeadCodeRestart(threshold=0.5),
    ]
    return VectorQuantizer(
        dim,
        8,
        channel_first=channel_first,
        ema=EMAUpdate(decay=0.9) if mode == "ema" else None,
        maintenance=maintenance,
    )


@st.composite
def quantizer_inputs(draw):  # noqa: ANN001, ANN201
    dim = draw(st.sampled_from([1, 3, 4]))
    channel_first = draw(st.booleans())
    batch = draw(st.integers(0, 3))
    spatial = draw(st.lists(st.integers(1, 4), min_size=0 if not channel_first else 1, max_size=2))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([0.0, 1e-6, 1.0, 1e3, 1e5, 1e30]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "channels_last"]))
    mode = draw(st.sampled_from(["ema", "gradient"]))
    steps = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    return dim, channel_first, batch, spatial, dtype, scale, layout, mode, steps, seed


def _make_input(dim, channel_first, batch, spatial, dtype, scale, layout, seed):  # noqa: ANN001, ANN202
    g = torch.Generator().manual_seed(seed)
    shape = [batch, dim, *spatial] if channel_first else [batch, *spatial, dim]
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    x = x.to(dtype)  # 1e30 overflows to inf in fp16/bf16... and bf16 holds it: both are cases
    if layout == "transposed" and x.dim() >= 3:
        # the same values in a non-contiguous layout: swap two non-channel axes twice
        ax = (0, 2) if channel_first else (0, 1)
        x = x.transpose(*ax).contiguous().transpose(*ax)
    elif layout == "sliced":
        x = torch.cat([x, x], dim=0)[::2]  # every other row: a strided view
    elif layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@given(quantizer_inputs())
@FUZZ
def test_quantizer_over_shapes_dtypes_layouts_and_magnitudes(case):
    dim, channel_first, batch, spatial, dtype, scale, layout, mode, steps, seed = case
    vq = _quantizer(mode, dim, channel_first)
    x = _make_input(dim, channel_first, batch, spatial, dtype, scale, layout, seed)
    finite_in = bool(torch.isfinite(x).all())
    # sum of squares in fp64: above fp32's max (3.4e38) squared distances overflow in fp32
    sumsq = float(x.double().square().sum()) if finite_in else float("inf")
    for training in [True] * steps + [False]:
        vq.train(training)
        before = {k: v.clone() for k, v in vq.state_dict().items()}
        try:
            out = vq(x.requires_grad_(training and x.is_floating_point()))
        except NonFiniteError as e:
            # NaN/Inf, or values so large their squared distances overflow fp32
            msg = _one_line(e)
            assert ("non-finite" in msg) if not finite_in else ("too large" in msg), msg
            assert sumsq > 1e37, (sumsq, msg)  # refused only what cannot be quantized in fp32
            # nothing reached the codebook, statistics or reservoirs
            for k, v in vq.state_dict().items():
                assert torch.equal(v, before[k]), k
            return
        assert finite_in and sumsq < 3.5e38
        assert out.quantized.shape == x.shape and out.quantized.dtype == x.dtype
        lead = (x.shape[0], *x.shape[2:]) if channel_first else x.shape[:-1]
        assert out.indices.shape == lead
        assert out.indices.numel() == 0 or 0 <= int(out.indices.min()) <= int(out.indices.max()) < 8
        assert bool(torch.isfinite(out.quantized).all())
        assert bool(torch.isfinite(out.loss)), out.loss
        if training and out.loss.requires_grad:
            out.loss.backward()
        for k, v in vq.state_dict().items():
            if v.is_floating_point():
                assert bool(torch.isfinite(v).all()), k


# ------------------------------------------------------------------------------ image files
MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I", "F", "CMYK"]
FORMATS = {"PNG": ".png", "GIF": ".gif", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}


def _image_bytes(mode: str, size: tuple[int, int], fmt: str, frames: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    imgs = []
    for _ in range(frames):
        rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        if mode in ("I;16", "I", "F"):
            a = rng.integers(0, 65536, (h, w)).astype(np.uint16 if mode == "I;16" else np.int32)
            img = Image.fromarray(a.astype(np.float32) if mode == "F" else a, mode)
        else:
            img = rgb.convert(mode)
        imgs.append(img)
    buf = io.BytesIO()
    extra = {"save_all": True, "append_images": imgs[1:]} if frames > 1 else {}
    imgs[0].save(buf, fmt, **extra)
    return buf.getvalue()


@st.composite
def image_files(draw):  # noqa: ANN001, ANN201
    kind = draw(st.sampled_from(["image", "image", "image", "truncated", "random"]))
    ext = draw(st.sampled_from(sorted(FORMATS.values())))
    if kind == "random":
        return draw(st.binary(min_size=0, max_size=512)), ext, kind
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(MODES))
    size = draw(
        st.one_of(
            st.tuples(st.integers(1, 48), st.integers(1, 48)),
            st.sampled_from([(1, 1), (100_000, 10), (10, 100_000), (3, 2000)]),
        )
    )
    # the largest side each format can hold (GIF and BMP: 65,535; JPEG 65,500; WebP 16,383)
    cap = {"JPEG": 16_000, "WEBP": 16_000, "GIF": 65_000, "BMP": 65_000}.get(fmt, 10**6)
    size = (min(size[0], cap), min(size[1], cap))
    frames = draw(st.sampled_from([1, 1, 3])) if fmt in ("GIF", "WEBP", "PNG") else 1
    try:
        data = _image_bytes(mode, size, fmt, frames, draw(st.integers(0, 1000)))
    except (OSError, ValueError, KeyError, OverflowError):
        data = _image_bytes("RGB", size, fmt, frames, 0)  # a mode this format cannot hold
    if kind == "truncated":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    return data, FORMATS[fmt], kind


@given(image_files(), st.sampled_from([1, 8, 32]), st.sampled_from(["crop", "pad"]))
@FUZZ
def test_image_loader_over_random_truncated_and_odd_files(tmp_path_factory, file, size, square):
    data, ext, kind = file
    path = tmp_path_factory.mktemp("fuzz") / f"file{ext}"
    path.write_bytes(data)
    try:
        x = load_image(path, size, square=square)
    except UnreadableImageError as e:
        assert str(path) in _one_line(e)
        assert kind != "image", e  # a whole image file is always read, whatever its name says
        return
    assert kind != "random" or len(data) > 0
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    assert bool(torch.isfinite(x).all()) and -1.0 <= float(x.min()) <= float(x.max()) <= 1.0


def test_every_valid_image_kind_loads(tmp_path):
    """Not only refusals: every mode, format, 1x1, 100,000 x 10 and animated file that PIL can
    write is read (the property test above would also pass if everything were refused)."""
    loaded = 0
    for fmt, ext in FORMATS.items():
        for mode in MODES:
            for size, frames in [((1, 1), 1), ((100_000, 10), 1), ((9, 5), 3)]:
                try:
                    data = _image_bytes(mode, size, fmt, frames, 0)
                except (OSError, ValueError, KeyError, OverflowError):
                    continue  # a mode this format cannot hold
                path = tmp_path / f"{mode.replace(';', '_')}-{size[0]}-{frames}{ext}"
                path.write_bytes(data)
                for square in ("crop", "pad"):
                    x = load_image(path, 16, square=square)
                    assert x.shape == (3, 16, 16) and bool(torch.isfinite(x).all()), path
                loaded += 1
    assert loaded >= 60


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    import vqkit.data.images as images

    path = tmp_path / "bomb.png"
    Image.new("1", (12_000, 8_000)).save(path)  # 96 M pixels in a ~12 KB file
    assert path.stat().st_size < 100_000
    with pytest.raises(UnreadableImageError) as e:
        load_image(path, 32)
    msg = _one_line(e.value)
    assert "96,000,000 pixels is more than MAX_IMAGE_PIXELS (89,478,485" in msg, msg
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100_000_000)  # the user's explicit choice
    assert load_image(path, 8).shape == (3, 8, 8)


def test_folder_with_links_loops_specials_and_unreadable_files(tmp_path, monkeypatch):
    """Symlink loops, a dangling link, a FIFO and a folder with image names, an unreadable file
    and garbage: the good images are found, the readable-looking bad ones are skipped, counted
    and named, and nothing hangs (a FIFO opened for reading would block forever)."""
    import builtins

    from vqkit.data.images import find_images, scan_images

    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(root / f"good{i}.png")
    (root / "sub" / "up").symlink_to("..")  # a directory loop
    (root / "self.png").symlink_to("self.png")  # a link to itself
    (root / "dangling.png").symlink_to("nowhere.png")
    (root / "folder.png").mkdir()
    os.mkfifo(root / "pipe.png")
    (root / "garbage.jpg").write_bytes(os.urandom(300))
    locked = root / "locked.png"
    Image.new("RGB", (8, 8)).save(locked)
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads any file: make the permission error happen anyway
        real_open = builtins.open

        def open_(file, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if str(file) == str(locked):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
    found = find_images(root)
    assert {p.name for p in found} == {
        "good0.png",
        "good1.png",
        "good2.png",
        "garbage.jpg",
        "locked.png",
    }
    good, bad = scan_images(found)
    assert [p.name for p in good] == ["good0.png", "good1.png", "good2.png"]
    reasons = {p.name: r for p, r in bad}
    assert set(reasons) == {"garbage.jpg", "locked.png"}
    assert "Permission denied" in reasons["locked.png"]
    assert all("\n" not in r for r in reasons.values())

"""vqkit.models: shapes, ranges, token round trips, gradients and the errors users will hit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vqkit import VectorQuantizer
from vqkit.models import (
    AttnBlock,
    Decoder,
    Downsample,
    Encoder,
    ResBlock,
    ResNetVQModel,
    Upsample,
    VQModel,
    VQModelOutput,
    norm,
)

# The quickstart model recommended in benchmarks/bench_model_step.py and configs/quickstart.yaml.
QUICKSTART = {
    "resolution": 32,
    "base_channels": 32,
    "channel_mult": (1, 2, 2),
    "num_res_blocks": 1,
    "z_channels": 64,
}


def tiny(
    mult: tuple[int, ...] = (1, 2),
    resolution: int = 16,
    codebook_size: int = 32,
    dim: int = 8,
    **kwargs: object,
) -> ResNetVQModel:
    torch.manual_seed(0)
    vq = VectorQuantizer(dim, codebook_size, channel_first=True)
    args = {"base_channels": 8, "num_res_blocks": 1, "z_channels": 8, "norm_groups": 4}
    args.update(kwargs)
    return ResNetVQModel(vq, resolution=resolution, channel_mult=mult, **args)


# ----------------------------------------------------------------------------- blocks
def test_norm_picks_a_dividing_group_count() -> None:
    assert norm(64, "group", 32).num_groups == 32
    assert norm(48, "group", 32).num_groups == 24  # largest divisor <= 32
    assert norm(3, "group", 32).num_groups == 3
    assert norm(37, "group", 1).num_groups == 1
    assert isinstance(norm(37, "none"), nn.Identity)


def test_norm_errors_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="no group count in \\[2, 32\\] divides 37 channels"):
        norm(37, "group", 32)
    with pytest.raises(ValueError, match="norm must be one of .* got 'batch'"):
        norm(32, "batch")
    with pytest.raises(ValueError, match="norm_groups must be >= 1, got 0"):
        norm(32, "group", 0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_blocks_shapes_and_memory_format(channels_last: bool) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 16, 8, 6).contiguous(memory_format=fmt)
    blocks = [
        (ResBlock(16, 24, norm_groups=8), (2, 24, 8, 6)),
        (ResBlock(16, 16, norm_groups=8), (2, 16, 8, 6)),
        (AttnBlock(16, norm_groups=8), (2, 16, 8, 6)),
        (Downsample(16), (2, 16, 4, 3)),
        (Upsample(16), (2, 16, 16, 12)),
    ]
    for block, shape in blocks:
        block = block.to(memory_format=fmt)
        y = block(x)
        assert y.shape == shape
        assert torch.isfinite(y).all()
        if channels_last:  # no silent copy back to contiguous in the hot path
            assert y.is_contiguous(memory_format=torch.channels_last), type(block).__name__


def test_resblock_without_norm_starts_as_identity_plus_skip() -> None:
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(ResBlock(8, 8, norm_type="none")(x), x)


def test_attention_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    block = AttnBlock(8, norm_groups=4).eval()
    x = torch.randn(2, 8, 3, 5)
    h = block.norm(x)
    q, k, v = block.qkv(h).flatten(2).chunk(3, dim=1)  # (B, C, N) each
    attn = torch.softmax(q.transpose(1, 2) @ k / 8**0.5, dim=-1)  # (B, N, N)
    out = (v @ attn.transpose(1, 2)).view_as(x)
    torch.testing.assert_close(block(x), x + block.proj(out), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- encoder / decoder
@pytest.mark.parametrize(
    ("mult", "factor"), [((1, 2, 2), 4), ((1, 1, 2, 2), 8), ((1, 1, 2, 2, 4), 16)]
)
@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
def test_encoder_decoder_shapes(mult: tuple[int, ...], factor: int, size: tuple[int, int]) -> None:
    kw = {"base_channels": 8, "channel_mult": mult, "num_res_blocks": 1, "resolution": 32}
    enc = Encoder(z_channels=12, norm_groups=4, **kw)
    dec = Decoder(z_channels=12, norm_groups=4, **kw)
    assert enc.down_factor == dec.down_factor == factor
    x = torch.randn(2, 3, *size)
    z = enc(x)
    assert z.shape == (2, 12, size[0] // factor, size[1] // factor)
    y = dec(z)
    assert y.shape == x.shape
    assert y.abs().max() <= 1.0  # tanh range


def test_decoder_output_in_tanh_range_even_for_huge_latents() -> None:
    dec = Decoder(
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        resolution=16,
        z_channels=4,
        norm_type="none",
    )
    y = dec(1e4 * torch.randn(2, 4, 8, 8))
    assert y.min() >= -1.0 and y.max() <= 1.0
    assert (y.abs() > 0.99).any()  # it saturates rather than being clipped elsewhere


def test_attention_is_placed_at_the_requested_resolutions() -> None:
    def count(m: nn.Module) -> int:
        return sum(isinstance(b, AttnBlock) for b in m.modules())

    kw = {"base_channels": 8, "channel_mult": (1, 2, 2), "resolution": 32, "norm_groups": 4}
    # stages at 32, 16, 8 px; 2 res blocks each -> 2 attention blocks per listed resolution
    enc = Encoder(num_res_blocks=2, attn_resolutions=(8,), mid_attention=False, **kw)
    dec = Decoder(num_res_blocks=2, attn_resolutions=(8, 16), mid_attention=False, **kw)
    assert count(enc) == 2 and count(dec) == 4
    assert count(Encoder(num_res_blocks=1, **kw)) == 1  # the mid block's
    assert count(Encoder(num_res_blocks=1, mid_attention=False, **kw)) == 0
    # The encoder's attention blocks run on 8x8 maps (64 tokens).
    seen: list[tuple[int, ...]] = []
    for m in enc.modules():
        if isinstance(m, AttnBlock):
            m.register_forward_hook(lambda _m, inp, _out: seen.append(tuple(inp[0].shape[-2:])))
    enc(torch.randn(1, 3, 32, 32))
    assert seen == [(8, 8), (8, 8)]


def test_bad_shapes_are_rejected_with_the_value() -> None:
    with pytest.raises(ValueError, match="multiple of the down factor 16 .* got 40"):
        Encoder(channel_mult=(1, 1, 2, 2, 4), resolution=40)
    with pytest.raises(ValueError, match=r"attn_resolutions \[12\] never occur.*\[32, 16, 8\]"):
        Encoder(channel_mult=(1, 2, 2), resolution=32, attn_resolutions=(12,))
    with pytest.raises(ValueError, match="channel_mult must be a non-empty"):
        Decoder(channel_mult=())
    with pytest.raises(ValueError, match="num_res_blocks must be >= 1, got 0"):
        Encoder(num_res_blocks=0)
    enc = Encoder(
        base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, resolution=32, norm_groups=4
    )
    with pytest.raises(ValueError, match="H and W must be multiples of 4, got 30x32"):
        enc(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"expects \(B, 3, H, W\), got shape \(1, 1, 32, 32\)"):
        enc(torch.randn(1, 1, 32, 32))


# ----------------------------------------------------------------------------- VQModel
def test_forward_returns_named_fields() -> None:
    model = tiny()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    out = model(x)
    assert isinstance(out, VQModelOutput)
    assert out.reconstructions.shape == x.shape
    assert out.quantized.shape == (3, 8, 8, 8)
    assert out.indices.shape == (3, 8, 8) and out.indices.dtype == torch.long
    assert set(out.vq_losses) == {"commitment", "codebook"}
    torch.testing.assert_close(out.vq_loss, sum(out.vq_losses.values()))
    assert 1 <= int(out.used_codes) <= 32
    assert 1.0 <= float(out.perplexity) <= 32.0


@pytest.mark.parametrize(
    ("mult", "size", "grid"),
    [((1, 2), 16, (8, 8)), ((1, 2, 2), 32, (8, 8)), ((1, 1, 2, 2), 32, (4, 4))],
)
def test_encode_decode_round_trip_matches_forward(
    mult: tuple[int, ...], size: int, grid: tuple[int, int]
) -> None:
    model = tiny(mult, resolution=size).eval()
    x = torch.rand(2, 3, size, size) * 2 - 1
    assert model.token_grid(size) == grid
    indices = model.encode(x)
    assert indices.shape == (2, *grid)
    out = model(x)
    assert torch.equal(indices, out.indices)
    images = model.decode_indices(indices)
    assert images.shape == x.shape
    torch.testing.assert_close(images, out.reconstructions, rtol=1e-5, atol=1e-5)


def test_token_grid_and_its_errors() -> None:
    model = tiny((1, 2, 2), resolution=32)
    assert model.down_factor == 4
    assert model.token_grid((64, 32)) == (16, 8)
    with pytest.raises(ValueError, match="multiple of the down factor 4, got 30x30"):
        model.token_grid(30)
    with pytest.raises(ValueError, match=r"indices must be \(B, h, w\), got shape \(64,\)"):
        model.decode_indices(torch.zeros(64, dtype=torch.long))


def test_gradients_reach_the_encoder_through_the_straight_through_estimator() -> None:
    model = tiny().train()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    out = model(x)
    F.mse_loss(out.reconstructions, x).backward()  # reconstruction only: no commitment path
    for name, p in [
        ("encoder.conv_in", model.encoder.conv_in.weight),
        ("quant_conv", model.quant_conv.weight),
        ("post_quant_conv", model.post_quant_conv.weight),
        ("decoder.conv_out", model.decoder.conv_out.weight),
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # The reconstruction loss trains the encoder, never the codes (they follow the VQ loss).
    assert model.quantizer.codebook.grad is None


def test_channels_last_gives_the_same_outputs() -> None:
    model = tiny((1, 2, 2), resolution=32).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ref = model(x)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last))
    assert out.reconstructions.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.reconstructions, ref.reconstructions, rtol=1e-4, atol=1e-5)


def test_bfloat16_model_round_trip() -> None:
    model = tiny().to(torch.bfloat16).eval()
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).to(torch.bfloat16)
    out = model(x)
    assert out.reconstructions.dtype == torch.bfloat16
    assert model.decode_indices(model.encode(x)).dtype == torch.bfloat16


def test_norm_none_model_trains_a_step() -> None:
    model = tiny(norm_type="none")
    assert not any(isinstance(m, nn.GroupNorm) for m in model.modules())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    losses = []
    for _ in range(5):
        out = model(x)
        loss = F.mse_loss(out.reconstructions, x) + out.vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_quantizer_must_be_channel_first() -> None:
    enc = Encoder(
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        resolution=16,
        z_channels=8,
        norm_groups=4,
    )
    dec = Decoder(
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        resolution=16,
        z_channels=8,
        norm_groups=4,
    )
    with pytest.raises(ValueError, match="channel_first=True.*got channel_first=False"):
        VQModel(enc, dec, VectorQuantizer(8, 16, channel_first=False))
    with pytest.raises(TypeError, match="quantizer must be a VectorQuantizer, got Linear"):
        VQModel(enc, dec, nn.Linear(8, 8))  # type: ignore[arg-type]
    dec4 = Decoder(
        base_channels=8,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        resolution=16,
        z_channels=8,
        norm_groups=4,
    )
    with pytest.raises(ValueError, match="encoder down factor 2 != decoder up factor 4"):
        VQModel(enc, dec4, VectorQuantizer(8, 16, channel_first=True))


def test_quantizer_dim_differs_from_z_channels() -> None:
    torch.manual_seed(0)
    model = ResNetVQModel(
        VectorQuantizer(4, 16, channel_first=True),
        resolution=16,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        z_channels=12,
        norm_groups=4,
    )
    out = model(torch.rand(1, 3, 16, 16))
    assert out.quantized.shape == (1, 4, 8, 8)
    assert model.quant_conv.weight.shape == (4, 12, 1, 1)


def test_quickstart_config_size() -> None:
    model = ResNetVQModel(VectorQuantizer(64, 1024, channel_first=True), **QUICKSTART)
    n = sum(p.numel() for p in model.parameters())
    assert n == 845_187
    assert model.quantizer.codebook.numel() == 1024 * 64  # 65,536 of the parameters
    assert model.token_grid(32) == (8, 8)


def test_jsonargparse_builds_nested_modules() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=VQModel)
    cfg = parser.parse_object(
        {
            "model": {
                "class_path": "vqkit.models.ResNetVQModel",
                "init_args": {
                    **{k: list(v) if isinstance(v, tuple) else v for k, v in QUICKSTART.items()},
                    "quantizer": {
                        "class_path": "vqkit.VectorQuantizer",
                        "init_args": {"dim": 64, "codebook_size": 1024, "channel_first": True},
                    },
                },
            }
        }
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    model = instantiate(cfg).model
    assert isinstance(model, ResNetVQModel)
    assert model.token_grid(32) == (8, 8)
    bad = {"class_path": "vqkit.models.ResNetVQModel", "init_args": {"base_channel": 8}}
    with pytest.raises(jsonargparse.ArgumentError, match="base_channel"):
        parser.parse_object({"model": bad})


def test_resnet_defaults_are_the_seed_plan_256px_model() -> None:
    # the docstring's promise: 256 px -> 16x16 tokens (the defaults once gave down factor 8)
    model = ResNetVQModel(VectorQuantizer(256, 1024, channel_first=True))
    assert model.token_grid(256) == (16, 16)
    assert model.encoder.down_factor == 16

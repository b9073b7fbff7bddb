import math

import pytest
import torch
import torch.nn.functional as F

from vqkit import EMAUpdate, VectorQuantizer, reset_optimizer_state
from vqkit.quantize.distance import nearest


def _brute_nearest(x, c):
    return torch.cdist(x.double(), c.double()).argmin(1)


@pytest.mark.parametrize(
    "shape,channel_first,lead",
    [
        ((2, 8, 4, 5), True, (2, 4, 5)),
        ((3, 8, 7), True, (3, 7)),
        ((2, 6, 8), False, (2, 6)),
        ((50, 8), False, (50,)),
    ],
)
def test_layouts_shapes_and_values(shape, channel_first, lead):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 16, channel_first=channel_first).eval()
    x = torch.randn(shape)
    out = vq(x)
    assert out.quantized.shape == x.shape
    assert out.indices.shape == lead
    flat = x.movedim(1, -1).reshape(-1, 8) if channel_first else x.reshape(-1, 8)
    ref = _brute_nearest(flat, vq.codebook.detach())
    assert torch.equal(out.indices.reshape(-1), ref)
    q = (
        out.quantized.movedim(1, -1).reshape(-1, 8)
        if channel_first
        else out.quantized.reshape(-1, 8)
    )
    torch.testing.assert_close(q, vq.codebook.detach()[ref])


def test_straight_through_and_losses_gradient_mode():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 8, commitment_weight=0.25, codebook_weight=1.0).train()
    x = torch.randn(32, 4, requires_grad=True)
    out = vq(x)
    q = vq.codebook.detach()[out.indices]
    mse = F.mse_loss(x.detach(), q).item()
    assert out.losses["commitment"].item() == pytest.approx(0.25 * mse, rel=1e-5)
    assert out.losses["codebook"].item() == pytest.approx(mse, rel=1e-5)
    assert out.loss.item() == pytest.approx(1.25 * mse, rel=1e-5)
    # Straight-through: d(sum(quantized * w))/dx == w, plus the commitment term's gradient.
    w = torch.randn(32, 4)
    (out.quantized * w).sum().backward()
    torch.testing.assert_close(x.grad, w)
    # Codebook loss moves exactly the used rows.
    vq.codebook.grad = None
    x2 = torch.randn(32, 4)
    out2 = vq(x2)
    out2.loss.backward()
    used = torch.zeros(8, dtype=torch.bool)
    used[out2.indices.unique()] = True
    assert (vq.codebook.grad[~used] == 0).all()
    assert (vq.codebook.grad[used].abs().sum(1) > 0).all()


def test_ema_update_matches_hand_computation():
    torch.manual_seed(0)
    k, d, decay, eps = 4, 3, 0.9, 1e-5
    vq = VectorQuantizer(d, k, ema=EMAUpdate(decay=decay, eps=eps)).train()
    c0 = vq.codebook.clone()
    x = torch.randn(20, d)
    idx = _brute_nearest(x, c0)
    out = vq(x)
    assert torch.equal(out.indices, idx)
    counts = torch.bincount(idx, minlength=k).float()
    sums = torch.zeros(k, d).index_add_(0, idx, x)
    cs = decay * torch.ones(k) + (1 - decay) * counts
    es = decay * c0 + (1 - decay) * sums
    n = cs.sum()
    smoothed = (cs + eps) / (n + k * eps) * n
    torch.testing.assert_close(vq.codebook, es / smoothed[:, None])
    torch.testing.assert_close(vq.ema.cluster_size, cs)
    assert "codebook" not in out.losses
    assert not any(p is vq.codebook for p in vq.parameters())


def test_distances_fp32_under_autocast_and_chunking():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 64, max_block=64 * 7).eval()  # 7-row chunks
    x = torch.randn(100, 16)
    ref = _brute_nearest(x, vq.codebook.detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(x.bfloat16())
    assert torch.equal(out.indices, _brute_nearest(x.bfloat16().float(), vq.codebook.detach()))
    assert out.quantized.dtype == torch.bfloat16
    idx, dist = nearest(x, vq.codebook.detach(), chunk_size=3)
    assert torch.equal(idx, ref)
    brute = torch.cdist(x, vq.codebook.detach()).min(1).values ** 2
    torch.testing.assert_close(dist, brute, rtol=1e-4, atol=1e-4)


def test_cosine_mode_and_low_dim_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 16, codebook_dim=8, distance="cosine").eval()
    x = torch.randn(10, 32)
    out = vq(x)
    assert out.quantized.shape == (10, 32)
    z = F.normalize(vq.project_in(x), dim=1)
    c = F.normalize(vq.codebook.detach(), dim=1)
    assert torch.equal(out.indices, (z @ c.t()).argmax(1))
    torch.testing.assert_close(out.quantized, vq.project_out(c[out.indices]))
    with pytest.raises(ValueError, match="codebook_dim must be in"):
        VectorQuantizer(8, 16, codebook_dim=9)


def test_sampling_temperature_training_only():
    torch.manual_seed(0)
    vq = VectorQuantizer(2, 3, sample_temperature=1.0)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]))
    x = torch.zeros(20000, 2)
    freq = torch.bincount(vq.train()(x).indices, minlength=3).float() / 20000
    expected = torch.softmax(-torch.tensor([0.0, 1.0, 4.0]), 0)
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)
    assert (vq.eval()(x).indices == 0).all()


def test_encode_decode_roundtrip_and_eval_usage():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 32, channel_first=True).eval()
    x = torch.randn(2, 8, 3, 3)
    idx = vq.encode(x)
    assert idx.shape == (2, 3, 3)
    torch.testing.assert_close(vq.decode(idx), vq(x).quantized)
    # eval forwards count into the eval horizon only, and never advance the step counter
    assert vq.usage.eval_counts.sum() == 18 and vq.usage.window_counts.sum() == 0
    assert vq.current_step == 0
    with pytest.raises(ValueError, match=r"indices must be in \[0, 32\)"):
        vq.decode(torch.tensor([[[32]]]))


def test_step_counter_state_dict_roundtrip():
    vq = VectorQuantizer(4, 8).train()
    for _ in range(3):
        vq(torch.randn(5, 4))
    assert vq.current_step == 3 and int(vq.step) == 3
    other = VectorQuantizer(4, 8)
    assert other.current_step == 0
    other.load_state_dict(vq.state_dict())
    assert other.current_step == 3
    other.train()(torch.randn(5, 4))
    assert other.current_step == 4 and int(other.step) == 4


def test_nan_input_raises_and_leaves_codebook_untouched():
    vq = VectorQuantizer(4, 8, ema=EMAUpdate()).train()
    before = vq.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    x = torch.randn(10, 4)
    x[0, 0] = float("nan")
    x[3, 2] = float("inf")
    with pytest.raises(ValueError, match="2 non-finite values"):
        vq(x)
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=4, codebook_size=1), "codebook_size must be >= 2, got 1"),
        (dict(dim=0, codebook_size=8), "dim must be >= 1, got 0"),
        (dict(dim=4, codebook_size=8, distance="dot"), "distance must be 'l2' or 'cosine'"),
        (dict(dim=4, codebook_size=8, sample_temperature=-1), "sample_temperature must be >= 0"),
        (dict(dim=4, codebook_size=8, commitment_weight=-1), "loss weights must be >= 0"),
    ],
)
def test_construction_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VectorQuantizer(**kwargs)


def test_shape_errors_name_the_problem():
    vq = VectorQuantizer(4, 8)
    with pytest.raises(ValueError, match="has 5 channels in the last dim, quantizer dim is 4"):
        vq(torch.randn(3, 5))
    vq_cf = VectorQuantizer(4, 8, channel_first=True)
    with pytest.raises(ValueError, match="has 3 channels at dim 1"):
        vq_cf(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"expects \(B, D, \*spatial\)"):
        vq_cf(torch.randn(2, 4))


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_reset_optimizer_state_adam(opt_cls):
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 8).train()
    opt = opt_cls(vq.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        vq(torch.randn(64, 4)).loss.backward()
        opt.step()
    state = opt.state[vq.codebook]
    mask = torch.zeros(8, dtype=torch.bool)
    mask[[1, 5]] = True
    v_keep_mean = state["exp_avg_sq"][~mask].mean(0)
    vq.replace_codes(mask, torch.randn(2, 4), torch.ones(2))
    assert vq.replaced_mask.sum() == 2
    assert reset_optimizer_state(opt, vq) == 2
    assert (state["exp_avg"][mask] == 0).all()
    torch.testing.assert_close(state["exp_avg_sq"][mask], v_keep_mean.expand(2, 4))
    assert vq.replaced_mask.sum() == 0
    assert reset_optimizer_state(opt, vq) == 0
    # The next step moves a reset row by about lr, not by lr / sqrt(1 - beta2) as stale rows do.
    before = vq.codebook.detach().clone()
    opt.zero_grad()
    vq.codebook.grad = torch.zeros_like(vq.codebook)
    vq.codebook.grad[mask] = 1.0
    opt.step()
    step = (vq.codebook.detach() - before)[mask].abs()
    assert step.max() < 1e-2 * 1.5


def test_batch_usage_in_output():
    vq = VectorQuantizer(2, 4).eval()
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0], [10, 0], [0, 10], [10, 10]]))
    x = torch.tensor([[0.0, 0], [0, 0.1], [10, 0], [9.9, 0]])
    out = vq(x)
    assert int(out.used_codes) == 2
    assert float(out.perplexity) == pytest.approx(2.0)
    assert math.isclose(vq.usage.stats("eval").utilization, 0.5)


def test_commitment_warmup_ramps_from_when_quantization_begins():
    """Seed 002's commitment warm-up: beta ramps linearly over the first quantized steps (after
    the k-means warm-up, not from step 0), and evaluation always uses the full weight."""
    from vqkit import KMeansInit

    torch.manual_seed(0)
    vq = VectorQuantizer(
        2,
        4,
        commitment_weight=0.4,
        commitment_warmup_steps=4,
        maintenance=[KMeansInit(warmup_steps=2, reservoir_size=64)],
    ).train()
    scales = []
    for _ in range(7):
        x = torch.randn(32, 2)
        out = vq(x)
        if out.passthrough:
            assert "commitment" not in out.losses
            scales.append(None)
            continue
        mse = F.mse_loss(x, vq.codebook.detach()[out.indices])
        scales.append(round(out.losses["commitment"].item() / (0.4 * mse.item()), 4))
    assert scales == [None, None, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert int(vq.quantized_steps) == 5
    vq.eval()
    assert vq.commitment_scale() == 1.0
    # a checkpoint from before the counter loads, its warm-up taken as over
    state = vq.state_dict()
    del state["quantized_steps"]
    again = VectorQuantizer(2, 4, commitment_warmup_steps=4, maintenance=[KMeansInit(2, 64)])
    again.load_state_dict(state)
    assert int(again.quantized_steps) == int(vq.step) == 7
    with pytest.raises(ValueError, match="commitment_warmup_steps must be >= 0"):
        VectorQuantizer(2, 4, commitment_warmup_steps=-1)

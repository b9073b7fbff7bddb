import math

import pytest
import torch

from vqkit import EntropyPenalty, VectorQuantizer


def test_entropy_penalty_hand_computation():
    vq = VectorQuantizer(1, 2, regularizers=[EntropyPenalty(weight=1.0, temperature=1.0)])
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0], [1.0]]))
    z = torch.tensor([[0.0], [1.0]])
    # d = [[0, 1], [1, 0]] -> p rows softmax([0,-1]) and softmax([-1,0])
    a = 1 / (1 + math.exp(-1))
    h_tok = -(a * math.log(a) + (1 - a) * math.log(1 - a))
    h_avg = math.log(2)
    val = vq.regularizers[0](vq, z)
    assert val.item() == pytest.approx(h_tok - h_avg, rel=1e-5)


def _train_collapsed_codebook(regularizers) -> int:
    """Codes used after training a codebook that starts collapsed: one code at the data, seven
    far away (unused, so the codebook loss never moves them)."""
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 8, regularizers=regularizers).train()
    with torch.no_grad():
        vq.codebook.copy_(torch.full((8, 4), 4.0))
        vq.codebook[0] = 0.0
    opt = torch.optim.Adam(vq.parameters(), lr=0.05)
    for _ in range(150):
        out = vq(torch.randn(128, 4))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    vq.eval()
    return int((vq(torch.randn(4096, 4)).indices.bincount(minlength=8) > 0).sum())


def test_entropy_penalty_in_losses_and_spreads_codes():
    torch.manual_seed(0)
    reg = EntropyPenalty(weight=0.5, temperature=0.5)
    vq = VectorQuantizer(4, 8, regularizers=[reg]).train()
    out = vq(torch.randn(64, 4))
    assert set(out.losses) == {"commitment", "codebook", "entropy"}
    terms = [v.item() for v in out.losses.values()]
    # fp32 sum of terms that partly cancel (entropy < 0): tolerance scaled by the terms' size
    assert out.loss.item() == pytest.approx(sum(terms), rel=1e-6, abs=1e-6 * sum(map(abs, terms)))
    out.loss.backward()
    assert vq.codebook.grad is not None
    # ... and it spreads: without it the collapsed codebook stays at one code
    assert _train_collapsed_codebook([]) == 1
    assert _train_collapsed_codebook([EntropyPenalty(weight=1.0, temperature=8.0)]) >= 6


def test_entropy_penalty_errors():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        EntropyPenalty(temperature=0)

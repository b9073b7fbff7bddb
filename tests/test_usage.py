import math

import pytest
import torch

from vqkit import VectorQuantizer, usage_stats
from vqkit.quantize.usage import CodeUsage


def test_usage_stats_hand_built():
    counts = torch.tensor([4, 4, 0, 0, 8, 0, 0, 0])
    s = usage_stats(counts, dead_below=1)
    assert s.codebook_size == 8 and s.tokens == 16 and s.used_codes == 3
    assert s.utilization == pytest.approx(3 / 8)
    h = -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))
    assert s.perplexity == pytest.approx(math.exp(h))
    assert s.normalized_entropy == pytest.approx(h / math.log(8))
    assert s.dead_codes == 5
    assert usage_stats(counts, dead_below=5).dead_codes == 7


def test_uniform_and_empty():
    s = usage_stats(torch.ones(16, dtype=torch.long))
    assert (
        s.utilization == 1.0
        and s.perplexity == pytest.approx(16)
        and s.normalized_entropy == pytest.approx(1.0)
    )
    e = usage_stats(torch.zeros(16, dtype=torch.long))
    assert e.used_codes == 0 and e.perplexity == 1.0 and e.dead_codes == 16
    with pytest.raises(ValueError, match="counts must be 1-D"):
        usage_stats(torch.ones(2, 2))


def test_horizons_are_separate_and_named():
    u = CodeUsage(4, ema_decay=0.5, window_steps=2)
    u.update_train(torch.tensor([2, 0, 0, 0]))
    u.update_train(torch.tensor([0, 2, 0, 0]))
    assert u.stats("batch").used_codes == 1
    assert u.stats("window").used_codes == 2
    torch.testing.assert_close(u.ema_counts, torch.tensor([1.0, 1.0, 0, 0]))
    u.update_train(torch.tensor([0, 0, 2, 0]))  # window_steps=2 -> a new window starts
    assert u.stats("window").used_codes == 1
    u.update_eval(torch.tensor([1, 1, 1, 1]))
    assert u.stats("eval").utilization == 1.0
    ema = u.ema_stats(threshold=0.4)
    assert not hasattr(ema, "utilization")
    assert ema.codes_above_threshold == 3
    with pytest.raises(ValueError, match="horizon must be one of"):
        u.stats("epoch")


def test_collapse_is_visible_in_batch_figures_not_hidden_by_ema():
    # Seed 002's failure: EMA counts say every code is "active" while each batch uses 2 codes.
    torch.manual_seed(0)
    vq = VectorQuantizer(2, 64).train()
    vq.usage.ema_counts.fill_(10.0)  # cumulative history from an earlier, healthy phase
    vq.usage.ema_started.fill_(True)
    x = torch.zeros(256, 2)
    x[128:] = 5.0
    vq(x)
    assert vq.usage.stats("batch").used_codes <= 2
    assert vq.usage.ema_stats(threshold=1).codes_above_threshold == 64


def test_warmup_counts_nothing_and_restarts_keep_the_window():
    """Warm-up assignments are used by nothing: no horizon counts them. A code replacement zeroes
    that code's window count but the window goes on (frequent restarts used to reset it)."""
    from vqkit import DeadCodeRestart, KMeansInit, VectorQuantizer

    torch.manual_seed(0)
    vq = VectorQuantizer(
        4,
        16,
        maintenance=[KMeansInit(warmup_steps=3, reservoir_size=64), DeadCodeRestart(threshold=5)],
    ).train()
    for _ in range(3):
        out = vq(torch.randn(32, 4))
        assert out.passthrough
    u = vq.usage
    assert int(u.window_forwards) == 0 and int(u.window_counts.sum()) == 0
    assert not bool(u.ema_started)
    restarted = 0
    for i in range(4):
        out = vq(torch.randn(32, 4))
        assert not out.passthrough
        restarted += sum(e.codes_replaced for e in vq.pop_events() if "restart" in e.strategy)
        assert int(u.window_forwards) == i + 1  # the restarts did not reset it
    assert restarted > 0  # threshold 5 with 32 tokens over 16 codes: restarts every step
    assert int(u.window_counts.sum()) <= 4 * 32

"""The utilization study script (issue 6): every row builds and trains a step, the peer adapter
is counted by vqkit's CodeUsage, seed 002's low-usage reset resets its share, and ``--quick``
writes a complete JSON / markdown / PNG set that a rerun resumes instead of retraining."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import utilization_study as U  # noqa: E402
from benchmarks.utilization.report import (  # noqa: E402
    IMG_REL,
    JSON_REL,
    MD_REL,
    findings,
    uniform_ceiling,
)
from benchmarks.utilization.rows import (  # noqa: E402
    CONFIG,
    ROWS,
    Ctx,
    build_model,
    build_quantizer,
    load_quickstart,
)
from benchmarks.utilization.runner import evaluate  # noqa: E402

from vqkit.quantize import DeadCodeRestart, EMAUpdate, KMeansInit, KMeansReestimate  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _need_peer() -> None:
    pytest.importorskip(
        "vector_quantize_pytorch", reason="row 10 needs the bench extra: pip install -e .[bench]"
    )


@pytest.fixture(scope="module")
def quickstart() -> dict:
    return load_quickstart()


def _ctx(quickstart: dict, k: int = 1024, scale: float = 0.01) -> Ctx:
    return Ctx(
        dim=quickstart["quantizer"]["init_args"]["dim"],
        codebook_size=k,
        scale=scale,
        epoch_steps=2,
        quickstart=quickstart,
    )


@pytest.mark.parametrize("name", list(ROWS))
def test_row_builds_trains_and_evaluates(name: str, quickstart: dict) -> None:
    if name == "peer":
        _need_peer()
    # K=64 and schedules scaled to (warm-up 1, every 2) so k-means init and re-estimation run
    torch.manual_seed(0)
    q = build_quantizer(name, _ctx(quickstart, k=64))
    assert q.codebook_size == 64
    model = build_model(q, quickstart, seed=0)
    assert model.quantizer is q
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(3):  # past the scaled warm-up (1 step) so every row quantizes
        out = model(x)
        loss = (out.reconstructions - x).abs().mean() + out.vq_loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert out.indices.shape == (4, 8, 8)
    ev = evaluate(model, x, q.codebook_size)
    assert ev["tokens"] == 4 * 64
    assert sum(ev["counts"]) == 256 and len(ev["counts"]) == 64
    assert 0 < ev["utilization"] <= 1
    assert ev["used_codes"] == sum(c > 0 for c in ev["counts"])
    assert ev["psnr"] > 0 and math.isfinite(ev["ssim"])


def test_encoder_weights_do_not_depend_on_the_row(quickstart: dict) -> None:
    _need_peer()
    a = build_model(build_quantizer("plain", _ctx(quickstart)), quickstart, seed=3)
    b = build_model(build_quantizer("peer", _ctx(quickstart)), quickstart, seed=3)
    c = build_model(build_quantizer("default", _ctx(quickstart)), quickstart, seed=4)
    wa, wb, wc = (m.encoder.conv_in.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_peer_adapter_is_counted_by_code_usage(quickstart: dict) -> None:
    _need_peer()
    q = build_quantizer("peer", _ctx(quickstart, k=64))
    assert q.uses_ema and not q.replaced_mask.any()
    assert not any(p.requires_grad for p in q.vq._codebook.parameters())
    x = torch.randn(3, 64, 8, 8)
    q.train()
    out = q(x)  # the peer's k-means init runs on this first training batch
    counts = torch.bincount(out.indices.reshape(-1), minlength=64)
    assert torch.equal(q.usage.batch_counts, counts)
    assert int(out.used_codes) == int((counts > 0).sum())
    q.eval()
    out = q(x)
    counts = torch.bincount(out.indices.reshape(-1), minlength=64)
    assert torch.equal(q.usage.eval_counts, counts) and int(counts.sum()) == 3 * 64
    # encode (nearest code) agrees with the peer's own eval assignment; decode inverts it
    assert torch.equal(q.encode(x), out.indices)
    assert torch.allclose(q.decode(out.indices), out.quantized, atol=1e-5)


def test_default_row_is_the_quickstart_quantizer(quickstart: dict) -> None:
    cfg = yaml.safe_load(CONFIG.read_text())
    qargs = cfg["model"]["model"]["init_args"]["quantizer"]["init_args"]
    q = build_quantizer("default", _ctx(quickstart, scale=1.0))
    assert q.codebook_size == qargs["codebook_size"] and q.dim == qargs["dim"]
    assert isinstance(q.ema, EMAUpdate) and q.ema.decay == qargs["ema"]["init_args"]["decay"]
    want = [m["class_path"].rsplit(".", 1)[-1] for m in qargs["maintenance"]]
    assert [type(m).__name__ for m in q.maintenance] == want
    for m, spec in zip(q.maintenance, qargs["maintenance"], strict=True):
        for key, value in spec.get("init_args", {}).items():
            assert getattr(m, key) == value, (type(m).__name__, key)
    # rows 4-6 take the default's schedule; 5 and 6 differ only in the mode
    full = build_quantizer("vqfr_full", _ctx(quickstart, scale=1.0)).maintenance
    dead = build_quantizer("vqkit_dead", _ctx(quickstart, scale=1.0)).maintenance
    assert isinstance(full[0], KMeansInit) and full[0].warmup_steps == q.maintenance[0].warmup_steps
    assert isinstance(full[1], KMeansReestimate) and (full[1].mode, dead[1].mode) == (
        "full",
        "dead",
    )
    assert full[1].every == dead[1].every == q.maintenance[1].every
    restart = build_quantizer("ema_restart", _ctx(quickstart)).maintenance[0]
    assert isinstance(restart, DeadCodeRestart) and restart.threshold == 2.0


def test_large_k_rows_grow_the_reservoirs_and_write_their_own_pages(quickstart: dict) -> None:
    """At K beyond half the quickstart's 16,384-vector reservoir, the default's and VQFR's
    reservoirs grow to 2K (k-means needs more vectors than codes); the avatar study writes
    large_k_study.json / .md beside the emoji study's."""
    from benchmarks.utilization.report import paths_for

    for k, want in ((8192, 16384), (16384, 32768)):
        for name in ("default", "vqfr_full"):
            q = build_quantizer(name, _ctx(quickstart, k=k, scale=1.0))
            kmeans = (KMeansInit, KMeansReestimate)
            sizes = [m.reservoir_size for m in q.maintenance if isinstance(m, kmeans)]
            assert sizes and set(sizes) == {want}, (name, k, sizes)
    assert paths_for("emoji") == (JSON_REL, MD_REL)
    assert [p.name for p in paths_for("avatars")] == ["large_k_study.json", "large_k_study.md"]
    with pytest.raises(SystemExit):
        U.parse_args(["--train-images", "10"])  # the emoji study has its own split


def test_low_usage_reset_replaces_its_share(quickstart: dict) -> None:
    q = build_quantizer("seed002", _ctx(quickstart, k=100))  # resets every 2 steps
    assert q.sample_temperature == 2.5 and q.ema.decay == 0.7
    assert q.regularizers[0].weight == 2.0
    q.train()
    q(torch.randn(2, 64, 4, 4))
    assert int(q.num_replacements) == 0
    q(torch.randn(2, 64, 4, 4))
    assert int(q.num_replacements) == 1 and int(q.replaced_mask.sum()) == 30


@pytest.mark.slow
def test_quick_study_writes_json_markdown_and_pngs(tmp_path: Path) -> None:
    _need_peer()
    result = U.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / JSON_REL).read_text())
    assert data["settings"]["quick"] and data["machine"]["cpu_cores"] >= 1
    assert "--quick" in data["command"]
    runs = {r["row"]: r for r in data["runs"]}
    assert set(runs) == set(U.QUICK_ROWS)
    for name, r in runs.items():
        assert 0 < r["utilization"] <= 1, name
        assert r["used_codes"] == round(r["utilization"] * 1024), name
        assert 1 <= r["perplexity"] <= r["used_codes"] + 1e-6, name
        assert 0 <= r["normalized_entropy"] <= 1, name
        assert r["dead_codes"] == 1024 - r["used_codes"], name
        assert r["psnr"] > 0 and 0 < r["l1"] < 2 and -1 <= r["ssim"] <= 1, name
        assert r["train_seconds"] > 0, name
        assert [p["step"] for p in r["curve"]][-1] == r["steps"] == 30
        assert all(0 < p["utilization"] <= 1 for p in r["curve"])
    md = (tmp_path / MD_REL).read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and "`" in line]
    for name in U.QUICK_ROWS:
        assert sum(f"(`{name}`)" in line for line in table) == 1, name
    assert "targets" in md and ("met" in md or "MISSED" in md)
    pngs = sorted((tmp_path / IMG_REL).glob("*.png"))
    assert len(pngs) == 2
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000
        assert f"images/{p.name}" in md
    # a rerun resumes: nothing is trained again and the stored figures are kept
    again = U.main(["--quick", "--out", str(tmp_path)])
    assert [r["train_seconds"] for r in again["runs"]] == [
        r["train_seconds"] for r in result["runs"]
    ]


def test_uniform_ceiling_and_its_finding() -> None:
    # 1 - (1 - 1/K)^N against a simulation of N uniform draws from K codes
    torch.manual_seed(0)
    k, n = 8192, 21696
    hits = [torch.randint(k, (n,)).unique().numel() / k for _ in range(20)]
    assert abs(uniform_ceiling(k, n) - sum(hits) / len(hits)) < 0.002
    assert abs(uniform_ceiling(k, n) - (1 - math.exp(-n / k))) < 1e-4
    assert uniform_ceiling(1024, n) > 0.999999
    row = {
        "utilization": 0.6,
        "normalized_entropy": 0.9,
        "psnr": 20.0,
        "ssim": 0.8,
        "used_codes": 0.6 * k,
        "train_seconds": 10.0,
        "per_seed": {"utilization": [0.6]},
    }
    paras = findings(str(k), {"default": row}, tokens=n)
    assert paras[0].startswith("**Ceiling.**") and "92.9%" in paras[0] and "0.65 of" in paras[0]
    assert "set for K=1024" in next(p for p in paras if "issue 6's targets" in p)
    # at K=1024 the split is large enough: no ceiling paragraph
    assert not any(p.startswith("**Ceiling.**") for p in findings("1024", {"default": row}, n))

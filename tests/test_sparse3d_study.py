"""`benchmarks/sparse3d_study.py --quick`: every row of the sparse 3D comparison runs end to
end on a few small shapes (the full study's figures are in BENCHMARKS.md and docs/sparse3d.md)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_study_runs_every_row(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("VQKIT_DATA", str(tmp_path / "cache"))
    from benchmarks import sparse3d_study as study

    assert study.main(["--quick", "--held-out", "--work", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    result = study.json.loads(out[: out.rindex("}") + 1])
    runs = {r["row"]: r for r in result["runs"]}
    assert list(runs) == list(study.ROWS)
    for r in runs.values():
        assert r["steps"] == 12 and r["val_tokens"] > 0
        assert 0 < r["utilization"] <= 1 and math.isfinite(r["sdf_l1"])
        assert 0 <= r["iou"] <= 1
    # the maintenance happened where a row claims it: scikit-learn's k-means ran in the seed's
    # row, vqkit's k-means in vqkit's rows, none in the bare row
    assert runs["none"]["kmeans_calls"] == 0
    assert runs["seed-001 (scikit-learn)"]["kmeans_calls"] >= 1
    assert runs["seed-001 (scikit-learn)"]["kmeans_seconds"] > 0
    assert runs["seed-001 config on vqkit"]["kmeans_calls"] >= 2  # init + re-estimation
    assert runs["vqkit default"]["kmeans_calls"] >= 2
    assert "| vqkit default |" in out
    assert study.uniform_ceiling(8192, 139_000) > 0.9999
    assert abs(study.uniform_ceiling(1024, 1024) - (1 - (1 - 1 / 1024) ** 1024)) < 1e-12


def test_vqfr_reference_replaces_the_whole_codebook_from_its_reservoir():
    """The seed's quantizer as written: the reservoir fills, then scikit-learn's k-means
    replaces every code at a multiple of kmeans_interval, and the reservoir empties."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(ROOT))
    import torch
    from benchmarks.sparse3d.vqfr import VQFRQuantizer

    torch.manual_seed(0)
    vq = VQFRQuantizer(4, 16, kmeans_interval=2, reservoir_size=64)
    vq.train()
    before = vq.codebook.detach().clone()
    vq(torch.randn(8, 4))  # step 0: 8 < 16 vectors, skipped (the seed's log line)
    assert vq.kmeans_skips == 1 and vq.kmeans_calls == 0
    vq(torch.randn(100, 4))  # step 1: fills the reservoir past 64 (the per-token loop)
    out = vq(torch.randn(50, 4))  # step 2: k-means of 64 vectors -> 16 codes
    assert vq.kmeans_calls == 1 and vq.reservoir.i == 0
    assert (vq.codebook.detach() - before).abs().min() > 0  # every code replaced
    assert out.quantized.shape == (50, 4) and set(out.losses) == {"commitment", "codebook"}

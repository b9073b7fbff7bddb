import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # The CI machine has 2 cores; keep intra-op threads fixed so results do not depend on load.
    torch.set_num_threads(2)
    yield


@pytest.fixture(autouse=True)
def _vqkit_logs_propagate():
    logging.getLogger("vqkit").setLevel(logging.INFO)
    yield


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # No test may download: LPIPS weights and Hub folders come from the cache or fail with the
    # manual route (tests/test_download.py serves its own files on 127.0.0.1 and unsets this).
    monkeypatch.setenv("VQKIT_OFFLINE", "1")
    yield

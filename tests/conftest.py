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

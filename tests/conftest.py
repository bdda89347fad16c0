"""Shared test settings: small thread pools (2-core machine), deterministic seeds."""


import pytest
import torch

torch.set_num_threads(1)  # a shared 2-core box: more threads than free cores stalls


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread for every test, restored afterwards: code under test may raise it
    (``opera.bench.make_step(threads=2)``, a pretraining run's ``torch.set_num_threads``), and 2
    OpenMP threads on the shared 2-core machine can stall for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

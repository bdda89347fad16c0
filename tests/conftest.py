"""Shared test settings: small thread pools (2-core machine), deterministic seeds."""

import os

import pytest
import torch

torch.set_num_threads(1)  # a shared 2-core box: more threads than free cores stalls


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

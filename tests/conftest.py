"""Fixtures for every test module."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models on one thread, module fixtures included: on a loaded 2-core machine a second OpenMP
    thread turns every small op into a wait for a core. Tests that start worker processes set it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

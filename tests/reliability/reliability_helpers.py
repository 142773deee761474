"""Shared by the reliability tests: `one_torch_thread`, autouse in every module that imports it.

These tests run tiny models only. On a loaded runner, OpenMP threads spinning while they wait for each other made
their forwards 10-20x slower than one thread (measured on a shared 2-core machine). Set per test and restored
after, so the rest of the suite keeps its setting.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

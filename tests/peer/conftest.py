"""Peer tests run on tiny tensors: one intra-op thread per test.

After an autograd backward, torch's CPU ``_fused_adamw_`` kernel (leantrain AdamW's default
path for fp32 tensors) takes ~7 ms per call with two OpenMP threads against ~0.1 ms with one,
which alone would make these tests several times slower. The thread count is restored after
each test, so the rest of the suite keeps tests/conftest.py's setting.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

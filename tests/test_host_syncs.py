"""Host synchronisations (``.item()``, ``bool()`` of a tensor), counted through the dispatcher, which
sees them on any device: fused backward makes none, and no step() call does either — the one sync
per update is the trainer reading the non-finite counts (``handle.nonfinite_grads``). A host sync
per parameter stalls a GPU's backward (docs/design.md §3)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from tiny_models import tiny_gpt2, token_batches
from torch.utils._python_dispatch import TorchDispatchMode

from leantrain import optim

SYNCS = {"aten._local_scalar_dense", "aten.item", "aten.equal", "aten.is_nonzero"}


class _Syncs(TorchDispatchMode):
    """Counts the aten calls that copy a device value to the host."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNCS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make", [
    lambda p: optim.AdamW(p, lr=1e-3, accum_steps=4),
    lambda p: optim.AdaFactor(p, lr=1e-3, relative_step=False, beta1=0.9, momentum_on="grad", accum_steps=4),
    lambda p: optim.AdaFactor(p, accum_steps=4),
    lambda p: optim.SGD(p, lr=0.1, momentum=0.9, accum_steps=4, max_update_rms=1.0),
], ids=["adamw", "adafactor_grad_momentum", "adafactor_relative_buffered", "sgd_clipped"])
def test_fused_backward_and_step_make_no_host_sync(make):
    model = tiny_gpt2()
    opt = make(model.parameters())
    handle = optim.fuse_into_backward(model, opt)
    batches = token_batches(8)
    for i, ids in enumerate(batches):
        loss = model(input_ids=ids, labels=ids).loss
        with _Syncs() as during_backward:
            loss.backward()
        with _Syncs() as during_step:
            opt.step()
        assert not during_backward.calls, during_backward.calls
        assert not during_step.calls, (i, during_step.calls)
    assert opt.micro_step == 8 and handle.nonfinite_grads == {}

"""CUDA checks (skipped without a GPU; CI has none): the same references on the device."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_lists, grad_stream, make_params, run_micro_steps, run_reference_accumulation

from leantrain import optim

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda(params):
    return [p.detach().cuda().requires_grad_() for p in params]


def _cuda_stream(n):
    return [[g.cuda() for g in grads] for grads in grad_stream(n)]


def test_adamw_fused_kernel_on_cuda_equals_torch():
    ours, ref = _cuda(make_params()), _cuda(make_params())
    stream = _cuda_stream(20)
    run_micro_steps(optim.AdamW(ours, lr=0.05), ours, stream)
    run_reference_accumulation(torch.optim.AdamW(ref, lr=0.05, fused=True), ref, stream, 1)
    assert_close_lists(ours, ref, rtol=1e-5, atol=1e-6)


def test_sgd_accumulation_on_cuda_equals_torch():
    ours, ref = _cuda(make_params()), _cuda(make_params())
    stream = _cuda_stream(24)
    run_micro_steps(optim.SGD(ours, lr=0.1, momentum=0.9, weight_decay=0.01, accum_steps=4), ours, stream)
    run_reference_accumulation(torch.optim.SGD(ref, lr=0.1, momentum=0.9, weight_decay=0.01), ref, stream, 4)
    assert_close_lists(ours, ref, rtol=1e-5, atol=1e-6)


def test_adafactor_on_cuda_equals_transformers():
    from transformers.optimization import Adafactor as HFAdafactor

    ours, ref = _cuda(make_params()), _cuda(make_params())
    stream = _cuda_stream(20)
    run_micro_steps(optim.AdaFactor(ours, beta1=0.9), ours, stream)
    run_reference_accumulation(HFAdafactor(ref, beta1=0.9), ref, stream, 1)
    assert_close_lists(ours, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda p: optim.AdamW(p, lr=1e-2, accum_steps=4),
    lambda p: optim.AdaFactor(p, beta1=0.9, momentum_on="grad", momentum_dtype=torch.bfloat16, accum_steps=4),
    lambda p: optim.AdaFactor(p, accum_steps=4, accum_dtype=torch.bfloat16),
    lambda p: optim.AdamW(p, lr=1e-2),
], ids=["adamw", "adafactor_bf16m", "adafactor_buffer", "adamw_k1_in_hook"])
def test_fused_equals_unfused_on_cuda_with_bf16_autocast(make):
    from tiny_models import tiny_gpt2, token_batches, train_micro_steps

    batches = [b.cuda() for b in token_batches(12)]
    results = []
    for fused in (False, True):
        model = tiny_gpt2().cuda()
        results.append(train_micro_steps(model, make(list(model.parameters())), batches, fused=fused, autocast="cuda"))
    for a, b in zip(results[0].parameters(), results[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_stochastic_rounding_on_cuda_is_unbiased():
    """Many roundings of x between two bf16 neighbours average to x (round-to-nearest would not)."""
    from leantrain.optim._rounding import stochastic_round_to_bf16

    x = torch.full((1_000_000,), 1.0 + 2**-10, device="cuda")  # 1/8 of the way to the next bf16 value
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_to_bf16(x, out)
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert out.float().mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)

"""state_bytes(): exact bytes of optimizer state, by component."""

from __future__ import annotations

import torch
from helpers import make_params, run_micro_steps

from leantrain import optim


def _one_step(opt, params):
    run_micro_steps(opt, params, [[torch.randn(p.shape) for p in params]])


def test_adafactor_without_momentum_holds_factored_vectors_only():
    (w,) = make_params([(4096, 1024)])
    opt = optim.AdaFactor([w])
    _one_step(opt, [w])
    assert opt.state_bytes() == (4096 + 1024) * 4 + 4  # + the 0-dim RMS(θ) that AdafactorSchedule reads
    assert opt.state_bytes_by_component()["factored"] == (4096 + 1024) * 4


def test_adamw_holds_eight_bytes_per_parameter_at_any_k():
    params = make_params()
    n = sum(p.numel() for p in params)
    for k in (1, 8):
        opt = optim.AdamW(params, accum_steps=k)
        _one_step(opt, params)
        assert opt.state_bytes() == 8 * n
        assert opt.state_bytes_by_component()["accumulation"] == 0


def test_bf16_momentum_halves_the_momentum_share():
    params = make_params()
    n = sum(p.numel() for p in params)
    fp32 = optim.AdamW(params, accum_steps=4)
    bf16 = optim.AdamW(make_params(), accum_steps=4, momentum_dtype=torch.bfloat16)
    _one_step(fp32, params)
    _one_step(bf16, list(bf16.param_groups[0]["params"]))
    assert fp32.state_bytes() - bf16.state_bytes() == 2 * n  # m: 4 -> 2 B/param, v unchanged


def test_adafactor_grad_momentum_bf16_state():
    (w,) = make_params([(256, 128)])
    opt = optim.AdaFactor([w], beta1=0.9, momentum_on="grad", momentum_dtype=torch.bfloat16, accum_steps=8)
    _one_step(opt, [w])
    assert opt.state_bytes_by_component() == {
        "moments": 256 * 128 * 2, "factored": (256 + 128) * 4, "accumulation": 0,
        "wrappers": 0, "lazy_rows": 0, "other": 4,  # the 0-dim RMS(θ)
    }


def test_buffered_configuration_reports_its_accumulation_buffer_in_its_dtype():
    (w,) = make_params([(64, 32)])
    opt = optim.AdaFactor([w], accum_steps=4, accum_dtype=torch.bfloat16)
    _one_step(opt, [w])
    assert opt.state_bytes_by_component()["accumulation"] == 64 * 32 * 2


def test_wrappers_state_is_counted_in_the_wrapped_optimizer():
    params = make_params()
    n = sum(p.numel() for p in params)
    opt = optim.EMA(optim.Lookahead(optim.AdamW(params)))
    _one_step(opt, params)
    assert opt.state_bytes_by_component()["wrappers"] == 2 * 4 * n
    assert opt.base.base.state_bytes() == opt.state_bytes() == 16 * n


def test_state_bytes_works_on_torch_optimizers():
    params = make_params()
    n = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params)
    _one_step(opt, params)
    assert optim.state_bytes_by_component(opt)["moments"] == 8 * n

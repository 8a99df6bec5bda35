"""Fused accumulation in backward (docs/design.md §3) against the unfused optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_gpt2, token_batches, train_micro_steps

from leantrain import optim

FUSED_CASES = {
    "sgd_exact": lambda p: optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01, accum_steps=4),
    "sgd_ema": lambda p: optim.SGD(p, lr=0.05, momentum=0.9, accum_steps=4, accum_mode="ema"),
    "sgd_nesterov_buffer": lambda p: optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, accum_steps=4),
    "adamw_exact": lambda p: optim.AdamW(p, lr=1e-2, accum_steps=4),
    "adamw_ema": lambda p: optim.AdamW(p, lr=1e-2, accum_steps=4, accum_mode="ema"),
    "adamw_bf16_momentum": lambda p: optim.AdamW(p, lr=1e-2, accum_steps=4, momentum_dtype=torch.bfloat16),
    "adamw_k1_kernel_in_hook": lambda p: optim.AdamW(p, lr=1e-2),
    "adafactor_grad_exact": lambda p: optim.AdaFactor(p, beta1=0.9, momentum_on="grad", accum_steps=4),
    "adafactor_grad_ema": lambda p: optim.AdaFactor(p, beta1=0.9, momentum_on="grad", accum_steps=4, accum_mode="ema"),
    "adafactor_no_momentum_buffer": lambda p: optim.AdaFactor(p, accum_steps=4),
    "adafactor_no_momentum_bf16_buffer": lambda p: optim.AdaFactor(p, accum_steps=4, accum_dtype=torch.bfloat16),
    "adafactor_update_momentum_buffer": lambda p: optim.AdaFactor(p, beta1=0.9, accum_steps=4),
    "adafactor_k1_in_hook": lambda p: optim.AdaFactor(p),
    "adax_exact": lambda p: optim.AdaX(p, lr=1e-2, accum_steps=4),
    "adax_ema": lambda p: optim.AdaX(p, lr=1e-2, accum_steps=4, accum_mode="ema"),
    "lookahead_adamw": lambda p: optim.Lookahead(optim.AdamW(p, lr=1e-2, accum_steps=4), k=2),
    "ema_adafactor": lambda p: optim.EMA(optim.AdaFactor(p, beta1=0.9, momentum_on="grad", accum_steps=4), decay=0.9),
}


_train = train_micro_steps


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad_ckpt"])
@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_equals_unfused_after_three_cycles(name, checkpointing):
    batches = token_batches(12)  # 3 cycles of k = 4
    reference, fused = tiny_gpt2(), tiny_gpt2()
    if checkpointing:
        for model in (reference, fused):
            model.gradient_checkpointing_enable()
    _train(reference, FUSED_CASES[name](list(reference.parameters())), batches, fused=False)
    _train(fused, FUSED_CASES[name](list(fused.parameters())), batches, fused=True)
    for (n, a), b in zip(reference.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=lambda m: f"{n}: {m}")
    assert any(not torch.equal(a, b) for a, b in zip(reference.parameters(), tiny_gpt2().parameters()))


def test_frozen_parameters_get_no_hook_and_stay_put():
    model = tiny_gpt2()
    model.transformer.wpe.weight.requires_grad_(False)
    frozen = model.transformer.wpe.weight.detach().clone()
    opt = optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, accum_steps=2)
    handle = optim.fuse_into_backward(model, opt)
    assert all(p is not model.transformer.wpe.weight for p in handle.params)
    _train(model, opt, token_batches(4), fused=False)  # hooks already registered
    assert torch.equal(model.transformer.wpe.weight, frozen)


def test_bf16_autocast_fused_equals_unfused():
    batches = token_batches(8)
    results = []
    for fused in (False, True):
        model = tiny_gpt2()
        results.append(_train(model, optim.AdamW(model.parameters(), lr=1e-2, accum_steps=4), batches,
                              fused=fused, autocast="cpu"))
    for a, b in zip(results[0].parameters(), results[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_nonfinite_loss_micro_batch_is_skipped_and_does_not_count():
    """A run with a NaN-loss micro-batch equals the same run without that micro-batch."""
    batches = token_batches(9)
    poisoned_at = 5

    def run(batch_list, poison: bool):
        model = tiny_gpt2()
        opt = optim.AdaFactor(model.parameters(), beta1=0.9, momentum_on="grad", accum_steps=4)
        optim.fuse_into_backward(model, opt)
        skipped = 0
        for i, ids in enumerate(batch_list):
            loss = model(input_ids=ids, labels=ids).loss
            if poison and i == poisoned_at:
                loss = loss * float("nan")
            if not optim.finite_loss(loss):
                skipped += 1
                continue
            loss.backward()
            opt.step()
        return model, opt, skipped

    poisoned, opt_a, skipped = run(batches, poison=True)
    clean, opt_b, _ = run(batches[:poisoned_at] + batches[poisoned_at + 1:], poison=False)
    assert skipped == 1 and opt_a.micro_step == opt_b.micro_step == 8
    for a, b in zip(poisoned.parameters(), clean.parameters()):
        assert torch.equal(a, b)


def test_nonfinite_gradient_is_counted_and_folded_as_zero():
    """Mid-cycle, a zero gradient adds nothing: the poisoned parameter's state is unchanged."""
    model = tiny_gpt2()
    opt = optim.AdamW(model.parameters(), lr=1e-2, accum_steps=4)
    handle = optim.fuse_into_backward(model, opt)
    target = model.transformer.h[0].mlp.c_fc.weight
    ids = token_batches(2)
    model(input_ids=ids[0], labels=ids[0]).loss.backward()
    opt.step()
    before = {k: v.clone() for k, v in opt.state[target].items() if isinstance(v, torch.Tensor)}
    other_before = opt.state[model.transformer.wte.weight]["exp_avg"].clone()
    poison = target.register_hook(lambda g: g * float("nan"))
    model(input_ids=ids[1], labels=ids[1]).loss.backward()
    opt.step()
    poison.remove()
    assert handle.nonfinite_grads == handle.local_nonfinite_grads == {"transformer.h.0.mlp.c_fc.weight": 1}
    assert "transformer.h.0.mlp.c_fc.weight: 1 non-finite gradient(s) folded as zero" in \
        handle.report(handle.nonfinite_grads)
    for key, value in before.items():
        assert torch.equal(opt.state[target][key], value)
    assert not torch.equal(opt.state[model.transformer.wte.weight]["exp_avg"], other_before)
    assert all(torch.isfinite(s["exp_avg"]).all() for s in opt.state.values())


def test_second_gradient_in_one_micro_step_is_refused():
    model = tiny_gpt2()
    opt = optim.AdamW(model.parameters(), accum_steps=2)
    optim.fuse_into_backward(model, opt)
    ids = token_batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match=r"received a second gradient in micro-step 0"):
        model(input_ids=ids, labels=ids).loss.backward()


def test_global_clipping_is_refused_pointing_to_update_clipping():
    model = tiny_gpt2()
    handle = optim.fuse_into_backward(model, optim.AdamW(model.parameters(), accum_steps=2))
    with pytest.raises(RuntimeError, match=r"global gradient-norm clipping.*max_update_rms.*clip_threshold"):
        handle.clip_grad_norm_(1.0)


def test_fp16_loss_scaler_is_refused():
    model = tiny_gpt2()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(ValueError, match=r"fp16 with a dynamic loss scaler cannot be fused.*use bf16"):
        optim.fuse_into_backward(model, optim.AdamW(model.parameters()), grad_scaler=scaler)


def test_fp16_gradients_are_refused_in_the_hook():
    w = torch.zeros(4, dtype=torch.float16, requires_grad=True)
    optim.fuse_into_backward([w], optim.SGD([w], lr=0.1, momentum=0.9))
    with pytest.raises(RuntimeError, match="fp16 with a dynamic loss scaler"):
        (w.float() * 2).sum().backward()


def test_torch_optimizers_cannot_be_fused():
    model = tiny_gpt2()
    with pytest.raises(TypeError, match=r"optimizer='AdamW' cannot fold gradients"):
        optim.fuse_into_backward(model, torch.optim.AdamW(model.parameters()))


def test_memory_report_fused_adamw_holds_twelve_bytes_per_parameter():
    model = tiny_gpt2()
    opt = optim.AdamW(model.parameters(), accum_steps=4)
    optim.fuse_into_backward(model, opt)
    ids = token_batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    report = optim.memory_report(model, opt)
    n = sum(p.numel() for p in model.parameters())  # tied weight counted once
    assert report.trainable_params == n
    assert (report.parameters, report.gradients, report.optimizer_state, report.accumulation) == (4 * n, 0, 8 * n, 0)
    assert report.per_param(report.total) == 12.0
    assert "total" in report.format()


def test_memory_report_counts_live_gradients_and_buffers_unfused():
    model = tiny_gpt2()
    opt = optim.AdaFactor(model.parameters(), accum_steps=4, accum_dtype=torch.bfloat16)
    ids = token_batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    n = sum(p.numel() for p in model.parameters())
    assert optim.memory_report(model, opt).gradients == 4 * n
    opt.step()
    opt.zero_grad()
    report = optim.memory_report(model, opt)
    assert report.gradients == 0 and report.accumulation == 2 * n


@pytest.mark.parametrize("cls, kwargs", [
    (optim.SGD, dict(momentum=0.5)),
    (optim.SGD, dict(momentum=0.5, nesterov=True)),
    (optim.AdamW, dict(weight_decay=0.0)),
    (optim.AdamW, dict(weight_decay=0.0, momentum_dtype=torch.bfloat16)),
    (optim.AdaX, dict(betas=(0.0, 1e-4))),
], ids=["sgd", "sgd_nesterov", "adamw", "adamw_bf16_momentum", "adax"])
def test_max_update_rms_scales_each_tensor_update_to_the_bound(cls, kwargs):
    """Clipped update = unclipped update · min(1, bound / RMS(unclipped)), per tensor (lr = 1)."""
    bound, gen = 0.25, torch.Generator().manual_seed(0)
    start = [torch.zeros(50), torch.zeros(30)]
    grads = [[100 * torch.randn(50, generator=gen), 1e-3 * torch.randn(30, generator=gen)] for _ in range(2)]
    deltas = {}
    for clip in (None, bound):
        params = [t.clone().requires_grad_() for t in start]
        opt = cls(params, lr=1.0, accum_steps=2, max_update_rms=clip, **kwargs)
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
        assert opt.updated
        deltas[clip] = [p.detach() - s for p, s in zip(params, start)]
    rms = [d.pow(2).mean().sqrt() for d in deltas[None]]
    assert rms[0] > bound  # the large tensor is really clipped
    for unclipped, clipped, r in zip(deltas[None], deltas[bound], rms):
        torch.testing.assert_close(clipped, unclipped * min(1.0, bound / r.item()), rtol=1e-5, atol=1e-8)


def _regression_loss(param_dtype, rounding: bool, steps: int = 2000):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen)
    w_true = torch.randn(16, 4, generator=gen)
    y = x @ w_true + 0.3 * torch.randn(256, 4, generator=gen)
    w = (w_true + 0.3 * torch.randn(16, 4, generator=gen)).to(param_dtype).requires_grad_()
    opt = optim.AdamW([w], lr=2e-3, weight_decay=0.0, stochastic_rounding=rounding)
    optim.fuse_into_backward([w], opt)
    torch.manual_seed(0)  # the stochastic-rounding noise
    for s in range(steps):
        rows = slice((s % 8) * 32, (s % 8 + 1) * 32)
        ((x[rows] @ w.float() - y[rows]) ** 2).mean().backward()
        opt.step()
    return ((x @ w.float() - y) ** 2).mean().item()


def test_bf16_parameters_with_stochastic_rounding_reach_the_fp32_loss():
    fp32 = _regression_loss(torch.float32, rounding=True)
    stochastic = _regression_loss(torch.bfloat16, rounding=True)
    nearest = _regression_loss(torch.bfloat16, rounding=False)
    assert stochastic <= 1.05 * fp32, (fp32, stochastic)
    assert nearest >= 1.5 * fp32, (fp32, nearest)  # lr·update below bf16 resolution: stalls


def test_hooks_follow_a_loaded_state_dict():
    """load_state_dict replaces the group dicts: folding must use the live ones (resume mid-cycle)."""
    batches = token_batches(16)  # the load at micro-step 6, then two more boundaries
    reference = tiny_gpt2()
    ref_opt = optim.AdamW(reference.parameters(), lr=1e-2, accum_steps=4)
    _train(reference, ref_opt, batches, fused=True)

    model = tiny_gpt2()
    opt = optim.AdamW(model.parameters(), lr=1e-2, accum_steps=4)
    optim.fuse_into_backward(model, opt)
    _train(model, opt, batches[:6], fused=False)  # hooks already on; stop mid-cycle
    saved = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(saved)  # as a resume does: new group dicts, same optimizer object
    _train(model, opt, batches[6:], fused=False)
    for a, b in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_stochastic_rounding_is_unbiased_and_exact_on_representable_values():
    from leantrain.optim._rounding import stochastic_round_to_bf16

    torch.manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2**-10)  # 1/8 of the way from 1.0 to the next bf16 value
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_to_bf16(x, out)
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert out.float().mean().item() == pytest.approx(1.0 + 2**-10, abs=5e-5)
    exact = torch.tensor([1.0, -2.5, 0.0, 3.140625])  # representable in bf16: never moved
    stochastic_round_to_bf16(exact, out[:4])
    assert torch.equal(out[:4].float(), exact)
    negative = -x
    stochastic_round_to_bf16(negative, out)
    assert out.float().mean().item() == pytest.approx(-(1.0 + 2**-10), abs=5e-5)

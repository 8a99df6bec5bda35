"""transformers.Trainer with leantrain's embedded accumulation (LeantrainCallback), fused or not,
against the Trainer's own .grad accumulation with torch's SGD (SGD's embedding is exact)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_gpt2

from leantrain import optim
from leantrain.integrations.transformers import LeantrainCallback

K = 4


def _examples(n: int, seq: int = 12, learnable: bool = False):
    """Random tokens, or a repeating pattern with a random offset (learnable)."""
    gen = torch.Generator().manual_seed(0)
    if learnable:
        rows = [(torch.arange(seq) % 8 + torch.randint(0, 8, (1,), generator=gen)) % 64 for _ in range(n)]
    else:
        rows = [torch.randint(0, 64, (seq,), generator=gen) for _ in range(n)]
    return [{"input_ids": r, "labels": r} for r in rows]


def _args(tmp_path, **overrides):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=K,
                num_train_epochs=2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                disable_tqdm=True, max_grad_norm=0.0, learning_rate=0.05, seed=0, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **overrides})


def _train(model, args, examples, optimizer, callbacks=()):
    from transformers import Trainer

    trainer = Trainer(model=model, args=args, train_dataset=examples, optimizers=(optimizer, None),
                      callbacks=list(callbacks))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    lrs = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    return trainer, losses, lrs


class _NoGradientsKept:
    """Fused mode keeps no gradient between micro-batches: checked where the Trainer would clip."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class Check(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                outer.checked += 1
                assert all(p.grad is None for p in model.parameters())

        self.checked = 0
        self.callback = Check()


@pytest.mark.parametrize("n_examples", [64, 20], ids=["full_windows", "short_last_window"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_trainer_with_callback_equals_its_own_accumulation(tmp_path, fused, n_examples):
    """20 examples = 10 micro-batches per epoch: windows of 4, 4 and 2 (the cycle ends early)."""
    examples = _examples(n_examples)
    base = tiny_gpt2()
    reference = copy.deepcopy(base)
    _, ref_losses, ref_lrs = _train(reference, _args(tmp_path / "ref"), examples,
                                    torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9))
    ours = copy.deepcopy(base)
    opt = optim.SGD(ours.parameters(), lr=0.05, momentum=0.9, accum_steps=K)
    checks = _NoGradientsKept()
    handle = optim.fuse_into_backward(ours, opt) if fused else None
    trainer, losses, lrs = _train(ours, _args(tmp_path / "ours"), examples, opt,
                                  [LeantrainCallback(), *([checks.callback] if fused else [])])
    if handle:
        handle.remove()
    updates = trainer.state.global_step
    assert updates == (16 if n_examples == 64 else 6) and opt.micro_step == (updates * K if n_examples == 64 else 24)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert lrs == pytest.approx(ref_lrs)  # the schedule steps once per update
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not fused or checks.checked == updates


def test_adamw_fused_in_the_trainer_learns_and_keeps_no_gradients(tmp_path):
    model = tiny_gpt2()
    opt = optim.AdamW(model.parameters(), lr=1e-2, accum_steps=K)
    checks = _NoGradientsKept()
    with optim.fuse_into_backward(model, opt):
        _, losses, _ = _train(model, _args(tmp_path, num_train_epochs=6), _examples(64, learnable=True), opt,
                              [LeantrainCallback(), checks.callback])
    assert checks.checked == 48 and losses[-1] < 0.5 * losses[0]
    assert optim.memory_report(model, opt).gradients == 0


def test_fused_optimizer_without_the_callback_is_refused(tmp_path):
    model = tiny_gpt2()
    opt = optim.AdamW(model.parameters(), accum_steps=K)
    with optim.fuse_into_backward(model, opt):
        with pytest.raises(RuntimeError, match=r"second gradient.*transformers\.Trainer with gradient_accumulation_steps "
                                               r"> 1: add leantrain\.integrations\.transformers\.LeantrainCallback"):
            _train(model, _args(tmp_path), _examples(16), opt)


def test_fused_optimizer_with_trainer_clipping_is_refused(tmp_path):
    """gradient_accumulation_steps=1 and the Trainer's default max_grad_norm=1.0: clipping nothing, refused."""
    model = tiny_gpt2()
    opt = optim.AdamW(model.parameters())
    with optim.fuse_into_backward(model, opt):
        with pytest.raises(RuntimeError, match=r"clip_grad_norm_ after fused backward"):
            _train(model, _args(tmp_path, gradient_accumulation_steps=1, max_grad_norm=1.0), _examples(8), opt)


@pytest.mark.parametrize("make_opt, overrides, pattern", [
    (lambda m: torch.optim.AdamW(m.parameters()), {}, r"^LeantrainCallback: the Trainer's optimizer is AdamW, not a leantrain"),
    (lambda m: optim.AdamW(m.parameters(), accum_steps=2), {}, r"accum_steps=2\) with gradient_accumulation_steps=4: set accum_steps=4"),
    (lambda m: optim.AdamW(m.parameters(), accum_steps=K), {"max_grad_norm": 1.0}, r"max_grad_norm=1\.0 .*set max_grad_norm=0"),
], ids=["torch_optimizer", "k_mismatch", "clipping"])
def test_callback_refuses_what_it_cannot_make_right(tmp_path, make_opt, overrides, pattern):
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=pattern):
        _train(model, _args(tmp_path, **overrides), _examples(16), make_opt(model), [LeantrainCallback()])


def test_adafactor_with_adafactor_schedule_behaves_like_transformers_adafactor(tmp_path):
    from transformers import Trainer
    from transformers.optimization import Adafactor, AdafactorSchedule

    examples = _examples(32)
    runs = []
    for cls in (Adafactor, optim.AdaFactor):
        model = tiny_gpt2()
        opt = cls(model.parameters(), scale_parameter=True, relative_step=True, warmup_init=True, lr=None)
        trainer = Trainer(model=model, args=_args(tmp_path / cls.__module__, gradient_accumulation_steps=1),
                          train_dataset=examples, optimizers=(opt, AdafactorSchedule(opt)))
        trainer.train()
        lrs = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
        runs.append((model, lrs))
    (theirs, their_lrs), (ours, our_lrs) = runs
    assert len(our_lrs) == 32 and our_lrs[-1] > our_lrs[1] > 0  # warmup_init: the applied lr grows
    torch.testing.assert_close(torch.tensor(our_lrs), torch.tensor(their_lrs, dtype=torch.float32), rtol=1e-5, atol=0)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

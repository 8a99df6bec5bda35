"""2 gloo processes: leantrain's optimizers under raw DDP (replicated state, one averaging per
update) and raw DeepSpeed ZeRO 1/2/3 (ZeroClient), each against a single-process reference."""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist
from distributed import write_result

from leantrain import optim

K = 4


class Net(torch.nn.Module):
    """A branch used only by rank 0's batches (x[:, 0] > 100): parameters with gradients on some ranks."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 5)
        self.b = torch.nn.Linear(5, 7)
        self.branch = torch.nn.Linear(5, 7)

    def forward(self, x):
        h = torch.tanh(self.a(x[:, 1:]))
        out = self.b(h).square().mean()
        if bool((x[:, 0] > 100).all()):
            out = out + self.branch(h).square().mean()
        return out


def make(seed=0):
    torch.manual_seed(seed)
    return Net()


def data(n, world, *, branch_ranks=(0,)):
    gen = torch.Generator().manual_seed(1)
    steps = []
    for _ in range(n):
        per_rank = []
        for r in range(world):
            x = torch.randn(3, 7, generator=gen)
            x[:, 0] = 1000.0 if r in branch_ranks else 0.0
            per_rank.append(x)
        steps.append(per_rank)
    return steps


DDP_CONFIGS = {
    "adamw": lambda p, k: optim.AdamW(p, lr=0.05, weight_decay=0.1, accum_steps=k),
    "adamw_bf16_momentum": lambda p, k: optim.AdamW(p, lr=0.05, momentum_dtype=torch.bfloat16, accum_steps=k),
    "sgd_wd": lambda p, k: optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1, accum_steps=k),
    "adafactor_grad_momentum": lambda p, k: optim.AdaFactor(p, beta1=0.9, momentum_on="grad", accum_steps=k),
    "adafactor_no_momentum": lambda p, k: optim.AdaFactor(p, accum_steps=k),
    "adax": lambda p, k: optim.AdaX(p, lr=0.05, accum_steps=k),
}


def ddp_case(name, make_opt, rank, world, fused):
    """N ranks × k micro-steps, state averaged at the boundary == 1 process × N·k micro-steps."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    steps = data(3 * K, world)
    reference = make()
    ref_opt = make_opt(list(reference.parameters()), K * world)
    handle = optim.fuse_into_backward(reference, ref_opt) if fused else None
    for c in range(3):  # each cycle: rank 0's k micro-batches, then rank 1's
        for r in range(world):
            for s in range(c * K, c * K + K):
                reference(steps[s][r]).backward()
                ref_opt.step()
                ref_opt.zero_grad()
    if handle:
        handle.remove()
    model = DDP(make())
    opt = make_opt(list(model.parameters()), K).replicated_over()
    handle = optim.fuse_into_backward(model.module, opt) if fused else None
    mid_cycle_bytes = 0
    for s, step in enumerate(steps):
        with model.no_sync():  # no gradient all-reduce inside the cycle
            model(step[rank]).backward()
        opt.step()
        opt.zero_grad()
        if s == 5:
            before = opt.communicated_bytes
            opt.sync_state()  # mid-cycle, as before a checkpoint: must not change the result
            mid_cycle_bytes = opt.communicated_bytes - before
    if handle:
        handle.remove()
    diff = max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(model.module.parameters(), reference.parameters()))
    n = sum(p.numel() for p in model.parameters())
    return diff, (opt.communicated_bytes - mid_cycle_bytes) / 3 / n


def deepspeed_case(stage, make_opt, rank, world):
    """ZeRO (gradients averaged every micro-step, GA 1) == 1 process on the global batch, k micro-steps.

    Every rank uses every parameter (DeepSpeed's reduction, like DDP's, expects it)."""
    import deepspeed

    steps = data(3 * K, world, branch_ranks=range(world))
    reference = make()
    groups = lambda m: [{"params": [p for n, p in m.named_parameters() if "bias" not in n]},  # noqa: E731
                        {"params": [p for n, p in m.named_parameters() if "bias" in n], "weight_decay": 0.0}]
    ref_opt = make_opt(groups(reference), K)
    for step in steps:
        for x in step:  # the mean over ranks of the per-rank mean losses
            (reference(x) / world).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    model = make()
    client = optim.ZeroClient(make_opt(groups(model), K))
    config = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, zero_opt, _, _ = deepspeed.initialize(model=model, optimizer=client, config=config)
        client.bind(zero_opt)
    for step in steps:
        engine.backward(engine(step[rank]))
        engine.step()
    micro = client.inner.micro_step
    if stage == 3:
        from deepspeed.utils import safe_get_full_fp32_param as full
    else:
        full = None
    diffs, moved = [], []
    for (name, p), q, q0 in zip(engine.module.named_parameters(), reference.parameters(), make().parameters()):
        value = full(p) if full else p.detach()
        diffs.append(((value - q).abs().max() / q.abs().max()).item())
        moved.append(((value - q0).abs().max()).item())
    messages = [str(w.message) for w in caught if "DeepSpeed ZeRO" in str(w.message)]
    return max(diffs), min(moved), micro, messages, client.inner.state_bytes()


def main():
    mode = sys.argv[1]
    if mode == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}
    if mode == "ddp":
        for name, make_opt in DDP_CONFIGS.items():
            for fused in (False, True):
                diff, per_param = ddp_case(name, make_opt, rank, world, fused)
                result[f"{name}-{'fused' if fused else 'unfused'}"] = {"diff": diff, "bytes_per_param_update": per_param}
    else:
        cases = {"adamw": lambda p, k: optim.AdamW(p, lr=0.05, weight_decay=0.1, accum_steps=k),
                 "sgd": lambda p, k: optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1, accum_steps=k),
                 "adafactor": lambda p, k: optim.AdaFactor(p, beta1=0.9, momentum_on="grad", accum_steps=k)}
        for stage in (1, 2, 3):
            for name, make_opt in cases.items():
                diff, moved, micro, messages, state = deepspeed_case(stage, make_opt, rank, world)
                result[f"zero{stage}-{name}"] = {"diff": diff, "moved": moved, "micro_step": micro,
                                                 "warnings": messages, "state_bytes": state}
    write_result(result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

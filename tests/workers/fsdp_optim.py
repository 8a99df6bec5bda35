"""2 gloo processes, raw ``fully_shard``: leantrain's optimizers on DTensor shards equal the
unsharded run on the same global batch; state_bytes() is the local shard; a NaN is seen by all."""

from __future__ import annotations

import torch
import torch.distributed as dist
from distributed import write_result
from torch.distributed.fsdp import fully_shard

from leantrain import optim

K = 4


class PoisonableLinear(torch.nn.Linear):
    """With a NaN ``poison`` only row 0 of the weight's gradient becomes NaN; the loss stays finite."""

    def __init__(self, *args):
        super().__init__(*args)
        self.register_buffer("poison", torch.zeros(()))

    def forward(self, x):
        row = self.weight[0]
        if self.poison.isnan():
            row.register_hook(lambda g: g * self.poison)
        return super().forward(x) + (row * 0).sum()


class Net(torch.nn.Module):
    """Rows that do not divide evenly over 2 ranks (5 and 7), a 3-D weight, 1-D biases."""

    def __init__(self):
        super().__init__()
        self.a = PoisonableLinear(6, 5)
        self.b = torch.nn.Linear(5, 7)
        self.c = torch.nn.Parameter(torch.randn(3, 7, 4) * 0.3)

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return torch.einsum("nh,khd->nkd", h, self.c).square().mean()


def make(seed=0):
    torch.manual_seed(seed)
    return Net()


CONFIGS = {
    "adafactor_relative": lambda p: optim.AdaFactor(p),
    "adafactor_update_momentum_k4": lambda p: optim.AdaFactor(p, beta1=0.9, weight_decay=0.01, accum_steps=K),
    "adafactor_grad_momentum_k4": lambda p: optim.AdaFactor(p, beta1=0.9, momentum_on="grad", accum_steps=K),
    "adafactor_ema_fixed_beta2": lambda p: optim.AdaFactor(p, lr=0.05, relative_step=False, scale_parameter=False,
                                                           beta1=0.9, momentum_on="grad", beta2=0.99, accum_steps=K,
                                                           accum_mode="ema"),
    "adamw_clipped_k4": lambda p: optim.AdamW(p, lr=0.05, max_update_rms=0.05, accum_steps=K),
    "sgd_k4": lambda p: optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01, accum_steps=K),
    "adax_k4": lambda p: optim.AdaX(p, lr=0.05, max_update_rms=0.1, accum_steps=K),
    "lamb_k4": lambda p: optim.LayerAdaptation(optim.AdamW(p, lr=0.05, weight_decay=0.1, accum_steps=K)),
}


def batches(n, world):
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(3, 6, generator=gen) for _ in range(world)] for _ in range(n)]


def train(model, opt, data, rank, *, sharded, fused):
    handle = optim.fuse_into_backward(model, opt) if fused else None
    for s, step in enumerate(data):
        if sharded:
            model(step[rank]).backward()  # FSDP2 averages the reduce-scattered gradients over ranks
        else:
            model(torch.cat(step)).backward()  # the global batch (equal rank batches: the same mean)
        opt.step()
        opt.zero_grad()
        if s == 5:
            opt.sync_state()  # mid-cycle, as before a checkpoint: must not change the result
    if handle:
        handle.remove()


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches(3 * K, world)
    result = {"max_rel_diff": {}, "state_bytes": {}}
    for name, make_opt in CONFIGS.items():
        for fused in (False, True):
            reference = make()
            ref_opt = make_opt(list(reference.parameters()))
            train(reference, ref_opt, data, rank, sharded=False, fused=fused)
            sharded = make()
            for module in (sharded.a, sharded.b):
                fully_shard(module)
            fully_shard(sharded)
            opt = make_opt(list(sharded.parameters()))
            train(sharded, opt, data, rank, sharded=True, fused=fused)
            diff = max(((p.full_tensor() - q).abs().max() / q.abs().max()).item()
                       for p, q in zip(sharded.parameters(), reference.parameters()))
            result["max_rel_diff"][f"{name}-{'fused' if fused else 'unfused'}"] = diff
            local = sum(p.to_local().numel() for p in sharded.parameters())
            result["state_bytes"][name] = [opt.state_bytes(), ref_opt.state_bytes(), local]
    # mixed precision: bf16 compute, fp32 sharded parameters, fp32 reduce; factored AdaFactor, fused
    from torch.distributed.fsdp import MixedPrecisionPolicy

    make_opt = CONFIGS["adafactor_grad_momentum_k4"]
    runs = {}
    for policy in (None, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)):
        model = make()
        kwargs = {"mp_policy": policy} if policy else {}
        for module in (model.a, model.b):
            fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)
        opt = make_opt(list(model.parameters()))
        train(model, opt, data, rank, sharded=True, fused=True)
        runs["bf16" if policy else "fp32"] = (model, opt)
    model, opt = runs["bf16"]
    result["mixed_precision"] = {
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "state_dtypes": sorted({str(v.dtype) for s in opt.state.values() for v in s.values()
                                if isinstance(v, torch.Tensor) and v.is_floating_point()}),
        "rel_diff_vs_fp32": max(((p.full_tensor() - q.full_tensor()).abs().max() / q.full_tensor().abs().max()).item()
                                for p, q in zip(model.parameters(), runs["fp32"][0].parameters())),
        "moved": min((p.full_tensor() - q).abs().max().item() for p, q in zip(model.parameters(), make().parameters())),
    }
    # a NaN produced on rank 1 lands in rank 0's shard (row 0): every rank must see it
    model = make()
    for module in (model.a, model.b):
        fully_shard(module)
    fully_shard(model)
    opt = optim.AdamW(list(model.parameters()), lr=0.01, accum_steps=2)
    handle = optim.fuse_into_backward(model, opt)
    for step, x in enumerate(batches(4, world)):
        model.a.poison.fill_(float("nan") if (rank == 1 and step == 1) else 0.0)
        model(x[rank]).backward()
        opt.step()
    result["local_nonfinite"] = dict(handle.local_nonfinite_grads)
    result["global_nonfinite"] = dict(handle.nonfinite_grads)
    result["finite_state"] = all(bool(torch.isfinite(v.to_local()).all()) for s in opt.state.values()
                                 for v in s.values() if isinstance(v, torch.Tensor) and v.is_floating_point()
                                 and hasattr(v, "to_local"))
    write_result(result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

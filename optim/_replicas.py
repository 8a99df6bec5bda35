"""Replicated optimizer state across data-parallel ranks: one averaging per update (DDP).

With DDP every rank holds the whole optimizer state. Instead of all-reducing
gradients at every micro-step, each rank folds its own micro-batches and, at
the boundary, the accumulated buffers (the moments, AdaFactor's R and C, the
``grad_accum`` of configurations that need the mean gradient) are averaged in
bucketed all-reduces. Because the decayed part ``β·m`` is identical on every
rank, the average is exactly the moment of the global batch: N ranks × k
micro-steps equal one process running the same N·k micro-batches
(docs/design.md §4). The averaging is closed under repetition, so it can also
run mid-cycle (``sync_state()`` before a checkpoint) without changing the
result.

Which parameters had a gradient in the cycle is decided globally: a flag per
parameter travels in the first bucket. A rank on which a parameter had no
gradient contributes what its fold of a zero gradient would be (the decay, an
SGD weight-decay term), so parameters used on some ranks only are averaged
correctly; a parameter no rank touched keeps its state on every rank.
Communication per update: the accumulated buffers once (8 B/param for AdamW,
4 for SGD or AdaFactor's momentum), in fp32 buckets of ``BUCKET_NUMEL``.
"""

from __future__ import annotations

import torch

BUCKET_NUMEL = 8 * 1024 * 1024  # 32 MiB of fp32 per all-reduce: bounded transient memory, few collectives


def average_state(optimizer, *, group, cycle: int) -> int:
    """Average the accumulated buffers of every parameter over ``group``; returns the bytes all-reduced
    (each rank sends and receives about this much; also added to ``optimizer.communicated_bytes``)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    optimizer.init_all_state()  # every rank must pack the same tensors, whatever it saw
    entries = []  # (param, state, sources, targets)
    for group_dict in optimizer.param_groups:
        keys = optimizer._accumulated_keys(group_dict)
        for p in group_dict["params"]:
            state = optimizer.state[p]
            targets = [state[key] for key in keys if key in state]
            touched = state["cycle"] == cycle
            sources = targets if touched else optimizer._zero_fold(group_dict, p, state, keys, cycle)
            entries.append((p, state, touched, _real(sources), _real(targets)))
    if not entries:
        return 0
    device = entries[0][3][0].device if entries[0][3] else torch.device("cpu")
    flags = torch.tensor([float(e[2]) for e in entries], device=device)
    pieces = [(None, flags)] + [(i, t.reshape(-1)) for i, e in enumerate(entries) for t in e[3]]
    reduced: dict[int, list[torch.Tensor]] = {}
    sent = 0
    global_flags = None
    for bucket in _buckets(pieces):
        dtype = torch.float64 if any(t.dtype == torch.float64 for _, t in bucket) else torch.float32
        flat = torch.cat([t.to(dtype) for _, t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        sent += flat.numel() * flat.element_size()
        offset = 0
        for owner, t in bucket:
            part = flat[offset:offset + t.numel()]
            offset += t.numel()
            if owner is None:
                global_flags = part.clone()
            else:
                reduced.setdefault(owner, []).append(part.div(world))
    for i, (p, state, touched, sources, targets) in enumerate(entries):
        if global_flags[i] == 0:
            continue  # no rank had a gradient: the state is unchanged (and equal) everywhere
        flat = torch.cat(reduced[i]) if i in reduced else torch.empty(0, device=device)
        offset = 0
        for target in targets:
            target.copy_(flat[offset:offset + target.numel()].view_as(target))
            offset += target.numel()
        state["cycle"] = cycle
    optimizer.communicated_bytes += sent
    return sent


def _real(tensors):
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


def _buckets(pieces):
    """Group ``(owner, flat tensor)`` pieces into buckets of about BUCKET_NUMEL elements, splitting large ones."""
    bucket, size = [], 0
    for owner, t in pieces:
        start = 0
        while start < t.numel() or (t.numel() == 0 and start == 0):
            room = BUCKET_NUMEL - size
            take = min(room, t.numel() - start)
            bucket.append((owner, t[start:start + take]))
            size += take
            start += take
            if size >= BUCKET_NUMEL:
                yield bucket
                bucket, size = [], 0
            if t.numel() == 0:
                break
    if bucket:
        yield bucket

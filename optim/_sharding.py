"""Local shards versus whole tensors: the one place that knows the difference.

The optimizers' mathematics runs on plain local tensors. Under FSDP2 a
parameter is a ``DTensor`` whose local part is a slice along one dimension
(``Shard(d)``); elementwise updates need nothing more, but every cross-tensor
reduction does: a norm, an RMS, a mean over rows or columns, a finiteness
flag. Those go through this module, which

- gives the local view of a tensor (``local``) and how it is split
  (``layout_of``);
- collects partial sums from any number of tensors and finishes them with
  one batched ``all_reduce`` per process group (``GlobalSums``), so an update
  costs one collective however many tensors it touches;
- reduces a non-finite *count* across every rank (``global_count``): a float
  MIN/MAX would drop NaN on gloo, a count cannot.

Replicated tensors (single process, DDP) are whole on every rank: their
reductions are local and cost no communication.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch


def _dtensor_type():
    """DTensor's class if torch.distributed.tensor is loaded (no DTensor can exist otherwise)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_sharded(tensor: torch.Tensor) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank holds (a view sharing its storage)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


@dataclass(frozen=True)
class Layout:
    """How a tensor is split across ranks: ``dim`` is split over ``group`` (``world`` ranks)."""

    dim: int
    group: object  # torch.distributed.ProcessGroup
    world: int
    global_shape: torch.Size

    def splits(self, dim: int, ndim: int) -> bool:
        """Whether dimension ``dim`` (negative allowed) of the ``ndim``-dim tensor is the split one."""
        return dim % ndim == self.dim


def layout_of(tensor: torch.Tensor) -> Layout | None:
    """None for a whole tensor; the shard layout of a DTensor.

    Replicated mesh dimensions (HSDP's outer dimension) hold identical copies:
    the engine keeps them equal, so only the ``Shard`` dimension matters. More
    than one ``Shard`` placement (tensor parallel inside FSDP) is refused.
    """
    if not is_sharded(tensor):
        return None
    from torch.distributed.tensor import Shard

    shards = [(mesh_dim, p) for mesh_dim, p in enumerate(tensor.placements) if isinstance(p, Shard)]
    if not shards:
        return None
    if len(shards) > 1:
        raise ValueError(
            f"a parameter of shape {tuple(tensor.shape)} is sharded over {len(shards)} mesh dimensions "
            f"({tensor.placements}); leantrain's optimizers support one Shard placement (FSDP2, HSDP)"
        )
    mesh_dim, placement = shards[0]
    mesh = tensor.device_mesh
    return Layout(placement.dim % tensor.dim(), mesh.get_group(mesh_dim), mesh.size(mesh_dim), tensor.shape)


def factored_stat_like(param: torch.Tensor, drop_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Zeros shaped like ``param`` without dimension ``drop_dim`` (AdaFactor's row/column statistics).

    For a sharded parameter the statistic stays sharded where its split
    dimension survives (R of a dim-0 shard: this rank's rows), and is a whole,
    replicated tensor where the split dimension is the one reduced away (C of a
    dim-0 shard of a matrix: every rank holds all columns).
    """
    shape = list(param.shape)
    del shape[drop_dim]
    layout = layout_of(param)
    device = local(param).device
    if layout is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    drop = drop_dim % param.dim()
    if drop == layout.dim:
        return torch.zeros(shape, dtype=dtype, device=device)
    from torch.distributed.tensor import DTensor, Shard

    new_dim = layout.dim - (1 if layout.dim > drop else 0)
    local_shape = list(local(param).shape)
    del local_shape[drop]
    placements = [Shard(new_dim) if isinstance(p, Shard) else p for p in param.placements]
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(torch.zeros(local_shape, dtype=dtype, device=device), param.device_mesh, placements,
                              run_check=False, shape=torch.Size(shape), stride=stride)


class GlobalSums:
    """Partial sums from local shards, finished by one batched all-reduce per process group.

    ``add(partial, layout)`` registers a tensor holding this rank's part of a
    sum; after ``finish()`` it holds the sum over every rank of the layout's
    group (in place). A partial with ``layout=None`` is already complete and is
    left alone, so single-process code pays nothing. Partials are reduced in
    fp32 or wider (bf16 sums would round at every rank).
    """

    def __init__(self) -> None:
        self._pending: dict[object, list[torch.Tensor]] = {}

    def add(self, partial: torch.Tensor, layout: Layout | None) -> torch.Tensor:
        if layout is not None and layout.world > 1:
            self._pending.setdefault(layout.group, []).append(partial)
        return partial

    def finish(self) -> None:
        import torch.distributed as dist

        for group, partials in self._pending.items():
            dtype = torch.float64 if any(p.dtype == torch.float64 for p in partials) else torch.float32
            flat = torch.cat([p.reshape(-1).to(dtype) for p in partials])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            offset = 0
            for p in partials:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        self._pending.clear()

    @property
    def collectives(self) -> int:
        """All-reduces ``finish()`` will issue (one per process group)."""
        return len(self._pending)


def global_count(count: torch.Tensor) -> torch.Tensor:
    """Sum a count over every rank of the default process group (no-op on one process).

    Used for non-finite values: a NaN on one rank must be seen by all, and a
    SUM of counts survives where gloo's MIN/MAX of floats would drop NaN.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        count = count.clone()
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return count

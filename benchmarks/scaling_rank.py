"""Per-rank wrapper around ``leantrain train`` for ``benchmarks/scaling.py`` (not meant to be run by hand).

    accelerate launch --config_file launch/accelerate/<engine>.yaml --num_processes N \\
        benchmarks/scaling_rank.py RECIPE.yaml [overrides...]      (SCALING_RANK_OUT=DIR in the environment)

Before anything imports DeepSpeed or FSDP2 it wraps the tensor collectives of
``torch.distributed`` (both the public names and ``distributed_c10d``'s, which
is where ``all_gather_object`` and friends look them up), so every engine's
traffic is counted whichever layer issued it: DeepSpeed's ``deepspeed.comm``
(TorchBackend), FSDP2's ``all_gather_single``/``reduce_scatter_single``,
accelerate's reduce and leantrain's replicated-state averaging. A call counts
the bytes of its input tensor(s) (numel × element_size) on this rank; a
collective implemented through another wrapped one (``all_gather_into_tensor``
→ ``all_gather_single``) counts once, at the outermost call. DDP's own C++
reducer and its start-up ``_broadcast_coalesced`` bypass Python and are not
seen; with ``accumulation.mode: exact`` every DDP backward runs under
``no_sync``, so the reducer sends nothing in the measured updates.

It also snapshots the counters, a clock, this process's CPU time and the
machine's busy CPU ticks (``/proc/stat``) after every optimizer update (the
trainer's ``_boundary``), so start-up and final-save traffic can be left out
and the CPU time other processes took during the timed updates can be told.
At exit it writes ``$SCALING_RANK_OUT/rank<R>.json``: ``ru_maxrss`` (this
process's peak RSS), the counters (total and per update) and the exit code.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from collections import defaultdict

# name -> function(args, kwargs) -> input bytes of one call
_TENSOR = lambda t: t.numel() * t.element_size() if t is not None else 0  # noqa: E731
_TENSORS = lambda ts: sum(_TENSOR(t) for t in ts) if ts is not None else 0  # noqa: E731


def _arg(args, kwargs, index, *names):
    if len(args) > index:
        return args[index]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return None


INPUT_BYTES = {
    "all_reduce": lambda a, k: _TENSOR(_arg(a, k, 0, "tensor")),
    "broadcast": lambda a, k: _TENSOR(_arg(a, k, 0, "tensor")),
    "reduce": lambda a, k: _TENSOR(_arg(a, k, 0, "tensor")),
    "all_gather": lambda a, k: _TENSOR(_arg(a, k, 1, "tensor")),
    "all_gather_single": lambda a, k: _TENSOR(_arg(a, k, 1, "input_tensor", "input")),
    "all_gather_into_tensor": lambda a, k: _TENSOR(_arg(a, k, 1, "input_tensor")),
    "_all_gather_base": lambda a, k: _TENSOR(_arg(a, k, 1, "input_tensor")),
    "all_gather_coalesced": lambda a, k: _TENSORS(_arg(a, k, 1, "input_tensor_list")),
    "_all_gather_base_coalesced": lambda a, k: _TENSORS(_arg(a, k, 1, "input_tensors")),
    "reduce_scatter": lambda a, k: _TENSORS(_arg(a, k, 1, "input_list")),
    "reduce_scatter_single": lambda a, k: _TENSOR(_arg(a, k, 1, "input")),
    "reduce_scatter_tensor": lambda a, k: _TENSOR(_arg(a, k, 1, "input")),
    "_reduce_scatter_base": lambda a, k: _TENSOR(_arg(a, k, 1, "input")),
    "all_reduce_coalesced": lambda a, k: _TENSORS(_arg(a, k, 0, "tensors")),
    "all_to_all_single": lambda a, k: _TENSOR(_arg(a, k, 1, "input")),
    "all_to_all": lambda a, k: _TENSORS(_arg(a, k, 1, "input_tensor_list")),
    "gather": lambda a, k: _TENSOR(_arg(a, k, 0, "tensor")),
    "scatter": lambda a, k: _TENSORS(_arg(a, k, 1, "scatter_list")),
}

BYTES: dict[str, int] = defaultdict(int)
CALLS: dict[str, int] = defaultdict(int)
_depth = threading.local()


def _wrap(name, fn):
    measure = INPUT_BYTES[name]

    def counted(*args, **kwargs):
        outer = getattr(_depth, "n", 0) == 0
        if outer:
            try:
                BYTES[name] += measure(args, kwargs)
            except Exception:  # noqa: BLE001 - an odd call shape must not break the run; counted as a call
                pass
            CALLS[name] += 1
        _depth.n = getattr(_depth, "n", 0) + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _depth.n -= 1

    counted.__wrapped__ = fn
    counted.__name__ = getattr(fn, "__name__", name)
    counted.__qualname__ = getattr(fn, "__qualname__", name)
    counted.__doc__ = getattr(fn, "__doc__", None)
    return counted


def install_counters() -> list[str]:
    """Wrap every collective in INPUT_BYTES that this torch has; returns the names wrapped."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    wrapped = []
    for name in INPUT_BYTES:
        original = getattr(c10d, name, None) or getattr(dist, name, None)
        if original is None:
            continue
        counted = _wrap(name, original)
        for module in (c10d, dist):
            if getattr(module, name, None) is original:
                setattr(module, name, counted)
        wrapped.append(name)
    return wrapped


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine since boot, /proc/stat (steal counts as busy)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def main() -> int:
    out = os.environ["SCALING_RANK_OUT"]
    rank = int(os.environ.get("RANK", "0") or 0)
    wrapped = install_counters()
    from leantrain.trainer import loop
    from leantrain.trainer.cli import main as cli_main

    updates: list[dict] = []
    original_boundary = loop.Trainer._boundary

    def boundary(self, update, *args, **kwargs):
        values = original_boundary(self, update, *args, **kwargs)
        inner = getattr(self.engine, "inner_optimizer", None)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        busy, total = cpu_ticks()
        updates.append({"update": update, "t": time.perf_counter(), "bytes": dict(BYTES), "calls": dict(CALLS),
                        "cpu_s": usage.ru_utime + usage.ru_stime, "machine_busy_ticks": busy,
                        "machine_total_ticks": total,
                        "optimizer_communicated_bytes": getattr(inner, "communicated_bytes", None)})
        return values

    loop.Trainer._boundary = boundary
    t0, rc, error = time.perf_counter(), 1, None
    try:
        rc = cli_main(["train", *sys.argv[1:]])
    except BaseException as err:  # noqa: BLE001 - recorded, then re-raised
        error = f"{type(err).__name__}: {err}"
        raise
    finally:
        record = {
            "rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1), "exit_code": rc, "error": error,
            "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "threads": __import__("torch").get_num_threads(), "wall_s": time.perf_counter() - t0,
            "leantrain_trainer": os.path.dirname(loop.__file__), "wrapped": wrapped, "total_bytes": dict(BYTES), "total_calls": dict(CALLS), "updates": updates,
        }
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(record, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""Time one optimizer step on GPT-2-small-shaped parameters against torch and transformers.

    python benchmarks/optim_step.py [--repeats 7] [--device cpu|cuda] [--scale 1.0]

Measures, in one process on one parameter set (124.4M fp32 parameters at scale 1,
fixed seed, random ``.grad``):

* the median wall-clock time of one ``step()`` (after 2 warm-up steps) for
  torch's AdamW (fused, foreach) and Adafactor (foreach, loop), transformers'
  Adafactor (beta1 None and 0.9) and leantrain's AdamW and AdaFactor;
* with ``accum_steps=8``, leantrain's three kinds of micro-step call: the
  first of a cycle (also decays the moments), a plain fold (positions
  1..k-2) and the boundary (folds, then updates the parameters); for AdamW
  also with ``compiled=True`` (its first cycle, compile included, is timed
  separately);
* copy bandwidth (``dst.copy_(src)`` over a buffer as large as the model),
  timed before each step, and per peer the roofline: the bytes its step must
  move at the least, divided by the bandwidth its steps saw.

Prints a table and the performance targets, and writes
``benchmarks/results/optim_step.json`` (every sample) and ``optim_step.md``.
``--scale 0.1`` shrinks widths and vocabulary for a smoke run (~1% of the
parameters).

On a shared VM, speed drifts in phases (seen here: 5× for minutes, hitting
compute-bound reductions harder than the copy probe). Peers run one after
another, so a ratio between two rows holds only if both ran in the same
phase: compare each row's copy GB/s, and rerun to see the spread.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers.optimization import Adafactor as HFAdafactor

import leantrain.optim as lt

RESULTS = Path(__file__).parent / "results"
ACCUM_STEPS = 8
WARMUP = 2
F32 = 4  # bytes per element; every tensor here is fp32

# Byte models: 4-byte words each step must move per parameter, at the least
# (one read or one write of a full-size tensor = 1 word). Lower bounds: each
# full-size tensor is read once per pass a data dependence forces, nothing is
# read twice within a pass, temporaries are free, and R/C/1-D statistics are
# ignored (the 1-D tensors, 0.1% of the elements, are counted as if factored,
# which undercounts their unfactored v: the bound stays a lower bound).
ADAMW_UPDATE = 7  # read p, g, m, v; write p, m, v (torch's fused kernel: one pass)
ADAMW_FOLD = 5  # read g, m, v; write m, v; the first-of-cycle decay fuses into the same pass
# AdaFactor's update clip needs RMS(U) of the whole tensor before any element
# of θ can be written, and U needs R, C from all of g: three passes over g.
#   pass 1 read g (R, C) and p (RMS(θ) for lr_t)   2
#   pass 2 read g (RMS(U))                          1
#   pass 3 read g, p; write p                       3
ADAFACTOR = 6
ADAFACTOR_UPDATE_MOMENTUM = ADAFACTOR + 2  # pass 3 also reads and writes m = β1·m + (1-β1)·lr_t·U
# momentum_on="grad": pass 1 reads g, m, p, writes m (fold and RMS(θ)); pass 2
# reads m (RMS(U)); pass 3 reads m, p and writes p. Same count with k = 1 and
# at a k > 1 boundary (the boundary folds its own micro-batch first).
ADAFACTOR_GRAD_MOMENTUM = 8
ADAFACTOR_FOLD = 3  # read g, m; write m; R, C come from the g already read


def gpt2_shapes(scale: float) -> dict[str, tuple[int, ...]]:
    """GPT-2 small's parameter shapes (transformers' Conv1D layout: in × out)."""
    d = max(8, round(768 * scale))
    vocab, ctx = max(16, round(50257 * scale)), max(8, round(1024 * scale))
    shapes = {"wte": (vocab, d), "wpe": (ctx, d)}
    for i in range(12):
        for name, shape in {
            "ln_1.weight": (d,), "ln_1.bias": (d,),
            "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
            "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
            "ln_2.weight": (d,), "ln_2.bias": (d,),
            "mlp.c_fc.weight": (d, 4 * d), "mlp.c_fc.bias": (4 * d,),
            "mlp.c_proj.weight": (4 * d, d), "mlp.c_proj.bias": (d,),
        }.items():
            shapes[f"h.{i}.{name}"] = shape
    shapes["ln_f.weight"] = shapes["ln_f.bias"] = (d,)
    return shapes


def make_base(shapes, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(s, generator=gen).mul_(0.02).to(device), torch.randn(s, generator=gen).mul_(1e-3).to(device))
        for s in shapes.values()
    ]


def fresh(base) -> list[torch.Tensor]:
    """A private copy per peer (+1× model of memory), so no peer sees another's updated weights."""
    params = []
    for p0, g0 in base:
        p = p0.clone().requires_grad_()
        p.grad = g0.clone()
        params.append(p)
    return params


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()  # a host sync, so queued kernels are not charged to the next call
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


class CopyProbe:
    """Bytes/s of one dst.copy_(src) over a model-sized buffer, counted as 2×4×N (read + write).

    Timed right before every step: this VM shares its memory bus, and copy
    bandwidth swings 11-53 GB/s within a minute in phases of seconds, so each
    peer's roofline uses the bandwidth its own steps saw (cost: 2× model of
    memory held for the run, one extra copy per sample). On a CPU the copy's
    write first reads dst's lines (write-allocate), traffic the 2×4×N leaves
    out; an in-place update such as AdamW's has already read what it writes,
    so it can beat this roofline (measured / roofline below 1).
    """

    def __init__(self, numel: int, device) -> None:
        self.src = torch.randn(numel, device=device)
        self.dst = torch.zeros_like(self.src)
        self.device = device

    def __call__(self) -> float:
        return 2 * F32 * self.src.numel() / timed(lambda: self.dst.copy_(self.src), self.device)


# name, family, factory, words/param. Family picks the torch baseline of the ratio column.
PEERS = [
    ("torch AdamW fused", "adamw", lambda p: torch.optim.AdamW(p, fused=True), ADAMW_UPDATE),
    ("torch AdamW foreach", "adamw", lambda p: torch.optim.AdamW(p, foreach=True), ADAMW_UPDATE),
    ("torch Adafactor foreach", "adafactor", lambda p: torch.optim.Adafactor(p, foreach=True), ADAFACTOR),
    ("torch Adafactor loop", "adafactor", lambda p: torch.optim.Adafactor(p, foreach=False), ADAFACTOR),
    ("HF Adafactor beta1=None", "adafactor", lambda p: HFAdafactor(
        p, lr=None, beta1=None, relative_step=True, scale_parameter=True, warmup_init=False), ADAFACTOR),
    ("HF Adafactor beta1=0.9", "adafactor", lambda p: HFAdafactor(
        p, lr=None, beta1=0.9, relative_step=True, scale_parameter=True, warmup_init=False),
     ADAFACTOR_UPDATE_MOMENTUM),
    ("ours AdamW", "adamw", lambda p: lt.AdamW(p), ADAMW_UPDATE),
    ("ours AdaFactor", "adafactor", lambda p: lt.AdaFactor(p), ADAFACTOR),
    ("ours AdaFactor b1=0.9 update", "adafactor", lambda p: lt.AdaFactor(p, beta1=0.9), ADAFACTOR_UPDATE_MOMENTUM),
    ("ours AdaFactor b1=0.9 grad", "adafactor",
     lambda p: lt.AdaFactor(p, beta1=0.9, momentum_on="grad"), ADAFACTOR_GRAD_MOMENTUM),
]
# Accumulating peers: factory and words/param of (first-of-cycle, fold, boundary) calls.
ACCUM_PEERS = [
    ("ours AdamW k=8", "adamw", lambda p: lt.AdamW(p, accum_steps=ACCUM_STEPS),
     (ADAMW_FOLD, ADAMW_FOLD, ADAMW_UPDATE)),
    ("ours AdamW compiled k=8", "adamw", lambda p: lt.AdamW(p, accum_steps=ACCUM_STEPS, compiled=True),
     (ADAMW_FOLD, ADAMW_FOLD, ADAMW_UPDATE)),
    ("ours AdaFactor b1=0.9 grad k=8", "adafactor",
     lambda p: lt.AdaFactor(p, beta1=0.9, momentum_on="grad", accum_steps=ACCUM_STEPS),
     (ADAFACTOR_FOLD, ADAFACTOR_FOLD, ADAFACTOR_GRAD_MOMENTUM)),
]
CALL_KINDS = ("first", "fold", "boundary")


def time_step(factory, base, device, repeats, probe) -> list[tuple[float, float]]:
    """(seconds, copy bytes/s just before) per step."""
    params = fresh(base)
    opt = factory(params)
    for _ in range(WARMUP):  # the first call also allocates the state
        opt.step()
    return [(probe(), timed(opt.step, device))[::-1] for _ in range(repeats)]


def time_accum(factory, base, device, repeats, probe) -> tuple[dict[str, list[tuple[float, float]]], float]:
    """Samples of each micro-step kind (one cycle per repeat gives 1 first, k-2 folds, 1 boundary), and the
    seconds of the first cycle (state allocation, and the compile of a compiled update)."""
    params = fresh(base)
    opt = factory(params)
    samples = {kind: [] for kind in CALL_KINDS}
    start = time.perf_counter()
    opt.step()
    for _ in range(ACCUM_STEPS - 1):
        opt.step()
    first_cycle = time.perf_counter() - start
    for cycle in range(1, WARMUP + repeats):
        for _ in range(ACCUM_STEPS):
            j = opt.micro_step % ACCUM_STEPS
            kind = "first" if j == 0 else "boundary" if j == ACCUM_STEPS - 1 else "fold"
            bandwidth = probe()
            seconds = timed(opt.step, device)
            if opt.updated != (kind == "boundary"):
                raise RuntimeError(f"{type(opt).__name__}: updated={opt.updated} at cycle position {j}")
            if cycle >= WARMUP:
                samples[kind].append((seconds, bandwidth))
    return samples, first_cycle


def run(args) -> dict:
    device = torch.device(args.device)
    shapes = gpt2_shapes(args.scale)
    numel = sum(torch.Size(s).numel() for s in shapes.values())
    probe = CopyProbe(numel, device)
    for _ in range(WARMUP):
        probe()
    base = make_base(shapes, device)
    rows = []

    def add(name, family, samples, words, first_cycle_s=None):
        ms = 1e3 * statistics.median(s for s, _ in samples)
        bandwidth = statistics.median(b for _, b in samples)
        roof = 1e3 * words * F32 * numel / bandwidth
        rows.append(dict(peer=name, family=family, median_ms=ms, bytes_per_param=words * F32, first_cycle_s=first_cycle_s,
                         copy_GBps=bandwidth / 1e9, roofline_ms=roof, vs_roofline=ms / roof,
                         samples_ms=[1e3 * s for s, _ in samples], samples_copy_GBps=[b / 1e9 for _, b in samples]))
        print(f"  {name:<40} {ms:9.2f} ms   copy {bandwidth / 1e9:5.1f} GB/s", flush=True)

    for name, family, factory, words in PEERS:
        add(name, family, time_step(factory, base, device, args.repeats, probe), words)
        gc.collect()  # free this peer's params, grads and state (~1-2 GB at scale 1) before the next
    for name, family, factory, words in ACCUM_PEERS:
        samples, first_cycle = time_accum(factory, base, device, args.repeats, probe)
        for kind, kind_words in zip(CALL_KINDS, words):
            add(f"{name} {kind}", family, samples[kind], kind_words, first_cycle if kind == "first" else None)
        gc.collect()

    best = {fam: min(r["median_ms"] for r in rows if r["peer"].startswith("torch") and r["family"] == fam)
            for fam in ("adamw", "adafactor")}
    for r in rows:
        r["vs_torch_best"] = r["median_ms"] / best[r["family"]]
    by_name = {r["peer"]: r for r in rows}
    targets = [
        ("ours AdamW (k=1) <= 1.2x torch's fastest AdamW",
         by_name["ours AdamW"]["vs_torch_best"], 1.2),
        ("ours AdaFactor (beta1=None) <= 0.5x torch's fastest Adafactor",
         by_name["ours AdaFactor"]["vs_torch_best"], 0.5),
        ("AdamW k=8 fold <= 2x its roofline",
         by_name["ours AdamW k=8 fold"]["vs_roofline"], 2.0),
        ("AdaFactor grad-momentum k=8 fold <= 2x its roofline",
         by_name["ours AdaFactor b1=0.9 grad k=8 fold"]["vs_roofline"], 2.0),
        ("ours AdaFactor step <= 1.0x torch's foreach Adafactor",
         by_name["ours AdaFactor"]["median_ms"] / by_name["torch Adafactor foreach"]["median_ms"], 1.0),
        ("AdamW k=8 boundary <= 1.3x torch's fused AdamW step",
         by_name["ours AdamW k=8 boundary"]["median_ms"] / by_name["torch AdamW fused"]["median_ms"], 1.3),
        ("AdamW compiled k=8 boundary <= 1.3x torch's fused AdamW step",
         by_name["ours AdamW compiled k=8 boundary"]["median_ms"] / by_name["torch AdamW fused"]["median_ms"], 1.3),
    ]
    return dict(
        command=f"benchmarks/optim_step.py --repeats {args.repeats} --device {args.device} --scale {args.scale}",
        numel=numel, tensors=len(shapes),
        copy_GBps_range=[min(b for r in rows for b in r["samples_copy_GBps"]),
                         max(b for r in rows for b in r["samples_copy_GBps"])],
        warmup=WARMUP, repeats=args.repeats, accum_steps=ACCUM_STEPS, rows=rows,
        targets=[dict(target=t, value=v, limit=lim, met=v <= lim) for t, v, lim in targets],
        torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads(),
        device=str(device), device_name=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        platform=platform.platform(), machine=platform.machine(), python=platform.python_version(),
    )


def markdown(res: dict) -> str:
    lines = [
        f"# optim_step: one step on {res['numel'] / 1e6:.1f}M fp32 params ({res['device']}, "
        f"{res['threads']} threads, torch {res['torch']})",
        "",
        f"Command: `{res['command']}`; median of {res['repeats']} after {res['warmup']} warm-up steps; "
        "roofline = bytes / copy bandwidth, median of a copy timed before each of the peer's steps "
        "(range this run: {:.1f}-{:.1f} GB/s).".format(*res["copy_GBps_range"]),
        "",
        "The first-cycle column is the wall time of an accumulating peer's first k micro-steps: state "
        "allocation and, for the compiled peer, torch.compile (inductor's on-disk cache shortens later processes).",
        "",
        "| peer | median ms | / torch best | B/param | copy GB/s | roofline ms | measured / roofline | first cycle s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        first = "" if r.get("first_cycle_s") is None else f"{r['first_cycle_s']:.1f}"
        lines.append(f"| {r['peer']} | {r['median_ms']:.2f} | {r['vs_torch_best']:.2f}× ({r['family']}) | "
                     f"{r['bytes_per_param']} | {r['copy_GBps']:.1f} | {r['roofline_ms']:.2f} | {r['vs_roofline']:.2f} "
                     f"| {first} |")
    lines += ["", "| target | value | limit | met |", "|---|---:|---:|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {t['value']:.2f} | {t['limit']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies width, vocabulary and context")
    args = parser.parse_args()
    res = run(args)
    table = markdown(res)
    print("\n" + table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "optim_step.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / "optim_step.md").write_text(table)


if __name__ == "__main__":
    main()

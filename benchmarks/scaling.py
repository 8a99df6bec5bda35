"""Per-rank memory, optimizer state, communication and time per update: every engine on 1 and 2 ranks.

    python benchmarks/scaling.py [--repeats 1] [--updates 4] [--out benchmarks/results]
                                 [--engines ddp,fsdp2,zero1,zero2,zero3] [--ranks 1,2] [--size default|tiny]
                                 [--code-ref HEAD] [--wait-idle 10] [--timeout 600] [--keep]

One recipe for every run: a GPT-2-shaped model (``--size default``: 6 layers,
n_embd 512, 8 heads, 128 positions, an 8192-token byte-level BPE trained on
the built-in ``python-docs`` corpus; about 23M parameters, wte/lm_head tied),
random init saved once so every run starts from the same weights, fp32,
leantrain AdamW, ``accumulation: {mode: exact, steps: 4, fused: false}``
(fused is refused under DeepSpeed, so it is off everywhere), ``python-docs``
packed into blocks of 128 tokens, no eval, no checkpoints, ``--updates``
updates. The global batch is the same for every run: 4 sequences per
micro-step over all ranks (micro_batch_size 4 on 1 rank, 2 on 2 ranks), so
2048 tokens per update.

Each (engine, ranks) runs as ``python -m accelerate.commands.launch
--config_file launch/accelerate/<engine>.yaml --num_processes N ...
benchmarks/scaling_rank.py RECIPE.yaml overrides`` from the repository root
(gloo on this CPU machine), with ``OMP_NUM_THREADS = cores // N`` so 1 and 2
ranks use the same cores. ``scaling_rank.py`` wraps ``torch.distributed``'s
collectives before the trainer starts and writes each rank's peak RSS
(``ru_maxrss``) and the bytes its collectives sent (input numel × element
size per call), snapshotted after every optimizer update.

Per row:

* optimizer state bytes per rank: ``run_info.json`` (rank 0);
* peak RSS per rank: ``ru_maxrss`` of each rank process (the whole process:
  Python/torch/transformers/DeepSpeed runtime included);
* bytes communicated per update per rank: the counters' growth from the end of
  update 1 to the end of the last update, divided by the updates in between
  (start-up, the first update and the final save are left out);
* time per update: ``tokens / tokens_per_s`` of each update in
  ``metrics.jsonl``, median over updates 2..N (update 1 is warm-up);
* other load: the CPU time processes other than the run's ranks took while
  updates 2..N ran, in cores (``/proc/stat`` busy time minus the ranks' own
  CPU time, over the wall time), to tell a slow run from a shared machine;
* ratios to the 1-rank ``ddp`` run (the single-process baseline).

Every (engine, ranks) runs ``--repeats`` times, interleaved; the table shows
medians over the repeats. Each launch first waits (at most ``--wait-idle``
seconds) for a >= 90% idle CPU. ``--code-ref HEAD`` runs leantrain as
committed (``git archive`` into the temporary folder, first on PYTHONPATH),
for a working tree that others are editing. The full default run takes about
5–9 minutes on 2 cores and needs about 3.5 GiB of RAM at once. A failed run is reported in the table with its
error line. Writes ``scaling.json`` (every run, every rank, per-op counters),
``scaling.md`` and ``scaling.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _runs import CODE_DIRS, export_code, wait_for_idle

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "launch" / "accelerate"
WRAPPER = Path(__file__).resolve().parent / "scaling_rank.py"
ENGINES = ["ddp", "fsdp2", "zero1", "zero2", "zero3"]
BASELINE = ("ddp", 1)
K = 4
SEQ = 128
GLOBAL_MICRO = 4  # sequences per micro-step over all ranks
LR = 1e-3
SIZES = {  # GPT-2-shaped models; default is the measured one, tiny a smoke run
    "default": dict(n_layer=6, n_embd=512, n_head=8, vocab=8192),
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, vocab=512),
}


# ------------------------------------------------------------------ setup
def build_model_dir(root: Path, size: str) -> dict:
    """A random-init GPT-2 (fixed seed) saved with a BPE tokenizer trained on python-docs."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from leantrain.trainer.data import python_docs_paragraphs
    from leantrain.trainer.tokenizer import train_bpe

    dims = SIZES[size]
    tokenizer = train_bpe(python_docs_paragraphs(), dims["vocab"])
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=SEQ, n_embd=dims["n_embd"], n_layer=dims["n_layer"],
                        n_head=dims["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    path = root / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())  # tied wte/lm_head counted once
    return dict(path=str(path), parameters=params, vocab_size=len(tokenizer), **{k: dims[k] for k in
                                                                                    ("n_layer", "n_embd", "n_head")})


def write_recipe(root: Path, model_dir: str, updates: int) -> Path:
    import yaml

    recipe = {
        "model": {"name_or_path": model_dir, "task": "causal-lm", "dtype": "float32"},
        "data": {"builtin": "python-docs", "eval_split": None, "packing": True, "max_length": SEQ,
                 "micro_batch_size": GLOBAL_MICRO},
        "optimizer": {"name": "AdamW", "lr": LR},
        "accumulation": {"steps": K, "mode": "exact", "fused": False},
        "checkpointing": {"every_updates": None, "resume": "never"},
        "precision": "fp32",
        "max_updates": updates,
        "seed": 0,
        "output_dir": str(root / "unused"),
    }
    path = root / "scaling.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_line(stderr: str, stdout: str, rank_records: list[dict]) -> str:
    """The most telling line of a failed launch: leantrain's one-line error, a rank's exception, else the
    last exception line that is not the launcher's own ChildFailedError."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line).strip() for line in (stderr + "\n" + stdout).splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if line.startswith("leantrain: error:"):
            return line
    for record in rank_records:
        if record.get("error"):
            return f"rank {record['rank']}: {record['error']}"[:400]
    exc = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line) and "ChildFailedError" not in line]
    return (exc[-1] if exc else lines[-1] if lines else "no output")[:400]


def code_info(ref: str | None) -> dict:
    """Which leantrain code ran: a git ref's export, or the working tree (with its uncommitted changes)."""
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    if ref:
        return dict(source=f"git archive {ref}", commit=git("rev-parse", ref))
    dirty = git("status", "--porcelain", "--", *CODE_DIRS).splitlines()
    return dict(source="working tree", head=git("rev-parse", "HEAD"), uncommitted=dirty)


# -------------------------------------------------------------------- runs
def run_one(engine: str, ranks: int, repeat: int, recipe: Path, root: Path, timeout: float,
            code: Path | None, wait_idle: float) -> dict:
    out = root / f"{engine}-{ranks}-r{repeat}"
    rank_dir = out / "ranks"
    micro = GLOBAL_MICRO // ranks
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{engine}.yaml"),
           "--num_processes", str(ranks), "--main_process_port", str(free_port()), str(WRAPPER), str(recipe),
           f"output_dir={out}", f"data.micro_batch_size={micro}"]
    threads = max(1, (os.cpu_count() or 1) // ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "SCALING_RANK_OUT": str(rank_dir),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])])
    idle = wait_for_idle(wait_idle)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a hung launch is ended as a whole
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += f"\ntimed out after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    row = dict(engine=engine, ranks=ranks, repeat=repeat, micro_batch_size=micro, omp_threads=threads,
               wall_s=wall, exit_code=proc.returncode, cpu_idle_before=idle, command=" ".join(cmd))
    rank_files = sorted(rank_dir.glob("rank*.json"))
    row["rank_records"] = [json.loads(p.read_text()) for p in rank_files]
    if proc.returncode != 0 or not (out / "metrics.jsonl").exists():
        row["error"] = error_line(stderr, stdout, row["rank_records"])
        row["stderr_tail"] = stderr[-6000:]
        return row
    info = json.loads((out / "run_info.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    row.update(run_info=info, metrics=metrics)
    row["update_seconds"] = [m["tokens"] / m["tokens_per_s"] for m in metrics]
    timed = row["update_seconds"][1:] or row["update_seconds"]
    row["s_per_update"] = statistics.median(timed)
    row["peak_rss_mib_per_rank"] = [r["ru_maxrss_kib"] / 1024 for r in row["rank_records"]]
    comm, per_op = [], []
    for r in row["rank_records"]:
        ups = r["updates"]
        if len(ups) < 2:
            comm.append(None)
            per_op.append({})
            continue
        first, last, n = ups[0], ups[-1], len(ups) - 1
        ops = {op: (last["bytes"].get(op, 0) - first["bytes"].get(op, 0)) / n for op in last["bytes"]}
        calls = {op: (last["calls"].get(op, 0) - first["calls"].get(op, 0)) / n for op in last["calls"]}
        comm.append(sum(ops.values()))
        reported = (first["optimizer_communicated_bytes"], last["optimizer_communicated_bytes"])
        if None not in reported:  # leantrain's own count of its replicated-state averaging (DDP), a cross-check
            row.setdefault("optimizer_reported_bytes_per_update", []).append((reported[1] - reported[0]) / n)
        per_op.append({op: {"bytes": ops[op], "calls": calls.get(op, 0)} for op in ops if calls.get(op, 0)})
    row["comm_bytes_per_update_per_rank"] = comm
    row["other_load_cores"] = other_load(row["rank_records"])
    row["comm_per_op_per_update"] = per_op
    if row["rank_records"] and len(row["rank_records"]) != ranks:
        row["warning"] = f"{len(row['rank_records'])} rank records for {ranks} ranks"
    return row


def other_load(records: list[dict]) -> float | None:
    """Cores' worth of CPU time that processes other than this run's ranks took while updates 2..N ran:
    (machine busy time − the ranks' own CPU time) / wall time, from the per-update snapshots."""
    if not records or any(len(r["updates"]) < 2 for r in records):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    first, last = records[0]["updates"][0], records[0]["updates"][-1]
    wall = last["t"] - first["t"]
    busy = (last["machine_busy_ticks"] - first["machine_busy_ticks"]) / tick
    ours = sum(r["updates"][-1]["cpu_s"] - r["updates"][0]["cpu_s"] for r in records)
    return max(0.0, busy - ours) / wall if wall > 0 else None


def summarise(engine: str, ranks: int, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    base = dict(engine=engine, ranks=ranks, micro_batch_size=GLOBAL_MICRO // ranks, runs=len(runs), ok_runs=len(ok))
    if not ok:
        return dict(base, error=runs[-1]["error"])
    med = statistics.median
    info = ok[0]["run_info"]
    n_ranks = len(ok[0]["peak_rss_mib_per_rank"])
    peaks = [med(r["peak_rss_mib_per_rank"][i] for r in ok) for i in range(n_ranks)]
    comm = [med(r["comm_bytes_per_update_per_rank"][i] for r in ok) for i in range(n_ranks)
            if all(r["comm_bytes_per_update_per_rank"][i] is not None for r in ok)]
    return dict(base, run_engine=info["engine"], world_size=info["world_size"],
                parameters=info["parameters"], parameters_per_rank=info["parameters_per_rank"],
                optimizer_state_bytes_per_rank=info["optimizer_state_bytes_per_rank"],
                peak_rss_mib_per_rank=peaks, peak_rss_mib_max=max(peaks),
                comm_bytes_per_update_per_rank=comm, comm_bytes_per_update_max=max(comm) if comm else None,
                comm_per_op_per_update_rank0=ok[0]["comm_per_op_per_update"][0] if ok[0]["comm_per_op_per_update"] else {},
                s_per_update=med(r["s_per_update"] for r in ok),
                s_per_update_each_run=[r["s_per_update"] for r in ok],
                cpu_idle_before=med(r["cpu_idle_before"] for r in ok),
                other_load_cores=med(r["other_load_cores"] for r in ok) if all(
                    r["other_load_cores"] is not None for r in ok) else None,
                optimizer_reported_bytes_per_update=ok[0].get("optimizer_reported_bytes_per_update"),
                final_loss=med(r["metrics"][-1]["loss"] for r in ok),
                wall_s=med(r["wall_s"] for r in ok))


# ------------------------------------------------------------------ output
def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return dict(cpu=cpu, cores=os.cpu_count(), mem_gib=round(mem / 2**20, 1), platform=platform.platform(),
                python=platform.python_version())


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "accelerate", "deepspeed"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _ratio(value, base, digits=2):
    return f"{value / base:.{digits}f}" if value is not None and base else "–"


def _load(row: dict) -> str:
    return "–" if row.get("other_load_cores") is None else f"{row['other_load_cores']:.2f}"


def markdown(res: dict) -> str:
    rows = res["rows"]
    base = next((r for r in rows if (r["engine"], r["ranks"]) == BASELINE and "error" not in r), None)
    m, v, model = res["machine"], res["versions"], res["model"]
    params = model["parameters"]
    mib = 2**20
    lines = [
        "# Scaling: per-rank memory, optimizer state, communication and time per update, 1 vs 2 ranks", "",
        f"`{res['command']}`", "",
        f"Machine: {m['cpu']}, {m['cores']} CPU cores, {m['mem_gib']} GiB RAM, no GPU; torch.distributed over "
        f"gloo. torch {v['torch']}, transformers {v['transformers']}, accelerate {v['accelerate']}, "
        f"deepspeed {v['deepspeed']}. Total benchmark time {res['elapsed_s'] / 60:.1f} min.", "",
        "leantrain code: " + (f"`{res['code']['source']}` = {res['code']['commit'][:10]} (exported to a temporary "
                              "folder first on PYTHONPATH; the working tree's uncommitted edits not included)"
                              if "commit" in res["code"] else
                              f"working tree at {res['code']['head'][:10]}"
                              + (f" with uncommitted changes in {len(res['code']['uncommitted'])} file(s)"
                                 if res["code"]["uncommitted"] else "")) + ".", "",
        f"Model: GPT-2-shaped, {model['n_layer']} layers, n_embd {model['n_embd']}, {model['n_head']} heads, "
        f"{SEQ} positions, vocabulary {model['vocab_size']} (byte-level BPE trained on python-docs), "
        f"**{params:,} parameters** (wte/lm_head tied), random init from one saved checkpoint, fp32. "
        f"Recipe: leantrain AdamW (lr {LR:g}), `accumulation: {{mode: exact, steps: {K}, fused: false}}`, "
        f"`data.builtin: python-docs` packed into {SEQ}-token blocks, no eval, no checkpoints, "
        f"{res['updates']} updates. Same global batch for every run: {GLOBAL_MICRO} sequences per micro-step "
        f"over all ranks (micro_batch_size {GLOBAL_MICRO} on 1 rank, {GLOBAL_MICRO // 2} on 2) × k={K} = "
        f"{GLOBAL_MICRO * K * SEQ} tokens per update. Launched with `python -m accelerate.commands.launch "
        "--config_file launch/accelerate/<engine>.yaml --num_processes N` around `benchmarks/scaling_rank.py`, "
        f"OMP_NUM_THREADS = {m['cores']} // N.", "",
        "Columns: optimizer state from `run_info.json`; peak RSS = each rank process's `ru_maxrss` "
        "(the whole process, runtime included), \"max\" over the ranks, every rank in brackets; comm = bytes "
        "given to torch.distributed collectives per update per rank (input tensor numel × element size per "
        "call: an all-gather counts its local shard, a reduce-scatter the full input), counted from the end of "
        "update 1 to the end of the last update (start-up and the final save excluded), max over the ranks; "
        "B/param = comm / parameters; time per update = median of `tokens / tokens_per_s` over updates "
        f"2..{res['updates']}; other load = CPU time other processes took while updates 2..{res['updates']} "
        f"ran, in cores (machine busy time from /proc/stat minus the ranks' own CPU time, over the wall time; "
        f"0 = the run had the {res['machine']['cores']} cores to itself; each launch first waits up to "
        f"{res['wait_idle']:g} s for a >= 90% idle CPU). Every figure is the median over {res['repeats']} run(s) of that row; "
        "× = ratio to the 1-rank `ddp` run (the single-process baseline).", "",
        "| engine | ranks | micro-batch | opt. state MiB/rank | × | params/rank | peak RSS MiB/rank, max [each] | × "
        "| comm MiB/update/rank | comm B/param | s/update | × | other load, cores | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['ranks']} | {r['micro_batch_size']} | failed: "
                         f"{r['error'].replace('|', '/')} | | | | | | | | | | |")
            continue
        b = base or {}
        state = r["optimizer_state_bytes_per_rank"]
        peaks = " / ".join(f"{p:.0f}" for p in r["peak_rss_mib_per_rank"])
        comm = r["comm_bytes_per_update_max"]
        lines.append(
            f"| {r['run_engine']} | {r['ranks']} | {r['micro_batch_size']} | {state / mib:.1f} | "
            f"{_ratio(state, b.get('optimizer_state_bytes_per_rank'))} | {r['parameters_per_rank']:,} | "
            f"{r['peak_rss_mib_max']:.0f} [{peaks}] | {_ratio(r['peak_rss_mib_max'], b.get('peak_rss_mib_max'))} | "
            f"{comm / mib:.1f} | {comm / r['parameters']:.2f} | {r['s_per_update']:.2f} | "
            f"{_ratio(r['s_per_update'], b.get('s_per_update'))} | {_load(r)} | {r['final_loss']:.6f} |"
            if comm is not None else
            f"| {r['run_engine']} | {r['ranks']} | {r['micro_batch_size']} | {state / mib:.1f} | "
            f"{_ratio(state, b.get('optimizer_state_bytes_per_rank'))} | {r['parameters_per_rank']:,} | "
            f"{r['peak_rss_mib_max']:.0f} [{peaks}] | {_ratio(r['peak_rss_mib_max'], b.get('peak_rss_mib_max'))} | "
            f"– | – | {r['s_per_update']:.2f} | {_ratio(r['s_per_update'], b.get('s_per_update'))} | "
            f"{_load(r)} | {r['final_loss']:.6f} |")
    # per-op breakdown of the 2-rank runs (rank 0)
    multi = [r for r in rows if "error" not in r and r["ranks"] > 1]
    if multi:
        ops = sorted({op for r in multi for op in r["comm_per_op_per_update_rank0"]})
        lines += ["", "Collectives per update on rank 0 of the multi-rank runs (MiB per update, calls per update in "
                  "brackets; first run of the row):", "",
                  "| engine | ranks | " + " | ".join(ops) + " |", "|---|---:|" + "---:|" * len(ops)]
        for r in multi:
            cells = []
            for op in ops:
                c = r["comm_per_op_per_update_rank0"].get(op)
                cells.append(f"{c['bytes'] / mib:.2f} ({c['calls']:g})" if c else "–")
            lines.append(f"| {r['run_engine']} | {r['ranks']} | " + " | ".join(cells) + " |")
    lines += ["", "Notes:", ""]
    lines += [f"- {note}" for note in res["notes"]]
    return "\n".join(lines) + "\n"


def notes(res: dict) -> list[str]:
    out = [
        "This 2-core VM's speed drifts in phases of minutes and other work may share it: read each time with its "
        "'other load' column (a 2-thread 1-rank run may lose more than the share taken from it, since its "
        "threads wait for each other at every parallel op). The runs of each row are interleaved with the others' "
        f"({res['repeats']} repeat(s)); do not trust a time ratio this table does not reproduce.",
        "With 2 ranks on 2 cores each rank gets 1 core (OMP_NUM_THREADS=1) where the 1-rank run has 2 threads: "
        "the ranks share the machine's cores and gloo moves data through shared memory/loopback, so the time "
        "columns show overhead, not speed-up.",
        "Peak RSS includes the runtime (Python, torch, transformers; DeepSpeed's import under zero*), which is "
        "several hundred MiB per process and does not shrink with ranks; the optimizer state of this model is a "
        "smaller part of it.",
        "DDP's C++ reducer bypasses the Python collectives; with `accumulation.mode: exact` every DDP backward "
        "runs under no_sync (the optimizer averages its replicated m and v once per update instead), so the "
        "counted all-reduces are the whole DDP traffic of an update.",
    ]
    out.append("The trainer's own all-reduces (token count per cycle, finite-loss flag per micro-step, loss and "
               "token sums per update: a few bytes each) are in every row's count.")
    ok = [r for r in res["rows"] if "error" not in r]
    base = next((r for r in ok if (r["engine"], r["ranks"]) == BASELINE), None)
    if base:
        differ = [f"{r['run_engine']} × {r['ranks']} ({r['final_loss']:.6f})" for r in ok
                  if abs(r["final_loss"] - base["final_loss"]) > 1e-4 * abs(base["final_loss"])]
        out.append(f"Final loss: {'every row matches' if not differ else 'these rows differ from'} the 1-rank ddp "
                   f"run's {base['final_loss']:.6f} (relative tolerance 1e-4)" + (f": {', '.join(differ)}." if differ
                                                                                   else ".")
                   + (" Expected for ddp with AdamW: averaging the replicated state once per update makes v the "
                      "mean of the squares of the 2·k per-rank (half-size) micro-batch gradients, i.e. one process "
                      "running those 2·k micro-batches, not the k full ones (docs/design.md §4); the sharded engines "
                      "reduce gradients before the fold." if any(d.startswith("ddp × ") for d in differ) else ""))
    for n in res["ranks"]:
        same = [r for r in ok if r["ranks"] == n]
        if len(same) > 1:
            lo, hi = min(same, key=lambda r: r["s_per_update"]), max(same, key=lambda r: r["s_per_update"])
            out.append(f"Spread of the {n}-rank times (same model, batch and threads): {lo['s_per_update']:.2f} s "
                       f"({lo['run_engine']}, other load {_load(lo)}) to {hi['s_per_update']:.2f} s "
                       f"({hi['run_engine']}, other load {_load(hi)}).")
    for r in res["rows"]:
        reported = r.get("optimizer_reported_bytes_per_update")
        if reported and any(reported) and r.get("comm_per_op_per_update_rank0"):
            counted = r["comm_per_op_per_update_rank0"].get("all_reduce", {}).get("bytes", 0)
            out.append(f"Cross-check, {r['run_engine']} × {r['ranks']}: leantrain's optimizer reports "
                       f"{reported[0] / 2**20:.2f} MiB/update of replicated-state averaging "
                       f"(`communicated_bytes`); the wrapped all_reduce counted {counted / 2**20:.2f} MiB/update "
                       "on rank 0 (the rest: the trainer's few-byte reductions).")
    one_rank = [r["run_engine"] for r in res["rows"] if "error" not in r and r["ranks"] == 1
                and (r["comm_bytes_per_update_max"] or 0) > 2**10]
    if one_rank:
        out.append(f"On 1 rank {', '.join(one_rank)} still call collectives on a group of one (nothing leaves "
                   "the process); the comm column counts them like any call.")
    for r in res["rows"]:
        if "error" in r:
            out.append(f"{r['engine']} with {r['ranks']} rank(s) failed: `{r['error']}` "
                       "(full stderr tail in scaling.json).")
        elif r["ranks"] > 1 and not r["comm_bytes_per_update_max"]:
            out.append(f"{r['run_engine']} with {r['ranks']} ranks: the collective counters stayed at zero.")
    return out


def chart(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {(r["engine"], r["ranks"]): r for r in res["rows"]}
    engines = [e for e in res["engines"]]
    ranks = res["ranks"]
    width = 0.8 / len(ranks)
    colors = ["#3b75af", "#e1812c", "#519e3e", "#c53a32"]
    panels = [
        ("optimizer state per rank (MiB)", lambda r: r["optimizer_state_bytes_per_rank"] / 2**20),
        ("peak RSS per rank, max over ranks (MiB)", lambda r: r["peak_rss_mib_max"]),
        ("bytes communicated per update per rank (MiB)",
         lambda r: (r["comm_bytes_per_update_max"] or 0) / 2**20),
        ("time per update (s, median)", lambda r: r["s_per_update"]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (title, value) in zip(axes.flat, panels):
        for j, n in enumerate(ranks):
            xs, ys, failed = [], [], []
            for i, engine in enumerate(engines):
                r = rows.get((engine, n))
                x = i + (j - (len(ranks) - 1) / 2) * width
                if r is None:
                    continue
                if "error" in r:
                    failed.append(x)
                    continue
                xs.append(x)
                ys.append(value(r))
            bars = ax.bar(xs, ys, width, color=colors[j % len(colors)], label=f"{n} rank{'s' if n > 1 else ''}")
            for bar, y in zip(bars, ys):
                ax.text(bar.get_x() + bar.get_width() / 2, y, f"{y:.0f}" if y >= 10 else f"{y:.2f}", ha="center",
                        va="bottom", fontsize=7)
            for x in failed:
                ax.text(x, 0, "failed", ha="center", va="bottom", fontsize=7, rotation=90, color="#c53a32")
        ax.set_xticks(range(len(engines)), engines)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    model = res["model"]
    fig.suptitle(f"GPT-2-shaped {model['parameters'] / 1e6:.1f}M params, AdamW fp32, exact k={K}, "
                 f"{GLOBAL_MICRO * K * SEQ} tokens/update, CPU ({res['machine']['cores']} cores, gloo)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of every (engine, ranks), interleaved; medians")
    parser.add_argument("--updates", type=int, default=4, help="optimizer updates per run (the first is warm-up)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for scaling.{json,md,png}")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    parser.add_argument("--ranks", default="1,2", help="comma-separated process counts (divisors of 4)")
    parser.add_argument("--size", default="default", choices=list(SIZES), help="tiny: a smoke run")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a launch is killed")
    parser.add_argument("--wait-idle", type=float, default=10,
                        help="seconds to wait, before each launch, for the CPU to be >= 90%% idle (shared machine)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    parser.add_argument("--code-ref", help="run leantrain as committed at this git ref (git archive to a temporary "
                        "folder, first on PYTHONPATH) instead of the working tree, e.g. HEAD")
    args = parser.parse_args()
    engines = args.engines.split(",")
    if unknown := [e for e in engines if e not in ENGINES]:
        parser.error(f"--engines: unknown {unknown}")
    ranks = [int(n) for n in args.ranks.split(",")]
    if any(n < 1 or GLOBAL_MICRO % n for n in ranks):
        parser.error(f"--ranks: each must divide the global micro-batch {GLOBAL_MICRO}")
    if args.updates < 2:
        parser.error("--updates: at least 2 (the first is warm-up)")

    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="leantrain-scaling-"))
    try:
        code = export_code(args.code_ref, root) if args.code_ref else None
        if code is not None:
            sys.path.insert(0, str(code))
        model = build_model_dir(root, args.size)
        recipe = write_recipe(root, model["path"], args.updates)
        print(f"model: {model['parameters']:,} parameters; runs in {root}", flush=True)
        runs: dict[tuple[str, int], list[dict]] = {(e, n): [] for e in engines for n in ranks}
        for repeat in range(args.repeats):
            for engine in engines:
                for n in ranks:
                    row = run_one(engine, n, repeat, recipe, root, args.timeout, code, args.wait_idle)
                    runs[(engine, n)].append(row)
                    got = (f"failed: {row['error']}" if "error" in row else
                           f"state {row['run_info']['optimizer_state_bytes_per_rank'] / 2**20:.1f} MiB, peak "
                           + "/".join(f"{p:.0f}" for p in row["peak_rss_mib_per_rank"]) + " MiB, comm "
                           + "/".join("–" if c is None else f"{c / 2**20:.1f}" for c in row["comm_bytes_per_update_per_rank"])
                           + f" MiB/update, {row['s_per_update']:.2f} s/update")
                    print(f"[{repeat + 1}/{args.repeats}] {engine} × {n}: {got} ({row['wall_s']:.0f} s)", flush=True)
        rows = [summarise(e, n, runs[(e, n)]) for e in engines for n in ranks]
        res = dict(command=" ".join([sys.executable, "benchmarks/scaling.py", *sys.argv[1:]]),
                   repeats=args.repeats, updates=args.updates, wait_idle=args.wait_idle, size=args.size, engines=engines, ranks=ranks,
                   k=K, seq=SEQ, global_micro_batch=GLOBAL_MICRO, lr=LR, model={k: v for k, v in model.items() if k != "path"},
                   machine=machine(), versions=versions(), code=code_info(args.code_ref), elapsed_s=time.perf_counter() - start,
                   rows=rows, runs=[r for key in runs for r in runs[key]])
        res["notes"] = notes(res)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scaling.json").write_text(json.dumps(res, indent=1))
        table = markdown(res)
        (out / "scaling.md").write_text(table)
        chart(res, out / "scaling.png")
        print(table)
    finally:
        if args.keep:
            print(f"run directories kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

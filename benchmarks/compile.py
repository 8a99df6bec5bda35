"""Whether ``model.compile: true`` and AdamW's ``compiled=True`` win, and what they cost.

    python benchmarks/compile.py [--size quickstart|medium|tiny] [--updates 20] [--warmup 2]
                        [--repeats 2] [--k 4] [--micro-batch N] [--configs a,b] [--threads N] [--timeout 900]
                        [--out benchmarks/results] [--keep] [--smoke]

Every run is ``python -m leantrain.trainer train recipes/quickstart.yaml
key=value ...`` in its own process, with ``tracking.wandb=null
checkpointing.every_updates=null eval.every_updates=null`` (the trainer still
evaluates once after the last update), ``max_updates=--updates`` and its own
``output_dir`` in a temporary folder. Configurations (each compiled one
against its *twin*: the same optimizer and accumulation with both switches
off):

1. AdaFactor as the recipe has it (bf16 momentum on gradients, exact, k=4,
   fused), ``model.compile`` false / true;
2. AdamW (lr 1e-3, weight decay 0.01; the rest of the recipe unchanged),
   exact, k=4, unfused: ``model.compile`` × ``optimizer.compiled``;
3. AdamW exact, k=4, fused (folded inside backward): ``optimizer.compiled``
   false / true (the fused hooks fold one tensor at a time, eagerly; only
   the boundary update is compiled).

GPT-2's dropout is set to 0 (``--keep-dropout`` keeps 0.1): inductor draws
dropout masks with its own RNG, so with dropout a compiled model's loss curve
cannot match its twin's. ``--size`` changes the model through overrides of ``model.from_config``
(``medium``: 6 layers × 512, vocabulary 8192; ``tiny``: 2 × 64, for
``--smoke``); the quickstart's own is 4 × 128, vocabulary 2048.

Measured per run, from the child's stdout read line by line and stamped on
arrival (the loop prints ``update u/N ...`` right after each update, flushed):

* time to first update: from ``Popen`` to the ``update 1/`` line; start-up
  (imports, tokenizer training, tokenisation, model build) is in it and is
  the same for both twins, so the difference is the compile cost;
* steady time per update: ``tokens / tokens_per_s`` of ``metrics.jsonl``
  (the loop's clock between consecutive updates), median over updates after
  ``--warmup``; the stdout stamps give the same figure as a cross-check;
* peak memory: ``peak_memory_mib`` of the last metrics line (``ru_maxrss``
  inside the process at the last update) and the whole process's
  ``ru_maxrss`` from ``os.wait4`` (includes the final eval and save);
* end: from the last update's line to the process exit (final eval, where a
  compiled model compiles its eval graph, and the save);
* the loss per update, compared with the twin's of the same repeat.

Caches: each compiled configuration runs first with ``TORCHINDUCTOR_CACHE_DIR``
(and ``TRITON_CACHE_DIR``) pointing at a fresh empty folder (*cold*: what the
first run on a machine pays), then again on that folder (*warm*: a later run;
Dynamo still traces, inductor's FX graph and kernel caches hit). Uncompiled
runs get a fresh folder too and run once per repeat; a file appearing in it
would mean something compiled without being asked (reported). ``--repeats``
rounds run interleaved (all cold runs, then all warm runs, per round); the
table shows medians. Payback: a compiled run reaches update n at about
first + (n − 1)·steady, so it is ahead of its twin from
n = 1 + ⌈(first_c − first_twin) / (steady_twin − steady_c)⌉ on.

``--smoke`` (tiny model, 4 updates, 1 repeat, AdamW unfused with both
switches off and on) takes about 2 minutes and checks the plumbing only; its
numbers mean nothing. It writes into a temporary folder unless ``--out`` is
given. Run it on an otherwise idle machine: every figure is a wall time.
Writes ``compile.{json,md}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = "recipes/quickstart.yaml"
CODE_DIRS = ["optim", "trainer"]
UPDATE_LINE = re.compile(r"^update (\d+)/(\d+) ")
ADAMW = "{{name: AdamW, lr: 1.0e-3, betas: [0.9, 0.999], eps: 1.0e-8, weight_decay: 0.01, compiled: {}}}"
SIZES = {  # model.from_config overrides of the quickstart (4 layers x 128, vocabulary 2048)
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, vocab=2048),
    "quickstart": dict(n_layer=4, n_embd=128, n_head=4, vocab=2048),
    "medium": dict(n_layer=6, n_embd=512, n_head=8, vocab=8192),
}
CONFIGS = {  # optimizer, fused, model.compile, optimizer.compiled
    "adafactor_fused": ("AdaFactor", True, False, False),
    "adafactor_fused+model": ("AdaFactor", True, True, False),
    "adamw_unfused": ("AdamW", False, False, False),
    "adamw_unfused+model": ("AdamW", False, True, False),
    "adamw_unfused+opt": ("AdamW", False, False, True),
    "adamw_unfused+model+opt": ("AdamW", False, True, True),
    "adamw_fused": ("AdamW", True, False, False),
    "adamw_fused+opt": ("AdamW", True, False, True),
}
SMOKE_CONFIGS = "adamw_unfused,adamw_unfused+model+opt"


def compiled(name: str) -> bool:
    return CONFIGS[name][2] or CONFIGS[name][3]


def twin(name: str) -> str:
    opt, fused, _, _ = CONFIGS[name]
    return next(n for n, c in CONFIGS.items() if c == (opt, fused, False, False))


def label(name: str, k: int = 4) -> str:
    opt, fused, model, optc = CONFIGS[name]
    return (f"{opt} exact k={k} {'fused' if fused else 'unfused'}, model.compile {str(model).lower()}"
            + (f", optimizer.compiled {str(optc).lower()}" if opt == "AdamW" else ""))


def overrides(name: str, out: Path, args) -> list[str]:
    opt, fused, model, optc = CONFIGS[name]
    dims = SIZES[args.size]
    over = [f"output_dir={out}", "tracking.wandb=null", "checkpointing.every_updates=null",
            "checkpointing.resume=never", "eval.every_updates=null", f"max_updates={args.updates}",
            "accumulation.mode=exact", f"accumulation.steps={args.k}", f"accumulation.fused={str(fused).lower()}",
            f"model.compile={str(model).lower()}"]
    if args.size != "quickstart":
        over += [f"model.from_config.{key}={dims[key]}" for key in ("n_layer", "n_embd", "n_head")]
        over += [f"tokenizer.train_vocab_size={dims['vocab']}"]
    if not args.keep_dropout:  # inductor draws dropout masks with its own RNG: curves would differ by design
        over += [f"model.from_config.{key}=0.0" for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop")]
    if args.micro_batch:
        over.append(f"data.micro_batch_size={args.micro_batch}")
    if opt == "AdamW":  # the whole section: the recipe's AdaFactor keys would be unknown to AdamW
        over.append("optimizer=" + ADAMW.format(str(optc).lower()))
    return over


# ------------------------------------------------------------------ runs
def _busy_ticks() -> int:
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:8]]
    return sum(fields) - fields[3] - fields[4]


def launch(cmd: list[str], env: dict, timeout: float, log: Path) -> dict:
    """Run ``cmd``; stamp every ``update u/`` line as it arrives; the child's own ``ru_maxrss`` from ``wait4``."""
    busy0, t0 = _busy_ticks(), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    stamps, lines = {}, []
    with open(log, "w") as f:
        for line in proc.stdout:  # stderr merged: one pipe, no deadlock; the loop prints with flush=True
            now = time.perf_counter() - t0
            f.write(f"{now:9.3f} {line}")
            lines.append(line.rstrip("\n"))
            if match := UPDATE_LINE.match(line):
                stamps[int(match[1])] = now
    _, status, usage = os.wait4(proc.pid, 0)  # Popen.wait would drop the rusage
    proc.returncode = os.waitstatus_to_exitcode(status)
    killer.cancel()
    wall = time.perf_counter() - t0
    cpu = usage.ru_utime + usage.ru_stime
    other = max(0.0, (_busy_ticks() - busy0) / os.sysconf("SC_CLK_TCK") - cpu) / wall
    row = dict(exit_code=proc.returncode, wall_s=wall, cpu_s=cpu, process_peak_mib=usage.ru_maxrss / 1024,
               other_load_cores=other, stamps=[stamps[u] for u in sorted(stamps)])
    if proc.returncode != 0 or 1 not in stamps:
        text = [line for line in lines if line.strip()]
        row["error"] = next((line for line in text if line.startswith("leantrain: error")),
                            text[-1] if text else f"exit status {proc.returncode}")[:400]
        row["output_tail"] = "\n".join(text[-40:])
    return row


def cache_files(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def run_one(name: str, repeat: int, cache: str, root: Path, env: dict, args) -> dict:
    """One trainer process; ``cache`` is cold (a fresh inductor cache folder) or warm (the cold run's again)."""
    out = root / "runs" / f"{name}-r{repeat}-{cache}"
    out.mkdir(parents=True)
    cache_dir = root / "caches" / f"{name}-r{repeat}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    before = cache_files(cache_dir)
    cmd = [sys.executable, "-m", "leantrain.trainer", "train", RECIPE, *overrides(name, out, args)]
    env = {**env, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "TRITON_CACHE_DIR": str(cache_dir / "triton")}
    row = dict(config=name, repeat=repeat, cache=cache, cache_files_before=before,
               **launch(cmd, env, args.timeout, out / "log.txt"))
    row["cache_files_after"] = cache_files(cache_dir)
    row["command"] = " ".join(cmd[1:])
    if "error" in row:
        return row
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = [m["tokens"] / m["tokens_per_s"] for m in metrics]
    stamps = row["stamps"]
    by_stamp = [b - a for a, b in zip(stamps, stamps[1:])]  # updates 2..N
    row.update(losses=[m["loss"] for m in metrics], update_seconds=seconds,
               first_update_s=stamps[0], steady_s=statistics.median(seconds[args.warmup:]),
               steady_by_stamps_s=statistics.median(by_stamp[args.warmup - 1:]) if len(by_stamp) >= args.warmup
               else None, end_s=row["wall_s"] - stamps[-1], peak_mib=metrics[-1]["peak_memory_mib"],
               tokens_per_update=metrics[0]["tokens"],
               parameters=json.loads((out / "run_info.json").read_text())["parameters"])
    return row


# ------------------------------------------------------------------ summary
def _med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def summarise(runs: dict[str, list[dict]], names: list[str], k: int) -> dict:
    rows = {}
    for name in names:
        ok = [r for r in runs[name] if "error" not in r]
        if not ok:
            rows[name] = dict(config=name, label=label(name, k), error=runs[name][-1]["error"])
            continue
        cold = [r for r in ok if r["cache"] == "cold"]
        warm = [r for r in ok if r["cache"] == "warm"]
        rows[name] = dict(
            config=name, label=label(name, k), twin=twin(name), compiled=compiled(name), runs=len(runs[name]),
            ok_runs=len(ok), parameters=ok[0]["parameters"], tokens_per_update=ok[0]["tokens_per_update"],
            steady_s=_med(r["steady_s"] for r in ok), steady_each=[r["steady_s"] for r in ok],
            steady_by_stamps_s=_med(r["steady_by_stamps_s"] for r in ok),
            first_cold_s=_med(r["first_update_s"] for r in cold),
            first_warm_s=_med(r["first_update_s"] for r in warm) if compiled(name) else None,
            end_cold_s=_med(r["end_s"] for r in cold), end_warm_s=_med(r["end_s"] for r in warm),
            peak_mib=_med(r["peak_mib"] for r in ok), process_peak_mib=_med(r["process_peak_mib"] for r in ok),
            wall_cold_s=_med(r["wall_s"] for r in cold), other_load_cores=_med(r["other_load_cores"] for r in ok),
            losses=ok[0]["losses"], loss_spread_over_runs=max(_max_diff(r["losses"], ok[0]["losses"]) for r in ok),
            cache_files_cold=[r["cache_files_after"] for r in cold])
    for name, row in rows.items():
        base = rows.get(row.get("twin"))
        if not compiled(name) or "error" in row or not base or "error" in base:
            continue
        pairs = [(a, b) for a in runs[name] for b in runs[base["config"]]
                 if a["repeat"] == b["repeat"] and "error" not in a and "error" not in b]
        saved = base["steady_s"] - row["steady_s"]
        row.update(
            steady_ratio=row["steady_s"] / base["steady_s"],
            loss_max_diff=max(_max_diff(a["losses"], b["losses"]) for a, b in pairs) if pairs else None,
            peak_ratio=row["peak_mib"] / base["peak_mib"], process_peak_ratio=row["process_peak_mib"] / base[
                "process_peak_mib"],
            compile_cold_s=row["first_cold_s"] - base["first_cold_s"],
            compile_warm_s=(row["first_warm_s"] - base["first_cold_s"]) if row["first_warm_s"] else None,
            end_extra_cold_s=row["end_cold_s"] - base["end_cold_s"],
            end_extra_warm_s=(row["end_warm_s"] - base["end_cold_s"]) if row["end_warm_s"] is not None else None,
            saved_per_update_s=saved)
        row["payback_cold"] = _payback(row["compile_cold_s"], saved)
        row["payback_warm"] = _payback(row["compile_warm_s"], saved) if row["compile_warm_s"] is not None else None
        row["payback_run_cold"] = _payback(row["compile_cold_s"] + row["end_extra_cold_s"], saved)
        row["verdict"] = _verdict(row, base)
    return rows


def _payback(cost: float, saved: float) -> int | None:
    """First update at which the compiled run is ahead (None: never, it is not faster per update)."""
    if saved <= 0:
        return None
    return 1 + max(0, math.ceil(cost / saved))


def _verdict(row: dict, base: dict) -> str:
    """wins / loses / tie: a difference inside the spread of the runs of either row is a tie."""
    noise = max(_rel_spread(row["steady_each"]), _rel_spread(base["steady_each"]))
    change = row["steady_ratio"] - 1
    if abs(change) <= noise:
        return f"tie (|{change:+.1%}| ≤ run spread {noise:.1%})"
    return "wins" if change < 0 else "loses"


def _rel_spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else 0.0


# ------------------------------------------------------------------ output
def _f(value, fmt: str = ".2f", none: str = "–") -> str:
    return none if value is None else format(value, fmt)


def _updates(n) -> str:
    return "never" if n is None else str(n)


def notes(res: dict) -> list[str]:
    rows, out = res["rows"], []
    ok = {n: r for n, r in rows.items() if "error" not in r}
    firsts = {n: r["losses"][0] for n, r in ok.items()}
    if len(firsts) > 1:
        groups = {}
        for n, loss in firsts.items():
            groups.setdefault(CONFIGS[n][0], []).append(loss)
        spans = {opt: max(v) - min(v) for opt, v in groups.items()}
        out.append("Update-1 loss (before any parameter moves: same init, same micro-batches) spans "
                   + ", ".join(f"{s:.1e} over the {opt} rows" for opt, s in spans.items())
                   + ": compiled forward and eager forward agree to float rounding"
                   + (" — NOT equal beyond 1e-4: look at the compiled model." if max(spans.values()) > 1e-4 else "."))
    diffs = [r["loss_max_diff"] for r in ok.values() if r.get("loss_max_diff") is not None]
    if diffs:
        worst = max(ok.values(), key=lambda r: r.get("loss_max_diff") or 0)
        out.append(f"Loss curves against the twin (same repeat): the largest per-update |Δloss| over all compiled "
                   f"rows is {max(diffs):.1e} (`{worst['config']}`). Inductor may contract a multiply and an add into "
                   "one FMA and reorders reductions, so the compiled rows are not bit-identical; differences of "
                   "this size are rounding, not a different algorithm.")
    spread = max((r["loss_spread_over_runs"] for r in ok.values()), default=0.0)
    out.append(f"Runs of one row (repeats, cold and warm) give the same loss curve to {spread:.1e}.")
    leaked = [n for n, r in ok.items() if not r["compiled"] and any(r["cache_files_cold"])]
    if leaked:
        out.append(f"Rows with both switches off wrote files into their inductor cache ({leaked}): something "
                   "compiled without being asked.")
    empty = [n for n, r in ok.items() if r["compiled"] and not any(r["cache_files_cold"])]
    if empty:
        out.append(f"Compiled rows whose cache stayed empty ({empty}): the switch did nothing.")
    ends = [(n, r["end_extra_cold_s"]) for n, r in ok.items() if r.get("end_extra_cold_s") is not None
            and CONFIGS[n][2]]
    if ends:
        out.append("`model.compile` also pays after training: the final evaluation runs the model in eval mode "
                   "under no_grad, a new graph that compiles then (end-of-run time vs twin, cold cache: "
                   + ", ".join(f"`{n}` {e:+.1f} s" for n, e in ends) + "). A run that evaluates periodically "
                   "pays it at the first evaluation; the third 'ahead after' figure counts it.")
    out.append("Time to first update includes the start-up both twins share (imports, the tokenizer trained on "
               "python-docs, tokenisation, model build): about the uncompiled row's figure minus one update.")
    out.append("This 2-core VM is shared: read a time ratio together with the run spread and the other-load "
               "column; a 'tie' means the difference is inside the spread of the runs.")
    return out


def conclusion(res: dict) -> list[str]:
    rows = {n: r for n, r in res["rows"].items() if "error" not in r and r["compiled"]}
    out = []
    for switch, on in (("model.compile", (True, False)), ("optimizer.compiled", (False, True)),
                       ("both", (True, True))):
        mine = [n for n in rows if CONFIGS[n][2:] == on]
        if not mine:
            continue
        parts = []
        for n in mine:
            r = rows[n]
            parts.append(f"`{n}` {r['verdict'].split(' ')[0]} (×{r['steady_ratio']:.2f} per update; "
                         f"{r['compile_cold_s']:+.0f} s to the first update cold, "
                         + (f"{r['compile_warm_s']:+.0f} s warm; " if r.get("compile_warm_s") is not None else "")
                         + f"ahead after {_updates(r['payback_cold'])} updates cold, "
                         f"{_updates(r['payback_warm'])} warm, {_updates(r['payback_run_cold'])} counting the final "
                         "evaluation)")
        wins = [n for n in mine if rows[n]["verdict"] == "wins"]
        head = f"`{switch}` alone" if switch != "both" else "Both switches"
        out.append(f"- {head}: " + "; ".join(parts) + ". "
                   + (f"Faster per update for {', '.join(f'`{n}`' for n in wins)}." if wins else
                      "Not faster per update anywhere here."))
    return out


def markdown(res: dict) -> str:
    rows, m, v = res["rows"], res["machine"], res["versions"]
    size = SIZES[res["size"]]
    any_ok = next((r for r in rows.values() if "error" not in r), {})
    lines = [
        "# torch.compile: `model.compile` and AdamW `compiled=True`, where each wins and what it costs", "",
        f"`{res['command']}`", "",
        f"Machine: {m['cpu']}, {m['cores']} CPU cores, {m['mem_gib']} GiB RAM, no GPU; torch {v['torch']}, "
        f"transformers {v['transformers']}, accelerate {v['accelerate']}; {res['threads'] or 'default'} torch "
        f"threads; {m['cxx']}. Total benchmark time {res['elapsed_s'] / 60:.1f} min. leantrain code: working tree at "
        f"{res['code']['head'][:10]}" + (f" with uncommitted changes in {', '.join(res['code']['uncommitted'])}"
                                         if res["code"]["uncommitted"] else "") + ".", "",
        f"Recipe: `{RECIPE}` with overrides (every run's command is in the JSON). Model: GPT-2-shaped from config, "
        f"{size['n_layer']} layers, n_embd {size['n_embd']}, {size['n_head']} heads, vocabulary {size['vocab']} "
        f"(BPE trained on python-docs), **{any_ok.get('parameters', 0):,} parameters**, fp32, "
        + ("dropout 0.1 (GPT-2's; compiled and eager draw different masks). " if res["keep_dropout"] else
           "dropout 0 (inductor draws dropout masks with its own RNG, so with dropout the compiled and eager "
           "curves could not be compared). ") + f"Micro-batch × k = "
        f"{any_ok.get('tokens_per_update', 0):,} tokens per update (k = {res['k']}), {res['updates']} updates, "
        "the recipe's cosine schedule, no eval until the end, no checkpoints. AdamW: lr 1e-3, betas "
        "(0.9, 0.999), eps 1e-8, weight decay 0.01; AdaFactor: the recipe's.", "",
        f"Columns: steady = median over updates {res['warmup'] + 1}..{res['updates']} of `tokens / tokens_per_s` "
        f"(metrics.jsonl), median over runs ({res['repeats']} repeat(s); a compiled row's cold and warm runs both "
        "count); × twin = ratio to the row with both switches off; verdict: wins/loses when the difference "
        "exceeds the run-to-run spread of either row, else tie; first update = process start to the `update 1/` "
        "line with a cold (empty) and a warm inductor cache; compile cost = that minus the twin's; ahead after = "
        "the update count from which the compiled run is ahead of its twin (cold / warm / cold counting the extra "
        "time of the final evaluation, i.e. the shortest run whose whole wall time the switch shortens); "
        "peak RSS = `ru_maxrss` at the last update (× twin), process peak = `os.wait4` (includes final eval and "
        "save); end = last update to exit (final eval + save), cold; max |Δloss| = largest per-update loss "
        "difference vs the twin, same repeat.", "",
        "Rows: " + "; ".join(f"`{n}` = {label(n, res['k'])}" for n in rows) + ".", "",
        "| config | steady s/update | × twin | verdict | first update cold s | warm s | compile cost cold / warm s "
        "| ahead after updates (cold / warm / run) | peak RSS MiB | × twin | process peak MiB | end s "
        "| max abs Δloss vs twin | other load |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| `{name}` | failed: {r['error'].replace('|', '/')} |" + " |" * 12)
            continue
        c = r["compiled"]
        lines.append(
            f"| `{name}` | {r['steady_s']:.3f} | {_f(r.get('steady_ratio')) if c else '1'} | "
            f"{r.get('verdict', 'twin') if c else 'twin'} | {r['first_cold_s']:.1f} | {_f(r['first_warm_s'], '.1f')} | "
            + (f"{r['compile_cold_s']:+.1f} / {_f(r['compile_warm_s'], '+.1f')} | "
               f"{_updates(r['payback_cold'])} / {_updates(r['payback_warm'])} / {_updates(r['payback_run_cold'])} | "
               if c else "– | – | ")
            + f"{r['peak_mib']:.0f} | {_f(r.get('peak_ratio')) if c else '1'} | {r['process_peak_mib']:.0f} | "
            f"{r['end_cold_s']:.1f} | {_f(r.get('loss_max_diff'), '.1e') if c else '–'} | "
            f"{r['other_load_cores']:.2f} |")
    lines += ["", "Where each switch wins (generated from the table):", ""] + conclusion(res)
    ok = [n for n, r in rows.items() if "error" not in r]
    if ok:
        lines += ["", "Loss per update (first cold run of each row):", "",
                  "| update | " + " | ".join(f"`{n}`" for n in ok) + " |", "|---:|" + "---:|" * len(ok)]
        for u in range(max(len(rows[n]["losses"]) for n in ok)):
            cells = [f"{rows[n]['losses'][u]:.5f}" if u < len(rows[n]["losses"]) else "–" for n in ok]
            lines.append(f"| {u + 1} | " + " | ".join(cells) + " |")
    lines += ["", "Notes:", ""] + [f"- {note}" for note in res["notes"]]
    return "\n".join(lines) + "\n"


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    cxx = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.split("\n")[0] or "no c++"
    return dict(cpu=cpu, cores=os.cpu_count(), mem_gib=round(mem / 2**20, 1), platform=platform.platform(),
                python=platform.python_version(), cxx=cxx)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "accelerate", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def code_info() -> dict:
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return dict(head=git("rev-parse", "HEAD"),
                uncommitted=[line.split(maxsplit=1)[-1]
                             for line in git("status", "--porcelain", "--", *CODE_DIRS).splitlines()])


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="quickstart", choices=list(SIZES))
    parser.add_argument("--updates", type=int, default=20, help="optimizer updates per run")
    parser.add_argument("--warmup", type=int, default=2, help="updates left out of the steady median")
    parser.add_argument("--repeats", type=int, default=2, help="rounds, interleaved; medians")
    parser.add_argument("--k", type=int, default=4, help="micro-batches per update")
    parser.add_argument("--micro-batch", type=int, help="data.micro_batch_size (default: the recipe's 8)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--keep-dropout", action="store_true", help="keep GPT-2's dropout 0.1 (default: 0, so the "
                        "compiled and eager loss curves can be compared)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every run (default: torch's choice)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a run is killed")
    parser.add_argument("--out", help="folder for compile.{json,md} (default benchmarks/results; --smoke: a "
                        "temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 4 updates, 1 repeat, AdamW unfused off/on: "
                        "about 2 minutes; checks the plumbing, its numbers mean nothing")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.updates, args.warmup, args.repeats = "tiny", 4, 1, 1
        args.micro_batch = args.micro_batch or 2
        if "--configs" not in " ".join(sys.argv):
            args.configs = SMOKE_CONFIGS
    names = args.configs.split(",")
    if unknown := [n for n in names if n not in CONFIGS]:
        parser.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
    names += [twin(n) for n in names if twin(n) not in names]  # a compiled row needs its twin
    names = [n for n in CONFIGS if n in names]
    if args.updates <= args.warmup + 1:
        parser.error("--updates: must exceed --warmup + 1")

    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="leantrain-compile-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    try:
        print(f"runs in {root}", flush=True)
        for repeat in range(args.repeats):  # interleaved: drift in machine load hits every row alike
            for cache in ("cold", "warm"):
                for name in (n for n in names if cache == "cold" or compiled(n)):
                    row = run_one(name, repeat, cache, root, env, args)
                    runs[name].append(row)
                    got = (f"failed: {row['error']}" if "error" in row else
                           f"first update {row['first_update_s']:.1f} s, steady {row['steady_s']:.3f} s/update, "
                           f"peak {row['peak_mib']:.0f} MiB, loss {row['losses'][0]:.4f} → {row['losses'][-1]:.4f}, "
                           f"end {row['end_s']:.1f} s, cache files {row['cache_files_after']}")
                    print(f"[{repeat + 1}/{args.repeats} {cache}] {name}: {got} ({row['wall_s']:.0f} s)", flush=True)
        rows = summarise(runs, names, args.k)
        res = dict(command=" ".join(["python benchmarks/compile.py", *sys.argv[1:]]), recipe=RECIPE, size=args.size,
                   model=SIZES[args.size], k=args.k, micro_batch=args.micro_batch, updates=args.updates,
                   warmup=args.warmup, repeats=args.repeats, threads=args.threads, keep_dropout=args.keep_dropout,
                   machine=machine(), versions=versions(), code=code_info(), elapsed_s=time.perf_counter() - start,
                   rows=rows,
                   runs={n: [{k: v for k, v in r.items() if k != "output_tail" or "error" in r} for r in rs]
                         for n, rs in runs.items()})
        res["notes"] = notes(res)
        out = Path(args.out) if args.out else (root / "results" if args.smoke else REPO / "benchmarks" / "results")
        out.mkdir(parents=True, exist_ok=True)
        (out / "compile.json").write_text(json.dumps(res, indent=1))
        table = markdown(res)
        (out / "compile.md").write_text(table)
        print(table)
        print(f"written: {out / 'compile.md'}, {out / 'compile.json'}")
        for name, rs in runs.items():
            for r in rs:
                if "error" in r:
                    print(f"--- {name} r{r['repeat']} {r['cache']} failed: {r['command']}\n{r['output_tail']}")
    finally:
        if args.keep or args.smoke:
            print(f"run folders kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

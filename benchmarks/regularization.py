"""What flooding and the finite-difference gradient penalty cost in time and memory, and what they do to the loss.

    python benchmarks/regularization.py [--updates 20] [--out benchmarks/results]

Runs ``recipes/quickstart_large_batch.yaml`` (GPT-2-shaped 4 × 128 model on
python-docs, AdamW with layer adaptation, exact k = 16, unfused) four times,
each in its own process, one after the other: without regularisation, with
``regularization.flooding`` only, with ``regularization.gradient_penalty``
only, and with both (the recipe as shipped). Reports the median time per
update, peak RSS, the last update's raw and regularised training loss and
the eval losses. The penalty's cost is expected near 2× time (one more
forward and backward per micro-batch) and one more gradient-sized tensor of
memory (the saved gradient). Not a test: minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = "recipes/quickstart_large_batch.yaml"
RUNS = {
    "none": ["regularization.flooding=null", "regularization.gradient_penalty=null"],
    "flooding 2.0": ["regularization.gradient_penalty=null"],
    "gradient penalty 0.01": ["regularization.flooding=null"],
    "both (recipe)": [],
}


def run(overrides: list[str], out: Path, updates: int) -> dict:
    cmd = [sys.executable, "-m", "leantrain.trainer", RECIPE, f"output_dir={out}", "checkpointing.every_updates=null",
           "tracking.wandb=null", f"max_updates={updates}", f"eval.every_updates={max(1, updates // 2)}", *overrides]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "loss" in line]
    evals = [(line["update"], line["eval_loss"]) for line in lines if "eval_loss" in line]
    per_update = sorted(line["tokens"] / line["tokens_per_s"] for line in train[1:] if line.get("tokens_per_s"))
    last = train[-1]
    return {"updates": last["update"], "median_s_per_update": per_update[len(per_update) // 2],
            "peak_rss_mib": max(line["peak_memory_mib"] for line in train), "last_loss": last["loss"],
            "last_regularised_loss": last.get("regularised_loss"), "eval_loss": evals, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    if args.updates < 3:
        parser.error("--updates: at least 3 (the first update is left out of the time median)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(RUNS.items()):
            results[name] = run(overrides, Path(tmp) / f"run{i}", args.updates)
            print(name, results[name], flush=True)
    base = results["none"]
    rows = ["| regularisation | s/update | × none | peak RSS MiB | × none | last train loss (raw) | regularised | "
            "eval loss over updates |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        reg = "–" if r["last_regularised_loss"] is None else f"{r['last_regularised_loss']:.3f}"
        curve = ", ".join(f"{u}: {v:.3f}" for u, v in r["eval_loss"])
        time_ratio = r["median_s_per_update"] / base["median_s_per_update"]
        rows.append(f"| {name} | {r['median_s_per_update']:.2f} | {time_ratio:.2f} | {r['peak_rss_mib']:.0f} "
                    f"| {r['peak_rss_mib'] / base['peak_rss_mib']:.2f} | {r['last_loss']:.3f} | {reg} | {curve} |")
    header = [
        "# Flooding and gradient penalty: cost and effect", "",
        f"`python benchmarks/regularization.py --updates {args.updates}`", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores. `{RECIPE}` "
        f"shortened to {args.updates} updates (k = 16 micro-batches of 8 × 128 tokens each), each run in its own "
        "process, one after the other; peak RSS is the process's (runtime included) at its last update. The "
        "short runs show cost, not where the regularisers pay off (they act late in training, near the flood "
        "level or a sharp minimum).", ""]
    out = Path(args.out)
    (out / "regularization.json").write_text(json.dumps(dict(command=header[2], results=results), indent=1))
    (out / "regularization.md").write_text("\n".join(header + rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""Zeroth-order (forward passes only) against AdamW on the offline MiniLM sentiment fine-tune.

    python benchmarks/zeroth_order.py [--zo-updates 600] [--out benchmarks/results]

Runs ``recipes/minilm_offline.yaml`` (AdamW, fused, 30 updates) and
``recipes/minilm_zeroth_order.yaml`` (ZerothOrder) one after the other, each
in its own process, and reports eval accuracy (start and end), peak RSS, the
optimizer state, the wall time and the time per update. Not a test: minutes.
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
RUNS = {
    "AdamW (fused, k=2)": ("recipes/minilm_offline.yaml", []),
    "ZerothOrder (loss, 4 perturbations)": ("recipes/minilm_zeroth_order.yaml", []),
    "ZerothOrder (1 − accuracy, 4 perturbations)": ("recipes/minilm_zeroth_order.yaml", ["optimizer.objective=accuracy"]),
}


def run(recipe: str, overrides: list[str], out: Path, zo_updates: int) -> dict:
    extra = [f"max_updates={zo_updates}", f"eval.every_updates={zo_updates // 4}"] if "zeroth" in recipe else []
    cmd = [sys.executable, "-m", "leantrain.trainer", recipe, f"output_dir={out}", "checkpointing.every_updates=null",
           "tracking.wandb=null", *extra, *overrides]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{recipe} failed:\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval_accuracy" in line]
    info = json.loads((out / "run_info.json").read_text())
    per_update = sorted(line["tokens"] / line["tokens_per_s"] for line in lines[1:] if line.get("tokens_per_s"))
    return {"updates": lines[-1]["update"], "eval_accuracy": [(e["update"], e["eval_accuracy"]) for e in evals],
            "final_accuracy": evals[-1]["eval_accuracy"], "peak_rss_mib": max(line["peak_memory_mib"] for line in lines),
            "optimizer_state_bytes": info["optimizer_state_bytes_per_rank"], "parameters": info["parameters"],
            "wall_s": wall, "median_s_per_update": per_update[len(per_update) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zo-updates", type=int, default=600)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (recipe, overrides)) in enumerate(RUNS.items()):
            results[name] = run(recipe, overrides, Path(tmp) / f"run{i}", args.zo_updates)
            print(name, results[name], flush=True)
    out = Path(args.out)
    (out / "zeroth_order.json").write_text(json.dumps(results, indent=1))
    rows = ["| optimizer | updates | eval accuracy (end) | eval accuracy over updates | peak RSS MiB | state B/param "
            "| s/update | wall s |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        curve = ", ".join(f"{u}: {a:.3f}" for u, a in r["eval_accuracy"])
        rows.append(f"| {name} | {r['updates']} | {r['final_accuracy']:.3f} | {curve} | {r['peak_rss_mib']:.0f} | "
                    f"{r['optimizer_state_bytes'] / r['parameters']:.2f} | {r['median_s_per_update']:.3f} | "
                    f"{r['wall_s']:.0f} |")
    header = [
        "# Zeroth-order vs AdamW: MiniLM sentiment fine-tune (offline)", "",
        f"`python benchmarks/zeroth_order.py --zo-updates {args.zo_updates}`", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU. Each run in its own "
        "process, one after the other; peak RSS is the whole process (runtime included). all-MiniLM-L6-v2 "
        "(22.7M parameters) on recipes/data (480 train / 160 validation sentences), micro-batch 16 × k 2 for AdamW, "
        "32 for ZerothOrder.", ""]
    (out / "zeroth_order.md").write_text("\n".join(header + rows) + "\n")


if __name__ == "__main__":
    main()

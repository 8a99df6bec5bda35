"""Run a worker script under torchrun with N gloo processes on this machine; collect per-rank JSON.

Each worker writes ``$RESULT_DIR/rank<r>.json``. Launching costs a few seconds of
imports per process, so a worker checks several things in one launch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKERS = Path(__file__).parent / "workers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(worker: str, tmp_path: Path, *args: str, nproc: int = 2, timeout: int = 300) -> list[dict]:
    out = tmp_path / f"results-{worker}"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RESULT_DIR": str(out), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(WORKERS / f"{worker}.py"), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{worker} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def write_result(result: dict) -> None:
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(os.environ["RESULT_DIR"], f"rank{rank}.json").write_text(json.dumps(result))

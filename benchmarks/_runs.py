"""What the benchmark scripts share: the committed code to run, and waiting for an idle CPU.

Each script runs its configurations as child processes. ``export_code`` lets
them run leantrain as committed at a git ref (``--code-ref HEAD``) while the
working tree changes; ``wait_for_idle`` holds a run until other work leaves
the CPU, so a time measured on a shared machine is not another process's.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CODE_DIRS = ["optim", "trainer", "integrations", "launch", "recipes"]  # the leantrain.* packages


def export_code(ref: str, root: Path) -> Path:
    """``git archive REF`` of the leantrain packages laid out as ``leantrain.*`` (for PYTHONPATH)."""
    dest = root / "code"
    (dest / "leantrain").mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref, *CODE_DIRS], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest / "leantrain")], input=archive.stdout, check=True)
    return dest


def cpu_idle(seconds: float = 2.0) -> float:
    """Fraction of CPU time idle over ``seconds`` (/proc/stat), all cores."""
    def sample():
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)
    (idle0, total0), _, (idle1, total1) = sample(), time.sleep(seconds), sample()
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_for_idle(limit_s: float, threshold: float = 0.9) -> float:
    """Wait (at most ``limit_s``) until other work leaves the CPU idle; returns the last idle fraction."""
    deadline, idle = time.monotonic() + limit_s, cpu_idle()
    while idle < threshold and time.monotonic() < deadline:
        idle = cpu_idle()
    return idle

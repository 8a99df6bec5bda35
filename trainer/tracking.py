"""Metrics: a JSONL file always, Weights & Biases through accelerate's tracker when configured."""

from __future__ import annotations

import json
import netrc
import os
import uuid
from pathlib import Path

from .schema import Recipe


def wandb_mode(requested: str) -> str:
    """auto -> online when an API key is configured (env or ~/.netrc), offline otherwise."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


class Metrics:
    """Appends one JSON object per logged update to ``output_dir/metrics.jsonl``."""

    def __init__(self, output_dir: str, accelerator, recipe: Recipe, run_id: str | None, resume_update: int) -> None:
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"
        self.run_id = run_id or uuid.uuid4().hex[:12]
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._truncate_after(resume_update)
        wandb_cfg = recipe.tracking.wandb
        self.wandb = wandb_cfg is not None and wandb_mode(wandb_cfg.mode) != "disabled"
        if self.wandb:
            mode = wandb_mode(wandb_cfg.mode)
            accelerator.init_trackers(
                wandb_cfg.project,
                config=recipe.model_dump(mode="json"),
                init_kwargs={"wandb": {"dir": output_dir, "mode": mode, "name": wandb_cfg.name,
                                       "entity": wandb_cfg.entity, "id": self.run_id, "resume": "allow"}},
            )

    def _truncate_after(self, update: int) -> None:
        """A resumed run re-logs the updates after its checkpoint: drop the stale lines."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["update"] <= update]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, values: dict) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(values) + "\n")
        if self.wandb:
            self.accelerator.log({k: v for k, v in values.items() if k != "update"}, step=values["update"])

    def close(self) -> None:
        if self.wandb:
            self.accelerator.end_training()

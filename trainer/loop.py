"""The training loop: load batches, forward, backward, (boundary) step, log, evaluate, checkpoint.

Token-weighted accumulation: the k micro-batches of a cycle are fetched
first and each micro-batch's mean loss is weighted by its share of the
cycle's loss terms (tokens; examples for classification), so k micro-batches
give exactly the loss and gradient of one batch of all of them — no
gradient-accumulation loss bug. leantrain's optimizers apply 1/k themselves,
so in ``exact``/``ema`` modes the weight is ``k·n_i/N``; in ``standard`` mode
(``.grad`` accumulation) it is ``n_i/N``.
"""

from __future__ import annotations

import json
import math
import resource
from contextlib import nullcontext
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from leantrain import optim

from . import checkpoint
from .data import Collator, MicroBatches, Position, eval_batches, load_raw, loss_items, tokenize
from .engines import build_engine
from .errors import RecipeError
from .estimate import estimate_recipe, format_table
from .model import build_model, loading_errors
from .optimizers import build_optimizer, check_combinations
from .schedules import build_scheduler
from .schema import Recipe
from .tokenizer import build_tokenizer
from .tracking import Metrics


@dataclass
class Cycle:
    """The open accumulation cycle, saved in checkpoints so a stop mid-cycle resumes exactly."""

    start: Position = field(default_factory=Position)
    taken: int = 0  # micro-batches drawn from the stream for this cycle
    processed: int = 0  # of those, folded or skipped as non-finite
    total_items: int = 0  # N: loss terms in the cycle (token weighting denominator)
    loss_sum: float = 0.0  # Σ loss_i·n_i, for the logged cycle loss
    tokens: int = 0  # input tokens processed (throughput)


class _StopRequest:
    """SIGTERM (preemption) asks the loop to checkpoint and stop after the current micro-step."""

    def __init__(self) -> None:
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread
            pass

    def _handle(self, *_):
        self.requested = True


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Trainer:
    """Builds every component from a recipe (one small builder each), then ``run()``."""

    def __init__(self, recipe: Recipe, source: str) -> None:
        check_combinations(recipe, source)  # before any heavy import or model load
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.recipe, self.source = recipe, source
        self.engine = build_engine(recipe, source)
        self.accelerator = Accelerator(mixed_precision="bf16" if recipe.precision == "bf16" else "no",
                                       log_with="wandb" if recipe.tracking.wandb else None,
                                       project_dir=recipe.output_dir, **self.engine.accelerator_kwargs())
        acc = self.accelerator
        self.engine.attach(acc)
        set_seed(recipe.seed)
        cfg = recipe.data
        with loading_errors(source, "data.dataset" if cfg.dataset else "data.files", "the dataset"):
            raw = load_raw(cfg, recipe.seed, source)
        tokenizer_key = "tokenizer.name_or_path" if recipe.tokenizer.name_or_path else "model.name_or_path"
        with loading_errors(source, tokenizer_key, "the tokenizer"):
            self.tokenizer = build_tokenizer(
                recipe, raw[cfg.train_split][cfg.text_field] if recipe.tokenizer.train_vocab_size else None)
        num_labels = recipe.model.num_labels
        if recipe.model.task == "sequence-classification" and num_labels is None:
            num_labels = len(set(raw[cfg.train_split][cfg.label_field]))
        train = tokenize(raw[cfg.train_split], recipe, self.tokenizer, source)
        self.eval_set = tokenize(raw[cfg.eval_split], recipe, self.tokenizer, source) if cfg.eval_split else None
        self.collate = Collator(self.tokenizer.pad_token_id, recipe.model.task)
        self.batches = MicroBatches(train, cfg.micro_batch_size, self.collate, seed=recipe.seed, source=source,
                                    rank=acc.process_index, world=acc.num_processes, num_workers=cfg.num_workers)
        self.k = recipe.accumulation.steps
        self.total_updates = recipe.max_updates or max(1, int(recipe.epochs * self.batches.per_epoch // self.k))

        with loading_errors(source, "model.name_or_path", "the model"):
            model = build_model(recipe, tokenizer=self.tokenizer, num_labels=num_labels)
        # ds_numel: a ZeRO-3 model built under deepspeed.zero.Init holds empty placeholders.
        self.parameter_count = sum(getattr(p, "ds_numel", p.numel()) for p in dict.fromkeys(model.parameters()))
        self.parameter_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.model, self.stepper = self.engine.prepare(model, lambda m: build_optimizer(recipe, source, m))
        self.optimizer = self.engine.optimizer  # the leantrain/torch object (has .updated)
        self.scheduler = build_scheduler(recipe, self.optimizer, self.total_updates)
        if self.scheduler is not None:
            acc.register_for_checkpointing(self.scheduler)
        self.fused = optim.fuse_into_backward(self.engine.unwrap(self.model), self.optimizer) \
            if recipe.accumulation.fused else None
        self.ema = self.optimizer if isinstance(self.optimizer, optim.EMA) else None

    # ------------------------------------------------------------------ setup
    def _log_startup(self) -> None:
        r, acc = self.recipe, self.accelerator
        effective = r.data.micro_batch_size * self.k * acc.num_processes
        tokens = f"{effective * r.data.max_length:,} tokens per update" if r.data.packing else "tokens per update vary (padding)"
        acc.print(f"leantrain: {self.source}: {self.total_updates} updates, effective batch {effective} "
                  f"= {r.data.micro_batch_size} micro-batch × k={self.k} × {acc.num_processes} rank(s); {tokens}")
        info = self._run_info()
        acc.print(f"leantrain: engine {info['engine']}, {info['world_size']} rank(s); {info['parameters']:,} parameters "
                  f"({info['parameter_dtype']}, {info['parameters_per_rank']:,} on this rank); optimizer state "
                  f"{info['optimizer_state_bytes_per_rank'] / 2**20:.1f} MiB per rank"
                  + "".join(f"; {k}={v}" for k, v in info.get("deepspeed", {}).items()))
        if acc.is_main_process:
            Path(r.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(r.output_dir) / "run_info.json").write_text(json.dumps(info, indent=1) + "\n")
        try:
            engine, ranks = info["engine"], acc.num_processes
            estimates = estimate_recipe(r, self.source, engine=engine, ranks=ranks, vocab_size=len(self.tokenizer))
            acc.print(format_table(estimates, engine=engine, ranks=ranks))
        except Exception as err:  # noqa: BLE001 - the estimate is informative, never fatal
            acc.print(f"(memory estimate unavailable: {err})")

    def _run_info(self) -> dict:
        """The facts a run is compared by, written to output_dir/run_info.json at start."""
        r = self.recipe
        info = self.engine.info()
        return {**info, "parameters": self.parameter_count,
                "parameter_dtype": self.parameter_dtype, "precision": r.precision,
                "optimizer": type(optim.fused.innermost_optimizer(self.optimizer)).__name__,
                "accumulation": {"mode": r.accumulation.mode, "steps": self.k, "fused": r.accumulation.fused}}

    def _resume(self) -> tuple[int, int, Cycle, str | None]:
        path = checkpoint.find(self.recipe.checkpointing.resume, self.recipe.output_dir)
        if path is None:
            return 0, 0, Cycle(), None
        state = checkpoint.load(self.accelerator, self.engine, path)
        self.accelerator.print(f"leantrain: resumed from {path} (update {state['update']}, micro-step {state['micro_step']})")
        cycle = Cycle(**{**state["cycle"], "start": Position(**state["cycle"]["start"])})
        if not self.accelerator.is_main_process:
            cycle.loss_sum, cycle.tokens = 0.0, 0  # the checkpoint holds every rank's sums on the main process
        saved_world = state.get("world_size", self.accelerator.num_processes)
        if saved_world != self.accelerator.num_processes:
            cycle = self._rescale_position(cycle, saved_world, state.get("micro_batch_size", self.recipe.data.micro_batch_size), path)
        return state["update"], state["micro_step"], cycle, state.get("run_id")

    def _rescale_position(self, cycle: Cycle, saved_world: int, saved_micro: int, path) -> Cycle:
        """A checkpoint from another number of ranks: the same examples consumed, counted for this run."""
        if cycle.taken:
            raise RecipeError(self.source, "checkpointing.resume", f"{path} was written mid-cycle by {saved_world} "
                              f"rank(s); resume on {self.accelerator.num_processes} only from a checkpoint at an update "
                              "boundary (checkpointing.every_updates)")
        consumed = cycle.start.batch * saved_micro * saved_world
        per_batch = self.recipe.data.micro_batch_size * self.accelerator.num_processes
        if consumed % per_batch:
            raise RecipeError(self.source, "data.micro_batch_size", f"{path} stopped after {consumed} examples of "
                              f"epoch {cycle.start.epoch}, not a multiple of micro_batch_size × ranks = {per_batch}; "
                              "keep micro_batch_size × ranks × k equal to the run that wrote it")
        return Cycle(start=Position(cycle.start.epoch, consumed // per_batch))

    # ------------------------------------------------------------------- loop
    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.accelerator.wait_for_everyone()
            self.accelerator.state.destroy_process_group()  # a clean exit on every rank, no abort at teardown

    def _run(self) -> dict:
        r, acc = self.recipe, self.accelerator
        self._log_startup()
        update, micro_step, cycle, run_id = self._resume()
        metrics = Metrics(r.output_dir, acc, r, run_id, update)
        stop = _StopRequest()
        stream = self.batches.iterate(cycle.start)
        queue = [next(stream) for _ in range(cycle.taken)][cycle.processed:]
        progress = _progress(acc, self.total_updates, update)
        micro_this_run, last = 0, {}
        self._cycle_clock = time.perf_counter()
        while update < self.total_updates:
            if cycle.taken == 0:  # open a new cycle: fetch its k micro-batches first (token weighting)
                queue = [next(stream) for _ in range(self.k)]
                cycle = Cycle(start=queue[0][0], taken=self.k,
                              total_items=self._global_items(sum(loss_items(b, r.model.task) for _, b in queue)))
            position, batch = queue.pop(0)
            skipped_items = self._micro_step(batch, cycle)
            cycle.processed += 1
            if skipped_items is not None:
                queue.append(next(stream))  # a skipped micro-batch does not count toward k
                cycle.taken += 1
                cycle.total_items += self._global_items(loss_items(queue[-1][1], r.model.task) - skipped_items)
            else:
                micro_step += 1
                micro_this_run += 1
            if not queue:  # boundary
                update += 1
                last = self._boundary(update, cycle, metrics, micro_step)
                progress(last)
                cycle = Cycle(start=self.batches.after(position))  # a checkpoint now resumes here
                if r.checkpointing.every_updates and update % r.checkpointing.every_updates == 0:
                    self._checkpoint(update, micro_step, cycle, metrics.run_id)
            stopping = stop.requested or (r.stop_after_micro_steps and micro_this_run >= r.stop_after_micro_steps)
            if stopping and update < self.total_updates:
                self._checkpoint(update, micro_step, cycle, metrics.run_id)
                acc.print(f"leantrain: stopped at update {update}, micro-step {micro_step}; resume with the same command")
                metrics.close()
                return {**last, "update": update, "micro_step": micro_step, "stopped": True}
        result = self._finish(update, micro_step, cycle, metrics, last)
        metrics.close()
        return result

    def _global_items(self, local: int) -> int:
        """Loss terms summed over ranks: the denominator that makes ranks × k micro-batches one batch."""
        if self.accelerator.num_processes == 1:
            return local
        return int(self.accelerator.reduce(torch.tensor(local, device=self.accelerator.device), "sum"))

    def _micro_step(self, batch: dict, cycle: Cycle) -> int | None:
        """Forward and backward one micro-batch (and fold it, outside standard mode).

        Returns None, or — when the loss was not finite on any rank, so every
        rank skips it together — this rank's loss terms of the skipped micro-batch.
        """
        r, acc = self.recipe, self.accelerator
        batch = {key: value.to(acc.device) for key, value in batch.items()}
        items = loss_items(batch, r.model.task)
        last_of_cycle = cycle.processed + 1 == cycle.taken
        # The engine's gradient-sync policy must cover the forward too (DDP arms its reducer there).
        with self.engine.micro_step(self.model, last_of_cycle=last_of_cycle):
            with acc.autocast():
                loss = self.model(**batch).loss
            if not self._finite_on_all_ranks(loss):
                acc.print(f"leantrain: skipped a micro-batch with a non-finite loss (this rank: {loss.item()})")
                return items
            # Ranks' gradients are averaged (× world undoes it); leantrain's optimizers apply 1/k (× k).
            share = items / cycle.total_items * acc.num_processes
            scale = share if r.accumulation.mode == "standard" else share * self.k
            self.engine.backward(loss * scale, last_of_cycle=last_of_cycle)
        if r.accumulation.mode != "standard":
            self.stepper.step()  # folds this micro-batch; moves parameters at the boundary
            self.stepper.zero_grad(set_to_none=True)
        cycle.loss_sum += loss.item() * items
        cycle.tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        return None

    def _finite_on_all_ranks(self, loss: torch.Tensor) -> bool:
        """Ranks must skip together, or their micro-step counts (and collectives) diverge."""
        finite = optim.finite_loss(loss)
        if self.accelerator.num_processes == 1:
            return finite
        flags = self.accelerator.reduce(torch.tensor(int(not finite), device=self.accelerator.device), "sum")
        return int(flags) == 0

    def _boundary(self, update: int, cycle: Cycle, metrics: Metrics, micro_step: int) -> dict:
        r, acc = self.recipe, self.accelerator
        if r.accumulation.mode == "standard":
            if r.optimizer.max_grad_norm is not None:
                self.engine.clip_grad_norm_(self.model, r.optimizer.max_grad_norm)
            self.stepper.step()
            self.stepper.zero_grad(set_to_none=True)
        if not getattr(self.optimizer, "updated", True):
            raise RuntimeError(f"internal: the optimizer did not update at the boundary of update {update}")
        if self.scheduler is not None:
            self.scheduler.step()
        sums = acc.reduce(torch.tensor([cycle.loss_sum, float(cycle.tokens)], dtype=torch.float64, device=acc.device),
                          "sum").tolist()  # every rank's loss terms and tokens
        values = {"update": update, "loss": sums[0] / cycle.total_items, "lr": self.optimizer.param_groups[0]["lr"],
                  "micro_step": micro_step, "tokens": int(sums[1]), "tokens_per_s": self._throughput(int(sums[1])),
                  "peak_memory_mib": _peak_memory_mib(acc.device)}
        if self.fused is not None:
            counts = self.fused.nonfinite_grads  # all ranks: one all-reduce of the counts, one host sync
            if counts:
                values["nonfinite_grads"] = sum(counts.values())
        if r.eval.every_updates and update % r.eval.every_updates == 0 and update < self.total_updates:
            values.update(self.evaluate())
        if update % r.tracking.log_every_updates == 0 or update == self.total_updates:
            metrics.log(values)
        return values

    def _throughput(self, tokens: int) -> float:
        """Input tokens per second over the cycle just closed, all ranks."""
        now = time.perf_counter()
        elapsed, self._cycle_clock = now - self._cycle_clock, now
        return tokens / elapsed if elapsed > 0 else float("nan")

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.eval_set is None:
            return {}
        r, acc = self.recipe, self.accelerator
        loader = eval_batches(self.eval_set, r.data.eval_batch_size or r.data.micro_batch_size, self.collate,
                              rank=acc.process_index, world=acc.num_processes, max_batches=r.eval.max_batches)
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=acc.device)  # loss·n, n, correct, examples
        with self.ema.averaged_weights() if self.ema else nullcontext():
            for batch in loader:
                batch = {key: value.to(acc.device) for key, value in batch.items()}
                with acc.autocast():
                    out = self.model(**batch)
                n = loss_items(batch, r.model.task)
                sums[0] += out.loss.double() * n
                sums[1] += n
                if r.model.task == "sequence-classification":
                    sums[2] += (out.logits.argmax(-1) == batch["labels"]).sum()
                    sums[3] += batch["labels"].numel()
        self.model.train()
        sums = acc.reduce(sums, "sum")
        result = {"eval_loss": (sums[0] / sums[1].clamp(min=1)).item()}
        if r.model.task == "sequence-classification":
            result["eval_accuracy"] = (sums[2] / sums[3].clamp(min=1)).item()
        else:
            result["eval_perplexity"] = math.exp(min(result["eval_loss"], 50.0))
        return result

    def _checkpoint(self, update: int, micro_step: int, cycle: Cycle, run_id: str) -> None:
        acc = self.accelerator
        sums = acc.reduce(torch.tensor([cycle.loss_sum, float(cycle.tokens)], dtype=torch.float64, device=acc.device), "sum")
        saved_cycle = {**asdict(cycle), "loss_sum": float(sums[0]), "tokens": int(sums[1])}  # every rank's, on the main
        state = {"update": update, "micro_step": micro_step, "run_id": run_id, "cycle": saved_cycle,
                 "world_size": acc.num_processes, "micro_batch_size": self.recipe.data.micro_batch_size,
                 "engine": self.engine.name}
        checkpoint.save(acc, self.engine, self.recipe.output_dir, state, self.recipe.checkpointing.keep_last)

    def _finish(self, update: int, micro_step: int, cycle: Cycle, metrics: Metrics, last: dict) -> dict:
        r, acc = self.recipe, self.accelerator
        final_eval = self.evaluate()
        if final_eval:
            metrics.log({"update": update, **{k: v for k, v in last.items() if k != "update"}, **final_eval})
        if r.checkpointing.every_updates:
            self._checkpoint(update, micro_step, cycle, metrics.run_id)
        acc.wait_for_everyone()
        with self.ema.averaged_weights() if self.ema else nullcontext():
            state_dict = self.engine.full_state_dict(self.model)  # collective under FSDP2 / ZeRO-3; None: the model's
            if acc.is_main_process:
                path = checkpoint.save_final(self.engine.unwrap(self.model), self.tokenizer, r.output_dir, state_dict)
                acc.print(f"leantrain: done, {update} updates; final model in {path}")
        if self.fused is not None:
            counts = self.fused.nonfinite_grads
            if counts:
                acc.print(self.fused.report(counts))
        return {**last, **final_eval, "update": update, "micro_step": micro_step, "stopped": False}


def _progress(accelerator, total: int, start: int):
    """A tqdm bar on a TTY; plain log lines otherwise (CI logs, SLURM files)."""
    if sys.stderr.isatty() and accelerator.is_main_process:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, unit="update", dynamic_ncols=True)

        def show(values):
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}" if values["lr"] is not None else "rel",
                            tok_s=f"{values['tokens_per_s']:.0f}", mem=f"{values['peak_memory_mib']:.0f}MiB")
        return show

    def log(values):
        if accelerator.is_main_process:
            extra = "".join(f" {k}={v:.4f}" for k, v in values.items() if k.startswith("eval_"))
            lr = f"{values['lr']:.2e}" if values["lr"] is not None else "relative"
            print(f"update {values['update']}/{total} loss={values['loss']:.4f} lr={lr} "
                  f"tok/s={values['tokens_per_s']:.0f} mem={values['peak_memory_mib']:.0f}MiB{extra}", flush=True)
    return log


def train(recipe: Recipe, source: str) -> dict:
    return Trainer(recipe, source).run()

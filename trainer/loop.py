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

import hashlib
import json
import math
import resource
import shutil
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
from . import validation
from .engines import build_engine
from .errors import Diverged, RecipeError
from .estimate import estimate_recipe, format_table
from .model import build_config, build_model, loading_errors
from .optimizers import build_optimizer, check_combinations, is_zeroth_order, resolve_class, resolve_objective
from .regularization import GradientPenalty, flood
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
    skipped: int = 0  # micro-batches skipped for a non-finite loss (replaced by the next ones)
    regularised_sum: float = 0.0  # Σ (flooded loss + λ‖∇L‖²)·n_i, when a regulariser is on


class _StopRequest:
    """SIGTERM or SIGUSR1 (preemption, SLURM's warning before a time limit) asks the loop to
    finish the current micro-step, checkpoint and exit 143.

    The handler only records the signal: a second one while the checkpoint is
    being written changes nothing (the write is atomic anyway).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal: str | None = None
        for sig in self.SIGNALS:
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, _frame):
        self.signal = self.signal or signal.Signals(signum).name


RUN_FILES = ("checkpoints", "metrics.jsonl", "final", "run_info.json")  # what makes an output_dir hold a run


def _scheduled_lr(scheduler, update: int) -> float:
    """The lr ``scheduler`` (a LambdaLR or PiecewiseLinearLR) gives after ``update`` updates."""
    base = scheduler.base_lrs[0]
    if hasattr(scheduler, "multiplier"):
        return base * scheduler.multiplier(update)
    return base * scheduler.lr_lambdas[0](update)


def _lr(value) -> str:
    return "relative" if value is None else f"{float(value):.3g}"


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
        if is_zeroth_order(resolve_class(recipe, source)) and self.engine.name != "ddp":
            raise RecipeError(source, "optimizer.name", f"ZerothOrder perturbs whole parameters with one seed; "
                              f"{self.engine.name} shards them: use DDP or one process")
        set_seed(recipe.seed)
        cfg = recipe.data
        validation.check_model_path(recipe, source)
        with loading_errors(source, "model.name_or_path", "the model config"):
            config = build_config(recipe.model)
        validation.check_model_limits(recipe, source, config)
        self._prepare_output_dir()
        summary = validation.check_files(recipe, source) if cfg.files else validation.DataSummary()  # every line
        with loading_errors(source, "data.dataset" if cfg.dataset else "data.files", "the dataset"):
            raw = load_raw(cfg, recipe.seed, source)
        if cfg.dataset:
            for split in filter(None, (cfg.train_split, cfg.eval_split)):
                validation.check_dataset(raw[split], f"{cfg.dataset}[{split}]", recipe, summary)
        tokenizer_key = "tokenizer.name_or_path" if recipe.tokenizer.name_or_path else "model.name_or_path"
        with loading_errors(source, tokenizer_key, "the tokenizer"):
            self.tokenizer = build_tokenizer(
                recipe, raw[cfg.train_split][cfg.text_field] if recipe.tokenizer.train_vocab_size else None)
        num_labels = recipe.model.num_labels
        if recipe.model.task == "sequence-classification":
            num_labels, origin = validation.infer_num_labels(recipe, summary, config)
            acc.print(f"leantrain: num_labels = {num_labels} ({origin})")
        train = tokenize(raw[cfg.train_split], recipe, self.tokenizer, source)
        self.eval_set = tokenize(raw[cfg.eval_split], recipe, self.tokenizer, source) if cfg.eval_split else None
        self.collate = Collator(self.tokenizer.pad_token_id, recipe.model.task)
        self.batches = MicroBatches(train, cfg.micro_batch_size, self.collate, seed=recipe.seed, source=source,
                                    rank=acc.process_index, world=acc.num_processes, num_workers=cfg.num_workers)
        self.k = recipe.accumulation.steps
        self.total_updates = recipe.max_updates or max(1, int(recipe.epochs * self.batches.per_epoch // self.k))

        with loading_errors(source, "model.name_or_path", "the model"):
            model = build_model(recipe, tokenizer=self.tokenizer, num_labels=num_labels)
        # ds_numel / ds_shape: a ZeRO-3 model built under deepspeed.zero.Init holds empty placeholders.
        self.parameter_count = sum(getattr(p, "ds_numel", p.numel()) for p in dict.fromkeys(model.parameters()))
        shapes = [(n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in model.named_parameters()]
        self.model_fingerprint = {"parameters": self.parameter_count,
                                  "shapes": hashlib.blake2b(repr(shapes).encode(), digest_size=8).hexdigest()}
        self.parameter_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.model, self.stepper = self.engine.prepare(model, lambda m: build_optimizer(recipe, source, m))
        self.optimizer = self.engine.optimizer  # the leantrain/torch object (has .updated)
        self.scheduler = build_scheduler(recipe, self.optimizer, self.total_updates)
        if self.scheduler is not None:
            acc.register_for_checkpointing(self.scheduler)
        self.fused = optim.fuse_into_backward(self.engine.unwrap(self.model), self.optimizer) \
            if recipe.accumulation.fused else None
        self.zeroth_order = isinstance(self.engine.inner_optimizer, optim.ZerothOrder)
        self.objective = resolve_objective(recipe, source) if self.zeroth_order else None
        reg = recipe.regularization
        self.regularised = reg.flooding is not None or reg.gradient_penalty is not None
        self.penalty = None
        if reg.gradient_penalty is not None:
            if self.engine.name != "ddp" or (acc.num_processes > 1 and recipe.accumulation.mode == "standard"):
                raise RecipeError(source, "regularization.gradient_penalty", f"not with {self.engine.name} on "
                                  f"{acc.num_processes} process(es) in {recipe.accumulation.mode} mode: its gradients "
                                  "must be this rank's own, whole (DDP or one process, mode exact or ema)")
            self.penalty = GradientPenalty(reg.gradient_penalty, reg.penalty_radius)
        self.ema = self.optimizer if isinstance(self.optimizer, optim.EMA) else None

    # ------------------------------------------------------------------ setup
    def _prepare_output_dir(self) -> None:
        """``resume: never`` in a directory that holds a run: refused, or cleared with ``overwrite``."""
        r, acc = self.recipe, self.accelerator
        out = Path(r.output_dir)
        found = [name for name in RUN_FILES if (out / name).exists()]
        if r.checkpointing.resume == "never" and found:
            if not r.overwrite:
                raise RecipeError(self.source, "checkpointing.resume", f"never, but output_dir {str(out)!r} holds a run "
                                  f"({', '.join(found)}); set overwrite: true to start over in it (they are deleted), "
                                  "resume: auto to continue it, or choose another output_dir")
            if acc.is_main_process:
                for name in found:
                    path = out / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            acc.wait_for_everyone()
        validation.check_output_dir(r, self.source, create=True)

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
        acc = self.accelerator
        chosen = [None]
        if acc.is_main_process:  # one rank reads and verifies the checkpoints, every rank loads its choice
            chosen = [checkpoint.find(self.recipe.checkpointing.resume, self.recipe.output_dir, self.source,
                                      warn=lambda line: print(line, file=sys.stderr))]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            chosen = broadcast_object_list(chosen)
        path = chosen[0]
        if path is None:
            return 0, 0, Cycle(), None
        state = json.loads((Path(path) / checkpoint.TRAINER_STATE).read_text())
        self._check_same_model(state, path)
        try:
            checkpoint.load(acc, self.engine, Path(path))
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RecipeError(self.source, "checkpointing.resume", f"cannot load {str(path)!r}: {first[:300]}") from None
        acc.print(f"leantrain: resumed from {path} (update {state['update']}, micro-step {state['micro_step']})")
        self._explain_changes(state)
        cycle = Cycle(**{**state["cycle"], "start": Position(**state["cycle"]["start"])})
        if not self.accelerator.is_main_process:
            cycle.loss_sum, cycle.tokens = 0.0, 0  # the checkpoint holds every rank's sums on the main process
        saved_world = state.get("world_size", self.accelerator.num_processes)
        if saved_world != self.accelerator.num_processes:
            cycle = self._rescale_position(cycle, saved_world, state.get("micro_batch_size", self.recipe.data.micro_batch_size), path)
        return state["update"], state["micro_step"], cycle, state.get("run_id")

    def _check_same_model(self, state: dict, path) -> None:
        saved = state.get("model")
        if saved is not None and saved != self.model_fingerprint:
            raise RecipeError(self.source, "checkpointing.resume", f"{str(path)!r} holds a model of {saved['parameters']:,} "
                              f"parameters (shapes {saved['shapes']}); this recipe builds {self.parameter_count:,} "
                              f"(shapes {self.model_fingerprint['shapes']}): resume with the recipe that wrote it")

    def _explain_changes(self, state: dict) -> None:
        """A resumed run whose length or schedule changed says what changes, from which update."""
        old_total, old_schedule = state.get("max_updates"), state.get("schedule")
        new_schedule = self.recipe.schedule.model_dump(mode="json")
        if old_total in (None, self.total_updates) and old_schedule in (None, new_schedule):
            return
        update = state["update"]
        now = self.optimizer.param_groups[0]["lr"]
        then = _scheduled_lr(self.scheduler, update) if self.scheduler is not None else now
        changed = []
        if old_total not in (None, self.total_updates):
            changed.append(f"max_updates {old_total} → {self.total_updates}")
        if old_schedule not in (None, new_schedule):
            changed.append(f"schedule {old_schedule} → {new_schedule}")
        self.accelerator.print(f"leantrain: resuming with {'; '.join(changed)}: from update {update + 1} the lr follows "
                               f"the new schedule ({_lr(now)} at the checkpoint, {_lr(then)} under the new one)")

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
        try:
            return self._loop(update, micro_step, cycle, metrics)
        finally:
            metrics.close()

    def _loop(self, update: int, micro_step: int, cycle: Cycle, metrics: Metrics) -> dict:
        r, acc = self.recipe, self.accelerator
        self.stop = _StopRequest()
        self._stop_everywhere = False
        self._skips_in_a_row = self._nonfinite_updates_in_a_row = 0
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
                cycle.skipped += 1
                cycle.total_items += self._global_items(loss_items(queue[-1][1], r.model.task) - skipped_items)
                self._skips_in_a_row += 1
                if self._skips_in_a_row >= r.max_nonfinite_updates * self.k:
                    self._diverged(update, f"{self._skips_in_a_row} consecutive micro-batches "
                                   f"({r.max_nonfinite_updates} updates' worth) had a non-finite loss")
            else:
                self._skips_in_a_row = 0
                micro_step += 1
                micro_this_run += 1
            if not queue:  # boundary
                update += 1
                last = self._boundary(update, cycle, metrics, micro_step)
                progress(last)
                cycle = Cycle(start=self.batches.after(position))  # a checkpoint now resumes here
                if r.checkpointing.every_updates and update % r.checkpointing.every_updates == 0:
                    self._checkpoint(update, micro_step, cycle, metrics.run_id)
            requested = self._stop_everywhere or (r.stop_after_micro_steps and micro_this_run >= r.stop_after_micro_steps)
            if requested and update < self.total_updates:
                self._checkpoint(update, micro_step, cycle, metrics.run_id)
                why = f" on {self.stop.signal or 'a signal on another rank'}" if self._stop_everywhere else ""
                acc.print(f"leantrain: stopped{why} at update {update}, micro-step {micro_step}; checkpoint written, "
                          "resume with the same command")
                return {**last, "update": update, "micro_step": micro_step, "stopped": True,
                        "signal": (self.stop.signal or "SIGTERM") if self._stop_everywhere else None}
        return self._finish(update, micro_step, cycle, metrics, last)

    def _diverged(self, update: int, what: str) -> None:
        last = checkpoint.latest(self.recipe.output_dir, warn=lambda line: None) if self.recipe.checkpointing.every_updates else None
        raise Diverged(f"{what} at update {update}; last good checkpoint: {last or 'none'} "
                       "(lower optimizer.lr, or raise max_nonfinite_updates to wait longer)")

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
        # Ranks' gradients are averaged (× world undoes it); leantrain's optimizers apply 1/k (× k).
        share = items / cycle.total_items * acc.num_processes
        scale = share if r.accumulation.mode == "standard" else share * self.k
        if self.zeroth_order:
            return self._zeroth_order_micro_step(batch, cycle, items, scale)
        last_of_cycle = cycle.processed + 1 == cycle.taken
        # The engine's gradient-sync policy must cover the forward too (DDP arms its reducer there).
        with self.engine.micro_step(self.model, last_of_cycle=last_of_cycle):
            with acc.autocast():
                loss = self.model(**batch).loss
            if not self._agree(loss):
                acc.print(f"leantrain: skipped a micro-batch with a non-finite loss (this rank: {loss.item()})")
                return items
            objective = flood(loss, r.regularization.flooding)
            self.engine.backward(objective * scale, last_of_cycle=last_of_cycle)
            regularised = objective.item()
            if self.penalty is not None:
                def again():
                    with acc.autocast():
                        second = flood(self.model(**batch).loss, r.regularization.flooding)
                    self.engine.backward(second * scale, last_of_cycle=last_of_cycle)

                trained = [p for g in self.optimizer.param_groups for p in g["params"]]
                regularised += self.penalty.weight * self.penalty.apply(trained, scale, again)
        if r.accumulation.mode != "standard":
            self.stepper.step()  # folds this micro-batch; moves parameters at the boundary
            self.stepper.zero_grad(set_to_none=True)
        self._count(cycle, batch, items, loss.item(), regularised)
        return None

    def _zeroth_order_micro_step(self, batch: dict, cycle: Cycle, items: int, scale: float) -> None:
        """Forward passes only: the optimizer evaluates the micro-batch at θ ± ε·z through a closure.

        In eval mode (no dropout), or the two evaluations would differ by more
        than the perturbation. A non-finite evaluation adds nothing to the
        cycle (ZerothOrder skips it) and is counted as skipped.
        """
        acc = self.accelerator
        self.model.eval()

        def closure():
            with acc.autocast():
                return float(self.objective(self.model(**batch), batch)) * scale

        value = self.optimizer.step(closure) / scale  # (accelerate's wrapper would drop the returned value)
        self.model.train()
        if not math.isfinite(value):
            cycle.skipped += 1
        self._agree(torch.tensor(value))  # the ranks' stop requests travel with it
        self._count(cycle, batch, items, value if math.isfinite(value) else 0.0, None)
        return None

    def _count(self, cycle: Cycle, batch: dict, items: int, loss: float, regularised: float | None) -> None:
        cycle.loss_sum += loss * items
        if regularised is not None and self.regularised:
            cycle.regularised_sum += regularised * items
        cycle.tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()

    def _agree(self, loss: torch.Tensor) -> bool:
        """Whether every rank's loss is finite; also whether any rank was asked to stop.

        Ranks must skip and stop together, or their micro-step counts (and the
        collectives inside step() and checkpoints) diverge: both flags travel in
        one all-reduce per micro-step.
        """
        acc = self.accelerator
        flags = torch.tensor([0.0 if optim.finite_loss(loss) else 1.0, float(self.stop.requested)], device=acc.device)
        if acc.num_processes > 1:
            flags = acc.reduce(flags, "sum")
        self._stop_everywhere = bool(flags[1] > 0)
        return bool(flags[0] == 0)

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
        sums = acc.reduce(torch.tensor([cycle.loss_sum, float(cycle.tokens), cycle.regularised_sum],
                                       dtype=torch.float64, device=acc.device), "sum").tolist()  # every rank's
        values = {"update": update, "loss": sums[0] / cycle.total_items, "lr": self.optimizer.param_groups[0]["lr"],
                  "micro_step": micro_step, "tokens": int(sums[1]), "tokens_per_s": self._throughput(int(sums[1])),
                  "peak_memory_mib": _peak_memory_mib(acc.device)}
        if self.regularised:
            values["regularised_loss"] = sums[2] / cycle.total_items
        if cycle.skipped:
            values["skipped_micro_batches"] = cycle.skipped
        if self.fused is not None:
            counts = self.fused.nonfinite_grads  # all ranks: one all-reduce of the counts, one host sync
            total = sum(counts.values())
            if total:
                values["nonfinite_grads"] = total
            new = total - getattr(self, "_nonfinite_seen", 0)
            self._nonfinite_seen = total
            self._nonfinite_updates_in_a_row = self._nonfinite_updates_in_a_row + 1 if new else 0
            if self._nonfinite_updates_in_a_row >= r.max_nonfinite_updates:
                self._diverged(update, f"{self._nonfinite_updates_in_a_row} consecutive updates had non-finite gradients")
        if r.eval.every_updates and update % r.eval.every_updates == 0 and update < self.total_updates:
            values.update(self.evaluate())
        if update % r.tracking.log_every_updates == 0 and update < self.total_updates:
            metrics.log(values)  # the last update is logged once, by _finish, with the final evaluation
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
                 "engine": self.engine.name, "model": self.model_fingerprint, "max_updates": self.total_updates,
                 "schedule": self.recipe.schedule.model_dump(mode="json")}
        checkpoint.save(acc, self.engine, self.recipe.output_dir, state, self.recipe.checkpointing.keep_last)

    def _finish(self, update: int, micro_step: int, cycle: Cycle, metrics: Metrics, last: dict) -> dict:
        r, acc = self.recipe, self.accelerator
        final_eval = self.evaluate()
        if last:  # a run resumed after its last update has logged it already
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

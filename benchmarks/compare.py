"""End to end: ``transformers.Trainer`` against ``leantrain train``, same model, data, batch, k, precision and updates.

    python benchmarks/compare.py [--size default|quickstart|tiny|large] [--updates 12]
                        [--micro-batch 4] [--k 4] [--seq 128] [--repeats 3] [--warmup 2] [--configs a,b]
                        [--device cpu|cuda] [--precision fp32|bf16] [--threads N] [--code-ref HEAD] [--wait-idle 60]
                        [--timeout 900] [--out benchmarks/results] [--keep] [--smoke]

Setup, once: a byte-level BPE trained on the built-in ``python-docs`` corpus
(``leantrain.trainer.tokenizer.train_bpe``, the quickstart's tokenizer) and a
GPT-2-shaped model built from its config (``--size default``: 6 layers, n_embd
512, 8 heads, ``--seq`` positions, dropout 0, about 23M parameters, wte/lm_head
tied), random init with ``seed``, saved with the tokenizer into one folder.
Both trainers load that folder, so they start from the same weights.

Data: ``python-docs`` packed into ``--seq``-token blocks. Both sides tokenise
and order it with leantrain's own code (``load_recipe`` of the same YAML,
``load_raw``, ``tokenize``, ``MicroBatches``, ``Collator``), so update u of every
row sees the same k micro-batches. The HF side gets them as a dataset in that
order with ``train_sampling_strategy="sequential"``.

Configurations, each in its own fresh process:

1. ``hf_adamw``: ``transformers.Trainer``, ``optim="adamw_torch_fused"`` when torch
   has a fused AdamW for the device (else ``adamw_torch``), ``gradient_accumulation_steps=k``;
2. ``hf_adafactor``: the same Trainer with ``optim="adafactor"``;
3. ``lt_adamw_standard``: ``python -m leantrain.trainer train RECIPE.yaml`` (= ``leantrain train``), AdamW,
   ``accumulation: {mode: standard}`` (``.grad`` accumulation);
4. ``lt_adamw_exact_fused``: the same, ``accumulation: {mode: exact, fused: true}``;
5. ``lt_adafactor_fused``: the quickstart's optimizer (AdaFactor, lr 3e-3, no relative step or parameter
   scale, beta1 0.9 with ``momentum_on: grad`` in bf16, weight decay 0.01), exact, fused.

Same hyperparameters on both sides: constant lr (AdamW 1e-3, Adafactor 3e-3),
no warm-up, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on matrices (not on
biases and LayerNorm), no gradient clipping (``max_grad_norm=0``; leantrain's
fused mode refuses it), same seed, no eval, no checkpoints.

Measured per run:

* time per update: on the HF side a ``TrainerCallback`` stamps ``perf_counter``
  at ``on_train_begin`` and at every ``on_step_end`` (after ``optimizer.step``,
  scheduler and ``zero_grad``); on leantrain's side ``tokens / tokens_per_s`` of
  each line of ``metrics.jsonl``, which the loop measures between the same
  points of consecutive updates. Median over the updates after ``--warmup``;
  tokens/s = tokens per update / that median. Model build, tokenisation and the
  final save are outside it;
* peak memory: ``ru_maxrss`` read inside the process at the end of the last
  update (HF: the callback; leantrain: ``peak_memory_mib`` of the last metrics
  line), and on GPU ``torch.cuda.max_memory_allocated`` the same way. The whole
  process's ``ru_maxrss`` (``os.wait4``; includes leantrain's final
  ``save_pretrained``) is in the JSON and the table too;
* a floor: one process that imports the same stack, loads the model and
  prepares the data, then stops; "peak − floor" is what training adds;
* persistent state B/param: parameters + the gradient buffer kept across the
  cycle + optimizer state. HF: measured (``.grad`` bytes at
  ``on_pre_optimizer_step``, state tensors after training); leantrain:
  ``run_info.json``'s optimizer state, plus the ``.grad`` buffer in standard mode;
* loss per update (HF: ``logs["loss"]`` with ``logging_steps=1``; leantrain:
  ``metrics.jsonl``) and the load other processes put on the machine during the
  run (``/proc/stat`` busy time minus the run's own CPU time, in cores).

The configurations run ``--repeats`` times, interleaved, each after waiting (at
most ``--wait-idle`` s) for a >= 90% idle CPU; the table shows medians. The
full default run takes about 10–11 minutes on an idle 2-core CPU and about
2 GiB of RAM at once (a run of about 1.3 GiB beside this process); ``--smoke``
(tiny model, 4 updates, 1 repeat) about a minute.
Writes ``compare.{json,md,png}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _runs import CODE_DIRS, export_code, wait_for_idle

REPO = Path(__file__).resolve().parent.parent
BASELINE = "hf_adamw"
LEAN_ADAFACTOR = "lt_adafactor_fused"
SPEED_TARGET, MEMORY_TARGET = 0.95, 0.55
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
ADAFACTOR_LR = 3e-3  # the quickstart's
WEIGHT_DECAY = 0.01
SIZES = {  # GPT-2-shaped; default is the measured one
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, vocab=512),
    "quickstart": dict(n_layer=4, n_embd=128, n_head=4, vocab=2048),
    "default": dict(n_layer=6, n_embd=512, n_head=8, vocab=8192),
    "large": dict(n_layer=12, n_embd=768, n_head=12, vocab=16384),  # for a GPU
}
_ADAMW_RECIPE = {"name": "AdamW", "lr": ADAMW["lr"], "betas": list(ADAMW["betas"]), "eps": ADAMW["eps"],
                 "weight_decay": ADAMW["weight_decay"]}
CONFIGS = {
    "hf_adamw": dict(side="hf", label="transformers.Trainer AdamW (.grad accumulation)"),
    "hf_adafactor": dict(side="hf", label="transformers.Trainer Adafactor (.grad accumulation)"),
    "lt_adamw_standard": dict(side="leantrain", label="leantrain AdamW, standard (.grad)",
                              optimizer=_ADAMW_RECIPE, accumulation={"mode": "standard", "fused": False}),
    "lt_adamw_exact_fused": dict(side="leantrain", label="leantrain AdamW, exact, fused",
                                 optimizer=_ADAMW_RECIPE, accumulation={"mode": "exact", "fused": True}),
    "lt_adafactor_fused": dict(side="leantrain", label="leantrain AdaFactor bf16 momentum, exact, fused",
                               optimizer={"name": "AdaFactor", "lr": ADAFACTOR_LR, "relative_step": False,
                                          "scale_parameter": False, "beta1": 0.9, "momentum_on": "grad",
                                          "momentum_dtype": "bfloat16", "weight_decay": WEIGHT_DECAY},
                               accumulation={"mode": "exact", "fused": True}),
}


def child_env(args, code: Path | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # both trainers pick the GPU when they see one
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


# ------------------------------------------------------------------ setup
def build_model_dir(root: Path, size: str, seq: int, seed: int) -> dict:
    """The quickstart's tokenizer (BPE on python-docs) and a random-init GPT-2 of ``size``, saved together."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from leantrain.trainer.data import python_docs_paragraphs
    from leantrain.trainer.tokenizer import train_bpe

    dims = SIZES[size]
    tokenizer = train_bpe(python_docs_paragraphs(), dims["vocab"])
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=seq, n_embd=dims["n_embd"], n_layer=dims["n_layer"],
                        n_head=dims["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    path = root / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return dict(path=str(path), size=size, parameters=sum(p.numel() for p in model.parameters()),
                vocab_size=len(tokenizer), **{k: dims[k] for k in ("n_layer", "n_embd", "n_head")})


def write_recipe(root: Path, name: str, model_dir: str, args) -> Path:
    """The YAML ``leantrain train`` runs for ``name``; the HF worker loads the same file for its data."""
    import yaml

    cfg = CONFIGS[name]
    recipe = {
        "model": {"name_or_path": model_dir, "task": "causal-lm", "dtype": "float32"},
        "data": {"builtin": "python-docs", "eval_split": None, "packing": True, "max_length": args.seq,
                 "micro_batch_size": args.micro_batch},
        "optimizer": dict(cfg.get("optimizer", _ADAMW_RECIPE)),
        "accumulation": {"steps": args.k, **cfg.get("accumulation", {"mode": "standard", "fused": False})},
        "schedule": {"name": "constant", "warmup_updates": 0},
        "checkpointing": {"every_updates": None, "resume": "never"},
        "precision": args.precision,
        "max_updates": args.updates,
        "seed": args.seed,
        "output_dir": str(root / "unused"),
    }
    path = root / f"{name}.yaml"
    path.write_text(f"# python -m leantrain.trainer train {path} output_dir=...\n"
                    + yaml.safe_dump(recipe, sort_keys=False))
    return path


def prepare_data(recipe_path: Path, updates: int, k: int):
    """The tokenizer and the first ``updates × k`` micro-batches exactly as ``leantrain train`` draws them."""
    from leantrain.trainer.data import Collator, MicroBatches, Position, load_raw, tokenize
    from leantrain.trainer.recipe import load_recipe
    from leantrain.trainer.tokenizer import build_tokenizer

    recipe, source = load_recipe(str(recipe_path), [])
    cfg = recipe.data
    raw = load_raw(cfg, recipe.seed, source)
    tokenizer = build_tokenizer(recipe)
    train = tokenize(raw[cfg.train_split], recipe, tokenizer, source)
    batches = MicroBatches(train, cfg.micro_batch_size, Collator(tokenizer.pad_token_id, recipe.model.task),
                           seed=recipe.seed, source=source)
    stream = batches.iterate(Position())
    return tokenizer, [next(stream)[1] for _ in range(updates * k)]


# ------------------------------------------------------------------ workers (own processes)
def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def floor_worker(spec: dict) -> dict:
    """The shared floor: the stack imported, the model loaded, the data prepared, no training."""
    import accelerate  # noqa: F401  (both trainers run on it)
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    _, batches = prepare_data(Path(spec["recipe"]), spec["updates"], spec["k"])
    return dict(rss_kib=_rss_kib(), peak_kib=_peak_kib(), batches=len(batches),
                params=sum(p.numel() for p in model.parameters()), threads=torch.get_num_threads())


def hf_worker(name: str, spec: dict, out: Path) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    device = torch.device(spec["device"])
    tokenizer, batches = prepare_data(Path(spec["recipe"]), spec["updates"], spec["k"])
    rows = [{key: value[i] for key, value in b.items()} for b in batches for i in range(len(b["input_ids"]))]
    digest = hashlib.blake2b(torch.stack([r["input_ids"] for r in rows]).numpy().tobytes(), digest_size=8).hexdigest()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    # GPT2LMHeadModel's class name maps to no loss type, so the Trainer (5.24) would count every label, not the
    # T − 1 shifted ones, in num_items_in_batch: loss and gradient (T − 1)/T too small. The model's loss function
    # is ForCausalLMLoss either way; naming it makes the Trainer count what the loss averages over.
    stock_loss_type, model.loss_type = model.loss_type, "ForCausalLM"
    params = list(dict.fromkeys(model.parameters()))
    if name == "hf_adamw":
        try:  # the Trainer's default on torch >= 2.8 where the device has the kernel
            torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
            optim = "adamw_torch_fused"
        except (RuntimeError, ValueError):
            optim = "adamw_torch"
        lr = ADAMW["lr"]
    else:
        optim, lr = "adafactor", ADAFACTOR_LR

    class Probe(TrainerCallback):
        """Clock, memory and loss at every optimizer update, measured like leantrain's loop does."""

        def __init__(self):
            self.stamps, self.losses, self.peaks, self.cuda_peaks, self.grad_bytes = [], [], [], [], None

        def on_train_begin(self, args, state, control, **kw):
            self.stamps.append(time.perf_counter())

        def on_pre_optimizer_step(self, args, state, control, **kw):
            if self.grad_bytes is None:  # the .grad buffer the cycle accumulated into
                self.grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)

        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":  # leantrain's clock also reads after a host sync (its metrics' .tolist())
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            self.peaks.append(_peak_kib() / 1024)
            if device.type == "cuda":
                self.cuda_peaks.append(torch.cuda.max_memory_allocated() / 2**20)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    probe = Probe()
    targs = TrainingArguments(
        output_dir=str(out / "hf"), max_steps=spec["updates"], per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["k"], learning_rate=lr, weight_decay=WEIGHT_DECAY,
        adam_beta1=ADAMW["betas"][0], adam_beta2=ADAMW["betas"][1], adam_epsilon=ADAMW["eps"], max_grad_norm=0.0,
        lr_scheduler_type="constant", warmup_steps=0, optim=optim, logging_strategy="steps", logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, seed=spec["seed"],
        data_seed=spec["seed"], train_sampling_strategy="sequential", dataloader_num_workers=0,
        use_cpu=device.type == "cpu", bf16=spec["precision"] == "bf16", remove_unused_columns=False)
    collate = lambda examples: {key: torch.stack([e[key] for e in examples]) for key in examples[0]}  # noqa: E731
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[probe])
    trainer.train()

    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    n = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    named = dict(model.named_parameters())  # the tied lm_head.weight is wte here, listed once
    decayed = set(trainer.get_decay_parameter_names(model)) & set(named)
    matrices = {pn for pn, p in named.items() if p.dim() >= 2}
    seconds = [b - a for a, b in zip(probe.stamps, probe.stamps[1:])]
    return dict(
        config=name, side="hf", optim=optim, optimizer=type(opt).__name__,
        torch_fused=opt.defaults.get("fused"), hyper={key: value for key, value in opt.defaults.items()
                                                      if isinstance(value, (int, float, bool, str, tuple, type(None)))},
        groups=[{"params": len(g["params"]), "lr": g["lr"], "weight_decay": g.get("weight_decay")}
                for g in opt.param_groups],
        decay_same_as_leantrain=decayed == matrices, stock_loss_type=stock_loss_type, params=n, param_bytes=param_bytes,
        grad_bytes_in_cycle=probe.grad_bytes, state_bytes=state,
        persistent_bytes_per_param=(param_bytes + (probe.grad_bytes or 0) + state) / n,
        tokens_per_update=sum(int(b["attention_mask"].sum()) for b in batches) // spec["updates"],
        update_seconds=seconds, losses=probe.losses, train_peak_mib=probe.peaks[-1] if probe.peaks else None,
        cuda_peak_mib=probe.cuda_peaks[-1] if probe.cuda_peaks else None, data_digest=digest,
        threads=torch.get_num_threads(), transformers=transformers.__version__, torch=torch.__version__,
        vocab=len(tokenizer))


# ------------------------------------------------------------------ runs
def _busy_ticks() -> int:
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:8]]
    return sum(fields) - fields[3] - fields[4]


def launch(cmd: list[str], out: Path, env: dict, timeout: float) -> dict:
    """Run ``cmd`` in a fresh process (output to files); its exit code, wall time, CPU time, ``ru_maxrss``."""
    out.mkdir(parents=True, exist_ok=True)
    busy0, t0 = _busy_ticks(), time.perf_counter()
    with open(out / "stdout.txt", "w") as so, open(out / "stderr.txt", "w") as se:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=so, stderr=se)
        deadline = time.monotonic() + timeout
        while True:  # wait4 gives this child's own rusage (its peak RSS), which Popen.wait drops
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    cpu = usage.ru_utime + usage.ru_stime
    other = max(0.0, (_busy_ticks() - busy0) / os.sysconf("SC_CLK_TCK") - cpu) / wall
    row = dict(exit_code=proc.returncode, wall_s=wall, cpu_s=cpu, process_peak_mib=usage.ru_maxrss / 1024,
               other_load_cores=other, command=" ".join(cmd))
    if proc.returncode != 0:
        lines = [line for line in (out / "stderr.txt").read_text().splitlines() if line.strip()]
        row["error"] = next((line for line in lines if line.startswith("leantrain: error")),
                            lines[-1] if lines else f"exit status {proc.returncode}")[:400]
        row["stderr_tail"] = "\n".join(lines[-40:])
    return row


def run_one(name: str, repeat: int, ctx: dict, args) -> dict:
    out = ctx["root"] / "runs" / f"{name}-r{repeat}"
    idle = wait_for_idle(args.wait_idle)
    if CONFIGS[name]["side"] == "hf":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", str(ctx["spec"]),
               "--worker-out", str(out)]
    else:
        cmd = [sys.executable, "-m", "leantrain.trainer", "train", str(ctx["recipes"][name]), f"output_dir={out}"]
    row = dict(config=name, repeat=repeat, cpu_idle_before=idle, **launch(cmd, out, ctx["env"], args.timeout))
    if "error" in row:
        return row
    if CONFIGS[name]["side"] == "hf":
        row.update(json.loads((out / "result.json").read_text()))
        row["peak_mib"] = row["cuda_peak_mib"] if args.device == "cuda" else row["train_peak_mib"]
    else:
        info = json.loads((out / "run_info.json").read_text())
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        n = info["parameters"]
        elem = 2 if info["parameter_dtype"] == "bfloat16" else 4
        grads = n * elem if info["accumulation"]["mode"] == "standard" else 0  # .grad kept through the cycle
        row.update(side="leantrain", run_info=info, params=n, param_bytes=n * elem, grad_bytes_in_cycle=grads,
                   state_bytes=info["optimizer_state_bytes_per_rank"], optimizer=info["optimizer"],
                   persistent_bytes_per_param=(n * elem + grads + info["optimizer_state_bytes_per_rank"]) / n,
                   tokens_per_update=metrics[0]["tokens"], losses=[m["loss"] for m in metrics],
                   update_seconds=[m["tokens"] / m["tokens_per_s"] for m in metrics], lrs=[m["lr"] for m in metrics],
                   train_peak_mib=metrics[-1]["peak_memory_mib"], peak_mib=metrics[-1]["peak_memory_mib"])
    timed = row["update_seconds"][args.warmup:] or row["update_seconds"]
    row["s_per_update"] = statistics.median(timed)
    row["tokens_per_s"] = row["tokens_per_update"] / row["s_per_update"]
    return row


def summarise(name: str, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return dict(config=name, label=CONFIGS[name]["label"], error=runs[-1]["error"], runs=len(runs))
    med = statistics.median
    keep = ("side", "optimizer", "optim", "torch_fused", "params", "persistent_bytes_per_param", "state_bytes",
            "grad_bytes_in_cycle", "tokens_per_update", "losses", "decay_same_as_leantrain", "data_digest", "groups",
            "stock_loss_type")
    row = dict(config=name, label=CONFIGS[name]["label"], runs=len(runs), ok_runs=len(ok),
               **{k: ok[0][k] for k in keep if k in ok[0]})
    row.update(s_per_update=med(r["s_per_update"] for r in ok), s_per_update_each=[r["s_per_update"] for r in ok],
               tokens_per_s=row["tokens_per_update"] / med(r["s_per_update"] for r in ok),
               peak_mib=med(r["peak_mib"] for r in ok), process_peak_mib=med(r["process_peak_mib"] for r in ok),
               other_load_cores=med(r["other_load_cores"] for r in ok),
               loss_spread_over_runs=max(max(abs(a - b) for a, b in zip(r["losses"], ok[0]["losses"])) for r in ok))
    return row


# ------------------------------------------------------------------ output
def targets(rows: dict) -> list[tuple[str, str, str]]:
    """(target, measured, met / not met / not run)."""
    base = rows.get(BASELINE, {})
    out = []
    for name in (n for n in CONFIGS if CONFIGS[n]["side"] == "leantrain"):
        row = rows.get(name, {})
        label = f"tokens/s {name} / {BASELINE} >= {SPEED_TARGET}"
        if "tokens_per_s" not in row or "tokens_per_s" not in base:
            out.append((label, "not run", "not run"))
            continue
        ratio = row["tokens_per_s"] / base["tokens_per_s"]
        out.append((label, f"{ratio:.3f}", "met" if ratio >= SPEED_TARGET else "not met"))
    row = rows.get(LEAN_ADAFACTOR, {})
    label = f"peak memory {LEAN_ADAFACTOR} / {BASELINE} <= {MEMORY_TARGET}"
    if "peak_mib" not in row or "peak_mib" not in base:
        out.append((label, "not run", "not run"))
    else:
        ratio = row["peak_mib"] / base["peak_mib"]
        out.append((label, f"{ratio:.3f}", "met" if ratio <= MEMORY_TARGET else "not met"))
    return out


def _ratio(value, base) -> str:
    return f"{value / base:.2f}" if value is not None and base else "–"


def notes(res: dict) -> list[str]:
    rows, out = res["rows"], []
    ok = {n: r for n, r in rows.items() if "error" not in r}
    firsts = {n: r["losses"][0] for n, r in ok.items() if r.get("losses")}
    if len(firsts) > 1:
        spread = max(firsts.values()) - min(firsts.values())
        out.append(f"Same start, same data: the update-1 loss (mean over the first k micro-batches, before any "
                   f"parameter moves) spans {spread:.2e} over the rows"
                   + (" — equal to float rounding." if spread < 1e-4 else " — NOT equal: the rows did not see the "
                      "same first micro-batches or weights."))
    a, b = ok.get(BASELINE), ok.get("lt_adamw_standard")
    if a and b:
        diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
        out.append(f"`{BASELINE}` and `lt_adamw_standard` run the same algorithm (AdamW on the `.grad` mean of k "
                   f"micro-batches; torch's fused kernel there, leantrain's foreach AdamW at accum_steps=1 here): "
                   f"their loss curves differ by at most {diff:.2e}.")
    if "lt_adamw_exact_fused" in ok:
        out.append("`lt_adamw_exact_fused` folds each micro-batch into m and v as it arrives: m is exactly the "
                   "standard one, v is the mean of the k micro-batch gradients' squares (not the square of their "
                   "mean), so its curve may depart slightly from the standard rows (docs/design.md §2).")
    if "hf_adafactor" in ok or LEAN_ADAFACTOR in ok:
        out.append("The two Adafactor rows are not the same algorithm: the Trainer's `optim=\"adafactor\"` builds "
                   "`transformers.optimization.Adafactor(scale_parameter=False, relative_step=False, lr)` with no "
                   "first moment (beta1=None; the Trainer passes no `optim_args` to it), while the leantrain row is "
                   "the quickstart's AdaFactorW (beta1 0.9 momentum of gradients in bf16). Same lr "
                   f"({ADAFACTOR_LR:g}, constant), weight decay ({WEIGHT_DECAY:g}, θ ← θ − lr·wd·θ in both), "
                   "clip_threshold 1.0, decay_rate −0.8, eps (1e-30, 1e-3); neither uses relative step.")
    stock = {r.get("stock_loss_type") for r in ok.values() if r.get("side") == "hf"} - {"ForCausalLM"}
    if stock:
        out.append(f"HF side: `model.loss_type` is {sorted(map(str, stock))} for GPT2LMHeadModel, so the Trainer "
                   "would count all k·B·T labels in `num_items_in_batch` instead of the k·B·(T − 1) its causal loss "
                   f"averages over (loss and gradient × (T − 1)/T = {(res['seq'] - 1) / res['seq']:.4f}). The worker "
                   "sets `model.loss_type = \"ForCausalLM\"` (the loss function the model falls back to anyway) so "
                   "the logged loss is the true mean and both sides train on the same gradient.")
    decay = [r.get("decay_same_as_leantrain") for r in ok.values() if r.get("side") == "hf"]
    if decay:
        out.append("Weight decay goes to the same tensors on both sides (the Trainer: all but biases and "
                   "LayerNorm; leantrain: tensors of 2 or more dimensions): "
                   + ("checked, identical sets." if all(decay) else "NOT identical for this model."))
    digests = {r.get("data_digest") for r in ok.values() if r.get("side") == "hf"}
    if len(digests) > 1:
        out.append(f"The HF runs saw different data ({sorted(digests)}): a bug in this script.")
    spread = max((r["loss_spread_over_runs"] for r in ok.values()), default=0.0)
    out.append(f"Repeats of a row give the same loss curve to {spread:.1e} (deterministic on this device).")
    out.append("The Trainer computes the gradient norm at every update even with `max_grad_norm=0` "
               "(`clip_grad_norm_(…, inf)` for logging); it is part of its time. leantrain's loop does one "
               "`loss.item()` per micro-step and one host sync per update for its metrics.")
    if res["device"] == "cpu":
        out.append(f"Peak memory is RSS and includes the runtime: the floor (stack imported, model loaded, data "
                   f"tokenised, no training) is {res['floor']['rss_mib']:.0f} MiB here. `peak − floor` is what "
                   "training adds (parameters are in the floor). The memory target is stated on the whole peak.")
    out.append("This 2-core VM is shared: read each time with its 'other load' column; do not trust a time ratio "
               "that a rerun does not reproduce.")
    return out


def markdown(res: dict) -> str:
    rows, model, m, v = res["rows"], res["model"], res["machine"], res["versions"]
    base = rows.get(BASELINE, {})
    cuda = res["device"] == "cuda"
    floor = res["floor"]["rss_mib"] if not cuda else None
    base_extra = base["peak_mib"] - floor if "peak_mib" in base and floor is not None else None
    lines = [
        "# transformers.Trainer vs leantrain train: throughput, peak memory, state and loss", "",
        f"`{res['command']}`", "",
        f"Machine: {m['cpu']}, {m['cores']} CPU cores, {m['mem_gib']} GiB RAM, device {res['device']}; "
        f"torch {v['torch']}, transformers {v['transformers']}, accelerate {v['accelerate']}; "
        f"{res['threads']} torch threads. Total benchmark time {res['elapsed_s'] / 60:.1f} min. leantrain code: "
        + (f"`{res['code']['source']}` = {res['code']['commit'][:10]}" if "commit" in res["code"] else
           f"working tree at {res['code']['head'][:10]}" + (f" with uncommitted changes in "
                                                            f"{len(res['code']['uncommitted'])} file(s)"
                                                            if res["code"]["uncommitted"] else "")) + ".", "",
        f"Model: GPT-2-shaped, {model['n_layer']} layers, n_embd {model['n_embd']}, {model['n_head']} heads, "
        f"{res['seq']} positions, vocabulary {model['vocab_size']} (the quickstart's byte-level BPE trained on "
        f"python-docs), dropout 0, **{model['parameters']:,} parameters** (wte/lm_head tied), one saved random "
        f"init loaded by every run, fp32 parameters, precision {res['precision']}. Data: python-docs packed into "
        f"{res['seq']}-token blocks, tokenised and ordered by leantrain's data code on both sides. Micro-batch "
        f"{res['micro_batch']} × k = {res['k']} = {res['micro_batch'] * res['k'] * res['seq']:,} tokens per update, "
        f"{res['updates']} updates, seed {res['seed']}. Constant lr (AdamW {ADAMW['lr']:g}, Adafactor "
        f"{ADAFACTOR_LR:g}), no warm-up, betas {ADAMW['betas']}, eps {ADAMW['eps']:g}, weight decay "
        f"{WEIGHT_DECAY:g} on matrices, no gradient clipping, no eval, no checkpoints.", "",
        f"Columns: s/update = median over updates {res['warmup'] + 1}..{res['updates']} of the time between "
        "consecutive optimizer updates (HF: `on_step_end` callback; leantrain: `metrics.jsonl`), median over "
        f"{res['repeats']} interleaved run(s); tokens/s = tokens per update / s/update; "
        + ("peak = `torch.cuda.max_memory_allocated` at the last update; " if cuda else
           "peak RSS = `ru_maxrss` read in the process at the end of the last update; process peak = the whole "
           "process's `ru_maxrss` (leantrain's includes its final `save_pretrained`); ")
        + "persistent B/param = parameters + gradient buffer kept across the cycle + optimizer state; × = "
        f"ratio to `{BASELINE}`; other load = cores' worth of CPU other processes used during the run.", "",
        "| config | optimizer | tokens/s | × | s/update | " + ("CUDA peak MiB" if cuda else "peak RSS MiB")
        + " | × | " + ("" if cuda else "peak − floor MiB | × | process peak MiB | ")
        + "persistent B/param | update-1 loss | final loss | other load |",
        "|---|---|---:|---:|---:|---:|---:|" + ("" if cuda else "---:|---:|---:|") + "---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'].replace('|', '/')} |" + " |" * (9 if cuda else 12))
            continue
        opt = r["optimizer"] + (" (fused)" if r.get("torch_fused") else "")
        mem_cells = "" if cuda else (
            f"{r['peak_mib'] - floor:.0f} | {_ratio(r['peak_mib'] - floor, base_extra)} | "
            f"{r['process_peak_mib']:.0f} | ")
        lines.append(
            f"| {name} | {opt} | {r['tokens_per_s']:.0f} | {_ratio(r['tokens_per_s'], base.get('tokens_per_s'))} | "
            f"{r['s_per_update']:.3f} | {r['peak_mib']:.0f} | {_ratio(r['peak_mib'], base.get('peak_mib'))} | "
            f"{mem_cells}{r['persistent_bytes_per_param']:.2f} | {r['losses'][0]:.5f} | {r['losses'][-1]:.5f} | "
            f"{r['other_load_cores']:.2f} |")
    lines += ["", "| target | measured | result |", "|---|---:|---|"]
    lines += [f"| {label} | {value} | {verdict} |" for label, value, verdict in res["targets"]]
    ok = [n for n, r in rows.items() if "error" not in r]
    if ok:
        lines += ["", "Loss per update (first run of each row):", "",
                  "| update | " + " | ".join(ok) + " |", "|---:|" + "---:|" * len(ok)]
        for u in range(max(len(rows[n]["losses"]) for n in ok)):
            cells = [f"{rows[n]['losses'][u]:.5f}" if u < len(rows[n]["losses"]) else "–" for n in ok]
            lines.append(f"| {u + 1} | " + " | ".join(cells) + " |")
    lines += ["", "Notes:", ""] + [f"- {note}" for note in res["notes"]]
    return "\n".join(lines) + "\n"


def chart(res: dict, path: Path) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no chart (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {n: r for n, r in res["rows"].items() if "error" not in r}
    names = list(rows)
    colors = dict(zip(CONFIGS, ["#c53a32", "#e1812c", "#3b75af", "#519e3e", "#8e5ea2"]))
    fig, (curves, memory, speed) = plt.subplots(1, 3, figsize=(17, 5.5))
    for n in names:
        losses = rows[n]["losses"]
        curves.plot(range(1, len(losses) + 1), losses, marker=".", color=colors[n], label=n,
                    linestyle="--" if rows[n]["side"] == "hf" else "-")
    curves.xaxis.get_major_locator().set_params(integer=True)
    curves.set_xlabel("update")
    curves.set_ylabel("training loss (mean over the update's tokens)")
    curves.set_title("loss per update")
    curves.legend(fontsize=8)
    floor = res["floor"]["rss_mib"] if res["device"] == "cpu" else 0
    peaks = [rows[n]["peak_mib"] for n in names]
    if floor:
        memory.bar(names, [floor] * len(names), color="#bbbbbb", label="floor: runtime + model + data")
    memory.bar(names, [p - floor for p in peaks], bottom=[floor] * len(names), color=[colors[n] for n in names],
               label="training")
    for i, p in enumerate(peaks):
        memory.text(i, p, f"{p:.0f}", ha="center", va="bottom", fontsize=8)
    memory.set_ylabel("CUDA max allocated (MiB)" if res["device"] == "cuda" else "peak RSS at the last update (MiB)")
    memory.set_title("peak memory")
    memory.legend(fontsize=8)
    tps = [rows[n]["tokens_per_s"] for n in names]
    speed.bar(names, tps, color=[colors[n] for n in names])
    base = rows.get(BASELINE, {}).get("tokens_per_s")
    for i, t in enumerate(tps):
        speed.text(i, t, f"{t:.0f}" + (f"\n×{t / base:.2f}" if base else ""), ha="center", va="bottom", fontsize=8)
    speed.margins(y=0.12)
    speed.set_ylabel("tokens/s (median)")
    speed.set_title("throughput")
    for ax in (memory, speed):
        ax.tick_params(axis="x", labelrotation=30)
        plt.setp(ax.get_xticklabels(), ha="right", fontsize=8)
    model = res["model"]
    fig.suptitle(f"GPT-2-shaped {model['parameters'] / 1e6:.1f}M params, micro-batch {res['micro_batch']} × "
                 f"k={res['k']} × {res['seq']} tokens, {res['updates']} updates, {res['precision']}, {res['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return dict(cpu=cpu, cores=os.cpu_count(), mem_gib=round(mem / 2**20, 1), platform=platform.platform(),
                python=platform.python_version())


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "accelerate", "datasets", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def code_info(ref: str | None) -> dict:
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    if ref:
        return dict(source=f"git archive {ref}", commit=git("rev-parse", ref))
    return dict(source="working tree", head=git("rev-parse", "HEAD"),
                uncommitted=git("status", "--porcelain", "--", *CODE_DIRS).splitlines())


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="default", choices=list(SIZES))
    parser.add_argument("--updates", type=int, default=12, help="optimizer updates per run")
    parser.add_argument("--warmup", type=int, default=2, help="updates left out of the time median")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--k", type=int, default=4, help="micro-batches per update (gradient accumulation steps)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per block (and model positions)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of every configuration, interleaved; medians")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast on both sides")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every run (default: torch's choice)")
    parser.add_argument("--wait-idle", type=float, default=60, help="seconds to wait for a >= 90%% idle CPU per run")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a run is killed")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"),
                        help="folder for compare.{json,md,png}")
    parser.add_argument("--code-ref", help="run leantrain as committed at this git ref (git archive, first on "
                        "PYTHONPATH) instead of the working tree, e.g. HEAD")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, micro-batch 2, k 2, 4 updates, 1 repeat: "
                        "about a minute; checks the plumbing, its numbers mean nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        out = Path(args.worker_out)
        result = floor_worker(spec) if args.worker == "floor" else hf_worker(args.worker, spec, out)
        (out / "result.json").write_text(json.dumps(result))
        return
    if args.smoke:
        args.size, args.micro_batch, args.k, args.updates, args.repeats, args.warmup = "tiny", 2, 2, 4, 1, 1
        args.wait_idle = min(args.wait_idle, 5)
    names = args.configs.split(",")
    if unknown := [n for n in names if n not in CONFIGS]:
        parser.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
    if args.updates <= args.warmup:
        parser.error("--updates: must exceed --warmup")

    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="leantrain-compare-"))
    try:
        code = export_code(args.code_ref, root) if args.code_ref else None
        if code is not None:
            sys.path.insert(0, str(code))
        os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        model = build_model_dir(root, args.size, args.seq, args.seed)
        recipes = {n: write_recipe(root, n, model["path"], args) for n in CONFIGS}
        spec = dict(model_dir=model["path"], recipe=str(recipes["lt_adamw_standard"]), updates=args.updates,
                    k=args.k, micro_batch=args.micro_batch, seed=args.seed, device=args.device,
                    precision=args.precision)
        (root / "spec.json").write_text(json.dumps(spec))
        ctx = dict(root=root, spec=root / "spec.json", recipes=recipes, env=child_env(args, code))
        print(f"model: {model['parameters']:,} parameters; runs in {root}", flush=True)
        floor_out = root / "runs" / "floor"
        floor = launch([sys.executable, str(Path(__file__).resolve()), "--worker", "floor", "--spec", str(ctx["spec"]),
                        "--worker-out", str(floor_out)], floor_out, ctx["env"], args.timeout)
        if "error" in floor:
            sys.exit(f"floor worker failed: {floor['error']}\n{floor.get('stderr_tail', '')}")
        floor.update(json.loads((floor_out / "result.json").read_text()))
        floor["rss_mib"] = floor["peak_kib"] / 1024
        print(f"floor: {floor['rss_mib']:.0f} MiB (stack, model, data; no training)", flush=True)
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for repeat in range(args.repeats):  # interleaved: drift in machine load hits every row alike
            for name in names:
                row = run_one(name, repeat, ctx, args)
                runs[name].append(row)
                got = (f"failed: {row['error']}" if "error" in row else
                       f"{row['tokens_per_s']:.0f} tokens/s, peak {row['peak_mib']:.0f} MiB, "
                       f"{row['persistent_bytes_per_param']:.2f} B/param, loss {row['losses'][0]:.4f} → "
                       f"{row['losses'][-1]:.4f}, other load {row['other_load_cores']:.2f}")
                print(f"[{repeat + 1}/{args.repeats}] {name}: {got} ({row['wall_s']:.0f} s)", flush=True)
        rows = {n: summarise(n, runs[n]) for n in names}
        threads = next((r["threads"] for rs in runs.values() for r in rs if "threads" in r), floor.get("threads"))
        res = dict(command=" ".join(["python benchmarks/compare.py", *sys.argv[1:]]), device=args.device,
                   precision=args.precision, size=args.size, seq=args.seq, micro_batch=args.micro_batch, k=args.k,
                   updates=args.updates, warmup=args.warmup, seed=args.seed, repeats=args.repeats,
                   wait_idle=args.wait_idle, threads=threads, model={k: v for k, v in model.items() if k != "path"},
                   hyperparameters=dict(adamw=ADAMW, adafactor_lr=ADAFACTOR_LR, weight_decay=WEIGHT_DECAY,
                                        schedule="constant", max_grad_norm=None,
                                        leantrain_recipes={n: CONFIGS[n].get("optimizer") for n in names}),
                   machine=machine(), versions=versions(), code=code_info(args.code_ref),
                   floor={k: v for k, v in floor.items() if k != "stderr_tail"},
                   elapsed_s=time.perf_counter() - start, rows=rows, runs=runs)
        res["targets"] = targets(rows)
        res["notes"] = notes(res)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(res, indent=1))
        table = markdown(res)
        (out / "compare.md").write_text(table)
        skipped = chart(res, out / "compare.png")
        print(table)
        if skipped:
            print(skipped)
    finally:
        if args.keep:
            print(f"run folders kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

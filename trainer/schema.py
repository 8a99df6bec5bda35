"""The recipe schema: every key a user may set, typed and documented.

Section and key names are a public contract (scripts override them as
``section.key=value``). Unknown keys are errors, never ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TASKS = ("causal-lm", "seq2seq", "sequence-classification")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    name_or_path: str | None = None
    """Hub name (``gpt2``), local directory, or ``package:<module>/<subdir>`` for a
    model shipped inside an installed Python package."""
    task: Literal["causal-lm", "seq2seq", "sequence-classification"] = "causal-lm"
    """Which ``AutoModelFor...`` head to build."""
    from_config: dict[str, Any] | None = None
    """Random init instead of pretrained weights. Keys override the config of
    ``name_or_path``; without ``name_or_path`` give ``model_type`` (e.g. gpt2)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter storage. bfloat16 halves parameters (2 B/param); leantrain's
    optimizers then update them in fp32 with stochastic rounding."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less activation memory, ~30% more compute."""
    compile: bool = False
    """``torch.compile`` the model (ddp engine and single process): faster steps after a
    compile of tens of seconds at the first micro-batches (benchmarks/compile.py)."""
    num_labels: int | None = None
    """Classes for sequence classification (default: inferred from the training labels)."""


class TokenizerConfig(Section):
    name_or_path: str | None = None
    """Hub name or path; defaults to the model's."""
    train_vocab_size: int | None = Field(default=None, ge=64)
    """Train a byte-level BPE tokenizer of this size on the training text
    instead of loading one (works offline; used by the quickstart)."""


class DataConfig(Section):
    dataset: str | None = None
    """A ``datasets`` hub name (``glue``, ``wikitext``) loaded with ``load_dataset``."""
    dataset_config: str | None = None
    """The hub dataset's configuration (``sst2``, ``wikitext-2-raw-v1``)."""
    files: dict[str, str] | None = None
    """Local files per split, e.g. ``{train: data/train.jsonl, validation: data/val.jsonl}``;
    format from the extension (json, jsonl, csv, txt, parquet)."""
    builtin: Literal["python-docs"] | None = None
    """A corpus that exists offline on every machine: ``python-docs`` is the English
    text of the Python reference help topics shipped with CPython (pydoc_data)."""
    train_split: str = "train"
    eval_split: str | None = "validation"
    """Split used for evaluation; null disables evaluation data."""
    eval_fraction: float | None = Field(default=None, gt=0, lt=1)
    """Carve the eval split out of the training split when the dataset has none (never implicitly:
    without it a missing eval split is an error)."""
    encoding: str = "utf-8"
    """Text encoding of local json/jsonl/csv/txt files (e.g. latin-1)."""
    text_field: str = "text"
    text_pair_field: str | None = None
    """Second text for pair classification (e.g. NLI)."""
    target_field: str | None = None
    """Target text for seq2seq."""
    label_field: str = "label"
    """Integer class label for sequence classification."""
    source_prefix: str = ""
    """Prepended to every input (T5 task prefixes such as ``summarize: ``)."""
    max_length: int = Field(default=128, ge=8)
    max_target_length: int = Field(default=64, ge=4)
    packing: bool = False
    """Causal LM: concatenate all tokens and cut blocks of ``max_length`` (no padding)."""
    micro_batch_size: int = Field(default=8, ge=1)
    """Examples per forward/backward; activation memory scales with it."""
    eval_batch_size: int | None = Field(default=None, ge=1)
    num_workers: int = Field(default=0, ge=0)
    max_train_examples: int | None = Field(default=None, ge=1)
    """Truncate the training split (quick runs, tests)."""
    max_eval_examples: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        sources = [name for name in ("dataset", "files", "builtin") if getattr(self, name)]
        if len(sources) != 1:
            raise ValueError(f"exactly one of data.dataset, data.files, data.builtin is required (got {sources or 'none'})")
        return self


class LookaheadConfig(Section):
    k: int = Field(default=5, ge=1)
    alpha: float = Field(default=0.5, gt=0, le=1)


class EMAConfig(Section):
    decay: float = Field(default=0.999, ge=0, lt=1)
    """Evaluation and the final model use the averaged weights."""


class LayerAdaptationConfig(Section):
    max_trust_ratio: float | None = Field(default=None, gt=0)
    """Upper bound of ‖θ‖/‖u‖ (null: none)."""
    exclude_1d: bool = True
    """Biases and norm scales keep their plain update."""


class ComponentRef(Section):
    component: str = Field(alias="_component_")
    """Dotted path to a function or class (``my_pkg.metrics.error_rate``)."""


class ParamGroupRule(Section):
    pattern: str
    """Regular expression matched (``re.search``) against parameter names; first match wins."""
    lr: float | None = Field(default=None, ge=0)
    weight_decay: float | None = Field(default=None, ge=0)


class OptimizerConfig(Section):
    model_config = ConfigDict(extra="allow")  # other optimizer keyword arguments sit beside name/lr

    name: str | None = "AdamW"
    """A registry name: leantrain's SGD, AdamW, AdaFactor, AdaX; torch's Adam, Adagrad,
    RMSprop, Adadelta, Adamax, NAdam, RAdam, ASGD, and any as ``torch.<Name>``."""
    component: str | None = Field(default=None, alias="_component_")
    """Dotted path to any optimizer class instead of ``name`` (``my_pkg.optim.Lion``)."""
    lr: float | None = Field(default=1e-3, ge=0)
    """Peak learning rate; null for AdaFactor's relative step."""
    weight_decay: float | None = Field(default=None, ge=0)
    no_decay_1d: bool = True
    """No weight decay on 1-D parameters (biases, norm scales)."""
    param_groups: list[ParamGroupRule] = []
    """Per-pattern learning rates / weight decay."""
    lookahead: LookaheadConfig | None = None
    ema: EMAConfig | None = None
    layer_adaptation: LayerAdaptationConfig | None = None
    """Scale each tensor's update by its trust ratio ‖θ‖/‖u‖ (LAMB with AdamW); for large batches."""
    objective: str | ComponentRef = "loss"
    """What ZerothOrder minimises: loss, accuracy (as 1 − accuracy; classification), or a function
    (outputs, batch) -> value given as ``{_component_: dotted.path}`` or as the dotted path itself.
    It needs no gradient."""
    max_grad_norm: float | None = Field(default=None, gt=0)
    """Global gradient-norm clipping (standard mode only: it needs the averaged
    gradient; with fused accumulation use max_update_rms / clip_threshold)."""

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the optimizer class beyond lr and weight decay."""
        return dict(self.model_extra or {})


class RegularizationConfig(Section):
    flooding: float | None = Field(default=None, ge=0)
    """Flood level b: train on |L − b| + b (the loss cannot be driven below b)."""
    gradient_penalty: float | None = Field(default=None, gt=0)
    """λ: add λ·‖∇L‖² per micro-batch (one more forward/backward, two transient parameter-size
    copies; not with fused accumulation, FSDP2 or DeepSpeed)."""
    penalty_radius: float = Field(default=1e-2, gt=0)
    """Length r of the finite-difference step along the gradient."""


class AccumulationConfig(Section):
    steps: int = Field(default=1, ge=1)
    """k micro-batches per update: effective batch = k × micro_batch_size × ranks."""
    mode: Literal["standard", "exact", "ema"] = "exact"
    """standard: .grad accumulation (any optimizer, 4 B/param of gradients kept);
    exact / ema: folded into the optimizer's momentum (leantrain optimizers, no buffer)."""
    fused: bool = False
    """Fold inside backward and free each gradient at once: no persistent gradients."""


class ScheduleConfig(Section):
    name: Literal["constant", "linear", "cosine", "piecewise", "none"] = "constant"
    """Counted in updates. ``none`` leaves the lr untouched (AdaFactor relative step)."""
    warmup_updates: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    """Final lr as a fraction of the peak (linear, cosine)."""
    points: dict[int, float] | None = None
    """piecewise: {update: multiplier}, linear in between (required for piecewise)."""

    @model_validator(mode="after")
    def _points_for_piecewise(self) -> ScheduleConfig:
        if self.name == "piecewise" and not self.points:
            raise ValueError("points: required for schedule.name: piecewise, e.g. {0: 0.0, 100: 1.0, 1000: 0.1}")
        if self.name != "piecewise" and self.points:
            raise ValueError(f"points: only used by schedule.name: piecewise (this schedule is {self.name!r})")
        return self


class EvalConfig(Section):
    every_updates: int | None = Field(default=None, ge=1)
    """Evaluate every N updates (and at the end); null: only at the end."""
    max_batches: int | None = Field(default=None, ge=1)


class CheckpointConfig(Section):
    every_updates: int | None = Field(default=None, ge=1)
    """Write a checkpoint every N updates (atomically: temp dir, then rename)."""
    keep_last: int = Field(default=2, ge=1)
    resume: str = "auto"
    """auto: newest checkpoint in output_dir if any; never; or a checkpoint path."""


class WandbConfig(Section):
    project: str = "leantrain"
    entity: str | None = None
    name: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: online when credentials exist, offline otherwise (sync later with ``wandb sync``)."""


class TrackingConfig(Section):
    wandb: WandbConfig | None = None
    """Weights & Biases through accelerate's tracker; metrics.jsonl is always written."""
    log_every_updates: int = Field(default=1, ge=1)


class Recipe(Section):
    model: ModelConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    accumulation: AccumulationConfig = AccumulationConfig()
    regularization: RegularizationConfig = RegularizationConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    eval: EvalConfig = EvalConfig()
    checkpointing: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    precision: Literal["fp32", "bf16"] = "fp32"
    """Autocast compute dtype. fp16 is not offered: its dynamic loss scaler cannot
    undo a step that was already folded into the optimizer state."""
    max_updates: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    stop_after_micro_steps: int | None = Field(default=None, ge=1)
    """Stop (and checkpoint, mid-cycle if need be) after this many micro-steps of this
    run: for time-sliced or preemptible jobs. SIGTERM does the same."""
    seed: int = 0
    output_dir: str = "runs/default"
    overwrite: bool = False
    """With checkpointing.resume: never, start over in an output_dir that holds a run (its
    checkpoints, metrics and final model are deleted). Without it such a directory is refused."""
    max_nonfinite_updates: int = Field(default=10, ge=1)
    """Stop (exit code 3) after this many consecutive updates whose micro-batches all had a
    non-finite loss or gradients: a diverged run. Isolated bad micro-batches are skipped and counted."""

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        if self.max_updates is None and self.epochs is None:
            raise ValueError("max_updates: one of max_updates, epochs is required")
        if self.model.name_or_path is None and not (self.model.from_config or {}).get("model_type"):
            raise ValueError("model.name_or_path: required (or model.from_config.model_type for a random init)")
        if self.overwrite and self.checkpointing.resume != "never":
            raise ValueError("overwrite: true only applies with checkpointing.resume: never (start over); "
                             f"resume is {self.checkpointing.resume!r}")
        if self.model.task == "seq2seq" and not self.data.target_field:
            raise ValueError("data.target_field: required for task seq2seq (the column holding the target text)")
        return self

"""The YAML config's sections as typed dataclasses (what `parse` fills and `validate` checks).

Sections and key names (`models`, `dataset`, `post_training`, `lora`, `training`, `gpu`,
`finetuning`, `logging`) follow the original PyTorch pipeline's configs, and Hugging Face TrainingArguments where those are
silent. Unknown keys and wrong types are errors that name the key, the file and the closest valid
key.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from jaxpref.objectives.methods import METHODS, method_keys



class Shared(dict):
    """In-memory objects a config refers to (`datasets.Dataset` splits): copies of the config
    share the objects rather than copy the data, each with its own mapping."""

    def __deepcopy__(self, memo) -> "Shared":
        return Shared(self)


@dataclass
class ModelEntry:
    name: str = ""                       # the run folder's name (default: the last part of huggingface_id)
    huggingface_id: str = ""             # a hub id, a local folder, a .gguf file, or pkg:<package>/<file>
    revision: str | None = None          # hub revision (branch, tag or commit)
    ref_model_id: str | None = None      # a separate reference model (with post_training.use_ref_model)
    tokenizer_id: str | None = None      # another tokenizer (default: the model's own)


@dataclass
class DatasetConfig:
    name: str = ""                       # a hub id, or a local json/jsonl/parquet/csv/arrow file (.gz too) or folder
    config_name: str | None = None       # the hub dataset's configuration
    split: str = "train"                 # the split to train on
    revision: str | None = None          # hub revision of the dataset
    data_files: str | list[str] | dict[str, str | list[str]] | None = None   # a file, glob or list; a dict maps split -> files
    prompt_column: str = "prompt"        # column of the prompt (absent: the longest common prefix of chosen and rejected)
    chosen_column: str = "chosen"        # column of the preferred answer
    rejected_column: str = "rejected"    # column of the dispreferred answer
    completion_column: str = "completion"  # unpaired data (KTO): the completion
    label_column: str = "label"          # unpaired data (KTO): true when the completion is desirable
    eval_split: str | None = None        # a split to evaluate on
    eval_fraction: float = 0.0           # or this fraction of the train rows held out for evaluation
    max_samples: int | None = None       # only the first N rows (null: all)
    # Splits given as `datasets.Dataset` objects (the Python API, `jaxpref.train(..., train_dataset=)`).
    objects: dict = field(default_factory=lambda: Shared(), repr=False, compare=False, metadata={"internal": True})


@dataclass
class PostTrainingBase:
    """The keys every method reads; each method adds its own (`jaxpref.objectives.methods`)."""
    method: str = "dpo"                  # dpo | ipo | kto | orpo | simpo | cpo; online: grpo | rloo | online_dpo | ppo
    beta: float | None = None            # strength of the preference term (the KL penalty's inverse for DPO); None: the method's TRL default (0.1; grpo 0.0, rloo 0.05)
    loss_type: str | list[str] | None = None   # a loss of the method, or a list combined by loss_weights (default: the method's)
    loss_weights: list[float] | None = None    # one weight per loss_type (default: 1 each)
    label_smoothing: float = 0.0         # cDPO / robust DPO: the assumed fraction of flipped labels
    use_ref_model: bool = False          # a separate frozen reference model instead of the base with the adapter off
    reference_free: bool = False         # no reference model: its log-probs are 0
    precompute_ref_logps: bool = False   # one reference pass before training, cached (TRL's precompute_ref_log_probs)
    disable_dropout: bool | None = None  # LoRA dropout off (TRL's key); None: the method's TRL default (true; grpo, rloo false)


# The `post_training` section: the common keys plus every method's own (one home per key).
PostTrainingConfig = dataclasses.make_dataclass(
    "PostTrainingConfig", [], bases=tuple(reversed(method_keys())) + (PostTrainingBase,))
PostTrainingConfig.__module__ = __name__
PostTrainingConfig.__doc__ = "`post_training`: " + ", ".join(f.name for f in dataclasses.fields(PostTrainingConfig))


DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]   # on a model that names them otherwise: PEFT's default


@dataclass
class LoraConfig:
    enabled: bool = True                 # false: full fine-tuning (every weight trained)
    r: int = 16                          # LoRA rank
    lora_alpha: float = 32.0             # scale numerator: the update is (lora_alpha / r) B A
    lora_dropout: float = 0.0            # dropout on the LoRA input during training
    target_modules: str | list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGETS))   # module names, or all-linear (see lora.tree)
    use_rslora: bool = False             # rank-stabilised scale lora_alpha / sqrt(r)
    init: str = "b_zero"                 # b_zero (PEFT's: B = 0) or a_zero
    init_from: str | None = None         # start from this PEFT adapter folder (the reference is its initial copy)
    bias: str = "none"                   # PEFT's bias option; only none


TRAINER_MAX_GRAD_NORM = 1.0   # transformers' TrainingArguments default (TRL's offline, GRPO and RLOO trainers clip to it)


@dataclass
class TrainingConfig:
    num_epochs: float = 1.0              # passes over the train split (TRL: num_train_epochs)
    max_steps: int = -1                  # optimizer steps; -1: num_epochs decides
    output_dir: str | None = None        # output root: each model trains into <output_dir>/<name>/ (--output-dir wins; default checkpoints)
    per_device_train_batch_size: int = 4  # pairs per micro-batch per data-parallel device
    per_device_eval_batch_size: int = 4  # pairs per eval batch per data-parallel device
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 5.0e-7        # peak learning rate
    weight_decay: float = 0.0            # decoupled weight decay (AdamW); not on biases and norm weights (the Trainer's rule)
    max_grad_norm: float | None = None   # clip the global gradient norm to this (0: no clipping); None: TRAINER_MAX_GRAD_NORM, ppo 0 (TRL's PPOTrainer never clips)
    warmup_steps: int | float = 0        # linear warm-up steps; below 1: a fraction of the run (transformers 5's rule)
    warmup_ratio: float = 0.0            # warm-up as a fraction of the run (older transformers' key)
    lr_scheduler_type: str = "linear"    # linear | cosine | constant | constant_with_warmup
    optimizer: str = "adamw"             # adamw | sgd | adafactor (TRL: optim)
    adam_beta1: float = 0.9              # AdamW's first-moment decay
    adam_beta2: float = 0.999            # AdamW's second-moment decay
    adam_epsilon: float = 1.0e-8         # AdamW's epsilon
    max_length: int | None = 1024        # tokens of prompt + completion at most (null: no limit)
    max_prompt_length: int | None = None  # tokens of the prompt at most (null: no limit of its own)
    truncation_mode: str = "keep_start"  # keep_start | keep_end: which end of a sequence longer than max_length is kept (TRL's)
    seed: int = 42                       # data order, LoRA init and dropout
    logging_steps: int = 1               # log every N steps (step 1 and the last always)
    eval_steps: int | None = None        # evaluate every N steps (null: with eval_strategy steps, logging_steps)
    # no: never evaluate; steps: every eval_steps; epoch: after each epoch; null: every eval_steps
    # when set, and once at the end whenever there is an eval split.
    eval_strategy: str | None = None
    # auto: shared_prompt (each prompt computed once; KTO: concatenated) and padding-free rows,
    # the same numbers as TRL's layout, fastest on every backend measured (docs/performance.md).
    pair_layout: str = "auto"
    pack_length: int | None = None               # packed layouts: tokens per row (default max_length)
    padding_free: bool | str = "auto"            # rows end to end, no padding (TRL's DPOConfig key)
    train_sampling_strategy: str | None = None   # random | sequential (default: sequential for KTO, as TRL)
    param_dtype: str = "float32"                 # float32 | bfloat16: the frozen base weights in memory
    compute_dtype: str = "float32"               # float32 | bfloat16 (TRL: bf16: true)
    length_buckets: list[int] | None = None      # fixed padded lengths T; unset: planned shapes
    max_shapes: int = 4                          # planned batch shapes (T, K) per run at most
    # Micro-batches filled to this many tokens per device (padding-free streams) instead of
    # per_device_train_batch_size pairs each; a step still covers the same pairs, same loss.
    max_tokens_per_batch: int | None = None
    vocab_chunk: int = 0                         # LM head over this many vocabulary columns at a time
    scan_layers: bool = True                     # False: a loop over per-layer weights (faster step, longer compile)
    # Recompute the attention core and MLP activation in the backward instead of storing them.
    # auto: on CPU (faster there, measured); elsewhere off when the memory plan fits the device.
    recompute_activations: bool | str = "auto"
    # auto: flash kernels on GPU for bf16 (tokamax), XLA elsewhere, query-chunked for long rows.
    attention: str = "auto"                      # auto | xla | xla_chunked | flash
    matmul_precision: str = "highest"            # fp32 compute: highest (true fp32) | tf32 (GPU tensor cores)

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run: `max_steps` if set, else `num_epochs` epochs (rounded up)."""
        return self.max_steps if self.max_steps > 0 else int(math.ceil(self.num_epochs * steps_per_epoch))


@dataclass
class EarlyStoppingConfig:
    metric: str = "eval_loss"            # an eval metric the method logs
    mode: str = "min"                    # min | max: which way is better
    patience: int = 3                    # evaluations without improvement before stopping
    min_delta: float = 0.0               # the least change that counts as an improvement


@dataclass
class FinetuningConfig:
    save_steps: int | None = None        # a resumable checkpoint every N steps and at the end (null: none)
    save_total_limit: int | None = None  # keep the newest N checkpoints (null: all)
    gradient_checkpointing: bool = False  # recompute each layer in the backward (less memory, slower)
    # What a checkpointed layer keeps for the backward pass (jax.checkpoint_policies).
    remat_policy: str = "nothing_saveable"
    early_stopping: EarlyStoppingConfig | None = None  # stop when an eval metric stops improving; export the best adapter
    load_best_model_at_end: bool = False  # export the adapter of the best evaluation, not the last step's
    metric_for_best_model: str | None = None  # which eval metric is best (TRL's rule: eval_ added; default eval_loss)
    greater_is_better: bool | None = None  # default: false for a metric ending in loss, true otherwise (TRL's rule)


@dataclass
class DistributedConfig:
    auto: bool = False                   # JAX's cluster detection (SLURM, TPU pods) instead of the three keys below
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None     # processes in the run (one per host)
    process_id: int | None = None        # this process's index, 0 .. num_processes - 1
    timeout_s: int = 60                  # seconds to wait for the coordinator


@dataclass
class GpuConfig:
    device_ids: list[int] | None = None  # the devices to use (default: all)
    mesh: dict[str, int] | None = None   # {data, fsdp, tensor} axis sizes; one may be -1 (the rest)
    # The seed's DDP switch: true (or unset) is data parallel over every device (`mesh` {data: -1});
    # false trains on one device (the first of `device_ids`).
    ddp: bool | None = None
    distributed: DistributedConfig | None = None  # several hosts: coordinator_address, num_processes, process_id, or auto: true


@dataclass
class LoggingConfig:
    report_to: str | list[str] = field(default_factory=list)  # tensorboard, wandb, mlflow (or none)
    project: str = "jaxpref"             # the W&B project / MLflow experiment
    run_name: str | None = None          # the tracker's run name (default: the model's name)
    log_level: str = "warning"        # debug | info | warning | error: jaxpref's and the libraries' log lines
    progress_bar: bool = True            # a bar in a terminal, one line per logged step elsewhere (false: neither)
    sample_prompts: int | str | None = None   # greedy completions in samples.jsonl at each eval and at the end: N eval-split prompts, or a prompts .jsonl
    sample_max_new_tokens: int = 64      # tokens generated per sample prompt


@dataclass
class Config:
    models: list[ModelEntry] = field(default_factory=list)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    post_training: PostTrainingConfig = field(default_factory=PostTrainingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    finetuning: FinetuningConfig = field(default_factory=FinetuningConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = field(default="<config>", metadata={"internal": True})

    # Derived views that the rest of the code reads.
    @property
    def loss_types(self) -> list[str]:
        lt = self.post_training.loss_type
        if lt is None:
            return [default_loss_type(self.post_training.method)]
        return [lt] if isinstance(lt, str) else list(lt)

    @property
    def save_steps(self) -> int | None:
        return self.finetuning.save_steps

    @property
    def gradient_checkpointing(self) -> bool:
        return self.finetuning.gradient_checkpointing

    @property
    def best_metric(self) -> str:
        """The eval metric that picks the best adapter (`finetuning.metric_for_best_model`, with
        TRL's rule: `eval_` added when missing)."""
        m = self.finetuning.metric_for_best_model or "loss"
        return m if m.startswith("eval_") else f"eval_{m}"

    @property
    def greater_is_better(self) -> bool:
        g = self.finetuning.greater_is_better
        return (not self.best_metric.endswith("loss")) if g is None else g

    @property
    def report_to(self) -> list[str]:
        r = self.logging.report_to
        if isinstance(r, str):
            return [] if r in ("", "none") else [r]
        return [x for x in r if x != "none"]


def default_loss_type(method: str) -> str:
    return METHODS[method].default_loss_type if method in METHODS else "sigmoid"



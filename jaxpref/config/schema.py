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
from typing import Any

from jaxpref.objectives.methods import METHODS, method_keys



@dataclass
class ModelEntry:
    name: str = ""
    huggingface_id: str = ""
    revision: str | None = None
    ref_model_id: str | None = None
    tokenizer_id: str | None = None


@dataclass
class DatasetConfig:
    name: str = ""
    config_name: str | None = None
    split: str = "train"
    revision: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None   # a dict maps split -> files
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    completion_column: str = "completion"
    label_column: str = "label"
    eval_split: str | None = None
    eval_fraction: float = 0.0
    max_samples: int | None = None


@dataclass
class PostTrainingBase:
    """The keys every method reads; each method adds its own (`jaxpref.objectives.methods`)."""
    method: str = "dpo"
    beta: float | None = None      # None: the method's TRL default (0.1; grpo 0.0, rloo 0.05)
    loss_type: str | list[str] | None = None
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    use_ref_model: bool = False
    reference_free: bool = False
    precompute_ref_logps: bool = False


# The `post_training` section: the common keys plus every method's own (one home per key).
PostTrainingConfig = dataclasses.make_dataclass(
    "PostTrainingConfig", [], bases=tuple(reversed(method_keys())) + (PostTrainingBase,))
PostTrainingConfig.__module__ = __name__
PostTrainingConfig.__doc__ = "`post_training`: " + ", ".join(f.name for f in dataclasses.fields(PostTrainingConfig))


@dataclass
class LoraConfig:
    enabled: bool = True
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: str | list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    use_rslora: bool = False
    init: str = "b_zero"
    init_from: str | None = None
    bias: str = "none"


@dataclass
class TrainingConfig:
    num_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5.0e-7
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = "linear"
    optimizer: str = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1.0e-8
    max_length: int | None = 1024
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_start"
    seed: int = 42
    logging_steps: int = 1
    eval_steps: int | None = None
    # auto: shared_prompt (each prompt computed once; KTO: concatenated) and padding-free rows,
    # the same numbers as TRL's layout, fastest on every backend measured (docs/performance.md).
    pair_layout: str = "auto"
    pack_length: int | None = None               # packed layouts: tokens per row (default max_length)
    padding_free: bool | str = "auto"            # rows end to end, no padding (TRL's DPOConfig key)
    train_sampling_strategy: str | None = None   # random | sequential (default: sequential for KTO, as TRL)
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    length_buckets: list[int] | None = None      # fixed padded lengths T; unset: planned shapes
    max_shapes: int = 4                          # planned batch shapes (T, K) per run at most
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
    metric: str = "eval_loss"
    mode: str = "min"
    patience: int = 3
    min_delta: float = 0.0


@dataclass
class FinetuningConfig:
    save_steps: int | None = None
    save_total_limit: int | None = None
    gradient_checkpointing: bool = False
    # What a checkpointed layer keeps for the backward pass (jax.checkpoint_policies).
    remat_policy: str = "nothing_saveable"
    early_stopping: EarlyStoppingConfig | None = None


@dataclass
class GpuConfig:
    device_ids: list[int] | None = None
    mesh: dict[str, int] | None = None
    # The seed's DDP switch: true (or unset) is data parallel over every device (`mesh` {data: -1});
    # false trains on one device (the first of `device_ids`).
    ddp: bool | None = None
    distributed: dict[str, Any] | None = None


@dataclass
class LoggingConfig:
    report_to: str | list[str] = field(default_factory=list)
    project: str = "jaxpref"
    run_name: str | None = None
    log_level: str = "warning"        # debug | info | warning | error: jaxpref's and the libraries' log lines
    progress_bar: bool = True


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
    def report_to(self) -> list[str]:
        r = self.logging.report_to
        if isinstance(r, str):
            return [] if r in ("", "none") else [r]
        return [x for x in r if x != "none"]


def default_loss_type(method: str) -> str:
    return METHODS[method].default_loss_type if method in METHODS else "sigmoid"



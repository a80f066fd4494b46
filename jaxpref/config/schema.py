"""The YAML config: typed dataclasses mirroring its sections, and the parser that checks them.

Sections and key names (`models`, `dataset`, `post_training`, `lora`, `training`, `gpu`,
`finetuning`, `logging`) follow the original PyTorch pipeline's configs, and Hugging Face TrainingArguments where those are
silent. Unknown keys and wrong types are errors that name the key, the file and the closest valid
key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from jaxpref.errors import ConfigError

METHODS = ("dpo", "ipo", "kto", "orpo", "simpo", "cpo")
# Loss types of the DPO family (TRL's catalogue plus the older paired kto_pair).
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "aot_pair", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft",
    "kto_pair",
)
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


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
class PostTrainingConfig:
    method: str = "dpo"
    beta: float = 0.1
    loss_type: str | list[str] | None = None
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    use_ref_model: bool = False
    reference_free: bool = False
    precompute_ref_logps: bool = False
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    use_weighting: bool = False
    ld_alpha: float | None = None
    rpo_alpha: float | None = None
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    orpo_nll_span: str = "prompt_and_completion"


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
    save_steps: int | None = None
    pair_layout: str = "concatenated"
    pack_length: int | None = None               # packed layouts: tokens per row (default max_length)
    padding_free: bool = False                   # rows end to end, no padding (TRL's DPOConfig key)
    train_sampling_strategy: str | None = None   # random | sequential (default: sequential for KTO, as TRL)
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    gradient_checkpointing: bool = False
    length_buckets: list[int] | None = None      # fixed padded lengths T; unset: planned shapes
    max_shapes: int = 4                          # planned batch shapes (T, K) per run at most
    vocab_chunk: int = 0                         # LM head over this many vocabulary columns at a time
    scan_layers: bool = True                     # False: a loop over per-layer weights (faster step, longer compile)
    recompute_activations: bool = True           # recompute attention core + MLP activation in the backward

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
    ddp: bool | None = None
    distributed: dict[str, Any] | None = None


@dataclass
class LoggingConfig:
    report_to: str | list[str] = field(default_factory=list)
    project: str = "jaxpref"
    run_name: str | None = None
    log_level: str = "info"
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
        return self.finetuning.save_steps or self.training.save_steps

    @property
    def gradient_checkpointing(self) -> bool:
        return self.finetuning.gradient_checkpointing or self.training.gradient_checkpointing

    @property
    def report_to(self) -> list[str]:
        r = self.logging.report_to
        if isinstance(r, str):
            return [] if r in ("", "none") else [r]
        return [x for x in r if x != "none"]


def default_loss_type(method: str) -> str:
    return {"dpo": "sigmoid", "ipo": "ipo", "kto": "kto", "orpo": "orpo", "simpo": "simpo",
            "cpo": "sigmoid"}.get(method, "sigmoid")


# ---------------------------------------------------------------------------------------------
# Parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, where: str, src: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose (1e-5 is a str)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        # Try the plain types before containers so "5" stays str when str is allowed.
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where, src)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{src}: `{where}` must be {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: `{where}` must be a mapping, got {value!r}")
        return _build(tp, value, where, src)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{src}: `{where}` must be {_type_name(tp)}, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: `{where}` must be a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(v, vt, f"{where}.{k}", src) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{src}: `{where}` must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{src}: `{where}` must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        raise ConfigError(f"{src}: `{where}` must be a finite number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{src}: `{where}` must be a string, got {value!r}")
    raise ConfigError(f"{src}: `{where}` has an unsupported type")


def _build(cls: type, data: dict, where: str, src: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" (did you mean `{close[0]}`?)" if close else f" (valid keys: {', '.join(names)})"
            raise ConfigError(f"{src}: unknown key `{path}`{hint}")
        kwargs[key] = _coerce(value, hints[key], path, src)
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any, src: str) -> None:
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            try:
                if int(part) < 0:
                    raise IndexError(part)
                node = node[int(part)]
                continue
            except (ValueError, IndexError):
                raise ConfigError(f"--set {dotted}: `{'.'.join(parts[:i + 1])}` is not a valid index")
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: `{'.'.join(parts[:i])}` is a value, not a section")
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        try:
            if int(last) < 0:
                raise IndexError(last)
            node[int(last)] = value
        except (ValueError, IndexError):
            raise ConfigError(f"--set {dotted}: `{last}` is not a valid index")
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {dotted}: `{'.'.join(parts[:-1])}` is a value, not a section")


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override (`section.key=value`, typed like YAML) and validate a config file."""
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {src}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        line = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{src}:{line}: YAML syntax error: {e.problem}")
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: YAML syntax error: {str(e).splitlines()[0]}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: the top level must be a mapping of sections")
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"--set {ov}: expected KEY=VALUE with a dotted key")
        key, raw = ov.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value, src)
    cfg = _build(Config, data, "", src)
    cfg.source = src
    validate(cfg)
    return cfg


def config_from_dict(data: dict, src: str = "<dict>") -> Config:
    cfg = _build(Config, data, "", src)
    cfg.source = src
    validate(cfg)
    return cfg


def _choice(value: str, allowed: typing.Iterable[str], key: str, src: str) -> None:
    allowed = list(allowed)
    if value not in allowed:
        close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.5)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        raise ConfigError(f"{src}: `{key}` is `{value}`, expected one of {', '.join(allowed)}{hint}")


def validate(cfg: Config) -> None:
    """Range and consistency checks. Raises ConfigError naming the key."""
    src = cfg.source
    if not cfg.models:
        raise ConfigError(f"{src}: `models` is empty; list at least one model with `name` and `huggingface_id`")
    names = set()
    for i, m in enumerate(cfg.models):
        if not m.huggingface_id:
            raise ConfigError(f"{src}: `models[{i}].huggingface_id` is missing")
        if not m.name:
            m.name = Path(m.huggingface_id.rstrip("/")).name.replace(".gguf", "")
        if m.name in names:
            raise ConfigError(f"{src}: `models[{i}].name` `{m.name}` is used twice")
        if "/" in m.name or m.name in (".", ".."):
            raise ConfigError(f"{src}: `models[{i}].name` `{m.name}` must be usable as a folder name")
        names.add(m.name)
    if not cfg.dataset.name and not cfg.dataset.data_files:
        raise ConfigError(f"{src}: `dataset.name` is missing (a hub id or a local file/directory)")
    pt = cfg.post_training
    _choice(pt.method, METHODS, "post_training.method", src)
    if pt.beta <= 0:
        raise ConfigError(f"{src}: `post_training.beta` must be > 0, got {pt.beta}")
    allowed = {"dpo": DPO_LOSS_TYPES, "ipo": DPO_LOSS_TYPES, "cpo": ("sigmoid", "hinge", "ipo", "simpo"),
               "kto": KTO_LOSS_TYPES, "orpo": ("orpo",), "simpo": ("simpo",)}[pt.method]
    for lt in cfg.loss_types:
        _choice(lt, allowed, "post_training.loss_type", src)
    if pt.loss_weights is not None and len(pt.loss_weights) != len(cfg.loss_types):
        raise ConfigError(
            f"{src}: `post_training.loss_weights` has {len(pt.loss_weights)} entries but "
            f"`loss_type` has {len(cfg.loss_types)}")
    if not 0 <= pt.label_smoothing < 1:
        raise ConfigError(f"{src}: `post_training.label_smoothing` must be in [0, 1), got {pt.label_smoothing}")
    if "exo_pair" in cfg.loss_types and pt.label_smoothing == 0:
        raise ConfigError(f"{src}: `post_training.loss_type` exo_pair needs `label_smoothing` > 0 (the paper uses 1e-3)")
    if "robust" in cfg.loss_types and pt.label_smoothing >= 0.5:
        raise ConfigError(f"{src}: `post_training.loss_type` robust needs `label_smoothing` < 0.5")
    if pt.use_weighting and any(lt in ("aot", "aot_unpaired", "aot_pair") for lt in cfg.loss_types):
        raise ConfigError(f"{src}: `post_training.use_weighting` does not apply to aot losses")
    _choice(pt.f_divergence_type, ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"),
            "post_training.f_divergence_type", src)
    _choice(pt.orpo_nll_span, ("prompt_and_completion", "completion"), "post_training.orpo_nll_span", src)
    lo = cfg.lora
    if lo.r <= 0:
        raise ConfigError(f"{src}: `lora.r` must be > 0, got {lo.r}")
    if lo.lora_alpha <= 0:
        raise ConfigError(f"{src}: `lora.lora_alpha` must be > 0, got {lo.lora_alpha}")
    if not 0 <= lo.lora_dropout < 1:
        raise ConfigError(f"{src}: `lora.lora_dropout` must be in [0, 1), got {lo.lora_dropout}")
    _choice(lo.init, ("b_zero", "a_zero"), "lora.init", src)
    _choice(lo.bias, ("none",), "lora.bias", src)
    if isinstance(lo.target_modules, list) and not lo.target_modules:
        raise ConfigError(f"{src}: `lora.target_modules` is empty")
    tr = cfg.training
    if tr.learning_rate <= 0:
        raise ConfigError(f"{src}: `training.learning_rate` must be > 0, got {tr.learning_rate}")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "logging_steps"):
        if getattr(tr, key) <= 0:
            raise ConfigError(f"{src}: `training.{key}` must be > 0, got {getattr(tr, key)}")
    if tr.max_steps == 0 or tr.max_steps < -1:
        raise ConfigError(f"{src}: `training.max_steps` must be >= 1 (or -1: train for `num_epochs`), "
                          f"got {tr.max_steps}")
    if tr.num_epochs <= 0 and tr.max_steps <= 0:
        raise ConfigError(f"{src}: set `training.num_epochs` > 0 or `training.max_steps` > 0")
    if tr.max_length is not None and tr.max_length < 2:
        raise ConfigError(f"{src}: `training.max_length` must be >= 2, got {tr.max_length}")
    if tr.max_prompt_length is not None and tr.max_prompt_length < 1:
        raise ConfigError(f"{src}: `training.max_prompt_length` must be >= 1")
    if tr.warmup_steps < 0 or not 0 <= tr.warmup_ratio <= 1:
        raise ConfigError(f"{src}: `training.warmup_steps` must be >= 0 and `warmup_ratio` in [0, 1]")
    if tr.weight_decay < 0 or tr.max_grad_norm < 0:
        raise ConfigError(f"{src}: `training.weight_decay` and `max_grad_norm` must be >= 0")
    _choice(tr.lr_scheduler_type, ("constant", "linear", "cosine", "constant_with_warmup"),
            "training.lr_scheduler_type", src)
    _choice(tr.optimizer, ("adamw", "sgd", "adafactor"), "training.optimizer", src)
    _choice(tr.truncation_mode, ("keep_start", "keep_end"), "training.truncation_mode", src)
    _choice(tr.pair_layout, ("concatenated", "shared_prompt", "packed", "packed_shared_prompt"),
            "training.pair_layout", src)
    if tr.padding_free and tr.pair_layout.startswith("packed"):
        raise ConfigError(f"{src}: `training.padding_free` needs `training.pair_layout` concatenated or "
                          f"shared_prompt (packed layouts already share rows), got {tr.pair_layout}")
    if tr.pack_length is not None and tr.pack_length < 2:
        raise ConfigError(f"{src}: `training.pack_length` must be >= 2")
    if tr.vocab_chunk < 0:
        raise ConfigError(f"{src}: `training.vocab_chunk` must be >= 0 (0: the whole vocabulary), got {tr.vocab_chunk}")
    if tr.max_shapes < 1:
        raise ConfigError(f"{src}: `training.max_shapes` must be >= 1, got {tr.max_shapes}")
    if tr.train_sampling_strategy is not None:
        _choice(tr.train_sampling_strategy, ("random", "sequential"), "training.train_sampling_strategy", src)
    _choice(tr.param_dtype, ("float32", "bfloat16"), "training.param_dtype", src)
    _choice(tr.compute_dtype, ("float32", "bfloat16"), "training.compute_dtype", src)
    if pt.method == "kto" and tr.per_device_train_batch_size < 2:
        raise ConfigError(f"{src}: KTO needs `training.per_device_train_batch_size` >= 2 for its KL estimate")
    if not 0 <= cfg.dataset.eval_fraction < 1:
        raise ConfigError(f"{src}: `dataset.eval_fraction` must be in [0, 1)")
    for r in cfg.report_to:
        _choice(r, ("tensorboard", "wandb", "mlflow"), "logging.report_to", src)
    _choice(cfg.finetuning.remat_policy, ("nothing_saveable", "dots_saveable",
                                           "dots_with_no_batch_dims_saveable", "everything_saveable"),
            "finetuning.remat_policy", src)
    if cfg.finetuning.early_stopping is not None:
        _choice(cfg.finetuning.early_stopping.mode, ("min", "max"), "finetuning.early_stopping.mode", src)


def to_dict(cfg: Config) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("source", None)
    return d


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

"""Range and consistency checks of a parsed config; each error names the key and the file."""
from __future__ import annotations

from pathlib import Path

from jaxpref.config.safety import validate_safety
from jaxpref.config.schema import (TRAINER_MAX_GRAD_NORM, Config, LoggingConfig, PostTrainingBase, TrainingConfig,
                                   default_loss_type)
from jaxpref.errors import ConfigError
from jaxpref.errors import check_choice as _choice
from jaxpref.objectives.methods import METHODS

ATTENTION = ("auto", "xla", "xla_chunked", "flash")
PAIR_LAYOUTS = ("auto", "concatenated", "shared_prompt", "packed", "packed_shared_prompt")


def validate(cfg: Config) -> None:
    """Range and consistency checks, section by section. Raises ConfigError naming the key."""
    _models(cfg)
    if not cfg.dataset.name and not cfg.dataset.data_files:
        raise ConfigError(f"{cfg.source}: `dataset.name` is missing (a hub id or a local file/directory)")
    if not 0 <= cfg.dataset.eval_fraction < 1:
        raise ConfigError(f"{cfg.source}: `dataset.eval_fraction` must be in [0, 1)")
    _post_training(cfg)
    if METHODS[cfg.post_training.method].online:
        _online(cfg)
    _lora(cfg)
    _dropout(cfg)
    _training(cfg)
    _training_layout(cfg)
    _rest(cfg)


def _models(cfg: Config) -> None:
    src = cfg.source
    if not cfg.models:
        raise ConfigError(f"{src}: `models` is empty; list at least one model with `name` and `huggingface_id`")
    names = set()
    for i, m in enumerate(cfg.models):
        if not m.huggingface_id:
            raise ConfigError(f"{src}: `models[{i}].huggingface_id` is missing")
        if not m.name:
            m.name = derived_name(m.huggingface_id)
        if m.name in names:
            raise ConfigError(f"{src}: `models[{i}].name` `{m.name}` is used twice")
        if "/" in m.name or m.name in (".", ".."):
            raise ConfigError(f"{src}: `models[{i}].name` `{m.name}` must be usable as a folder name")
        if m.name in ("report.md", "report.html", "report_curves.png"):   # beside the run folders
            raise ConfigError(f"{src}: `models[{i}].name` `{m.name}` is a file the report writes in the output "
                              "folder; choose another name")
        names.add(m.name)


def _post_training(cfg: Config) -> None:
    """Common keys, then the method's own (`Method.check`); a key of another method set away from
    its default is an error, not silently ignored."""
    src, pt = cfg.source, cfg.post_training
    _choice(pt.method, METHODS, "post_training.method", src)
    method = METHODS[pt.method]
    if pt.loss_type == []:   # no loss at all: a run would train nothing
        raise ConfigError(f"{src}: `post_training.loss_type` is an empty list; name at least one loss, or leave "
                          f"the key out for the method's ({default_loss_type(pt.method)})")
    for lt in cfg.loss_types:
        owners = [m for m, x in METHODS.items() if lt in x.loss_types]
        if lt not in method.loss_types and owners:   # kto_pair: the older paired KTO is a DPO loss
            raise ConfigError(f"{src}: `post_training.loss_type` `{lt}` is a loss of method {' / '.join(owners)}, "
                              f"not of {pt.method} (its losses: {', '.join(method.loss_types)})")
        _choice(lt, method.loss_types, "post_training.loss_type", src)
    if pt.loss_weights is not None and len(pt.loss_weights) != len(cfg.loss_types):
        raise ConfigError(
            f"{src}: `post_training.loss_weights` has {len(pt.loss_weights)} entries but "
            f"`loss_type` has {len(cfg.loss_types)}")
    if not 0 <= pt.label_smoothing < 1:
        raise ConfigError(f"{src}: `post_training.label_smoothing` must be in [0, 1), got {pt.label_smoothing}")
    common = set(PostTrainingBase.__dataclass_fields__)
    own = set(method.keys.__dataclass_fields__)
    for m in METHODS.values():
        for name, f in m.keys.__dataclass_fields__.items():
            if name in common or name in own or getattr(pt, name) == f.default:
                continue
            users = ", ".join(k for k, x in METHODS.items() if name in x.keys.__dataclass_fields__)
            raise ConfigError(f"{src}: `post_training.{name}` applies to method {users}, not {pt.method}")
    for name, value in method.defaults:   # TRL's default of a key the methods default differently
        if getattr(pt, name) is None:
            setattr(pt, name, value)
    if not method.online and pt.beta <= 0:
        raise ConfigError(f"{src}: `post_training.beta` must be > 0, got {pt.beta}")
    if method.check is not None:
        method.check(pt, tuple(cfg.loss_types), src)
    if not method.online and not (method.reference and not pt.reference_free):   # no reference is read
        why = ("with `post_training.reference_free: true` no reference is computed" if method.reference
               else f"{pt.method} uses no reference model")
        for key, on in (("post_training.use_ref_model", pt.use_ref_model),
                        ("post_training.precompute_ref_logps", pt.precompute_ref_logps),
                        ("post_training.reference_free", pt.reference_free and not method.reference)):
            if on:
                raise ConfigError(f"{src}: `{key}` would be ignored: {why}; leave it out")


def _online(cfg: Config) -> None:
    """Keys of the offline loop that an online run would silently ignore: one line naming each."""
    src, pt, ds, tr, ft, method = cfg.source, cfg.post_training, cfg.dataset, cfg.training, cfg.finetuning, \
        cfg.post_training.method
    ref = [f"models[{i}].ref_model_id" for i, m in enumerate(cfg.models) if m.ref_model_id]
    if pt.use_ref_model or ref:
        key = ref[0] if ref else "post_training.use_ref_model"
        raise ConfigError(f"{src}: `{key}`: {method} takes its reference from the base model with the adapter off "
                          "(a separate reference model is not available for online methods yet)")
    evals = [("dataset.eval_split", ds.eval_split), ("dataset.eval_fraction", ds.eval_fraction or None),
             ("training.eval_steps", tr.eval_steps),
             ("training.eval_strategy", tr.eval_strategy if tr.eval_strategy not in (None, "no") else None),
             ("finetuning.early_stopping", ft.early_stopping),
             ("finetuning.load_best_model_at_end", ft.load_best_model_at_end or None),
             ("finetuning.metric_for_best_model", ft.metric_for_best_model),
             ("finetuning.greater_is_better", ft.greater_is_better)]
    for key, value in evals:
        if value is not None:
            raise ConfigError(f"{src}: `{key}`: evaluation of an online method ({method}) is not available yet")
    for key in ("sample_prompts", "sample_max_new_tokens"):
        if getattr(cfg.logging, key) != LoggingConfig.__dataclass_fields__[key].default:
            raise ConfigError(f"{src}: `logging.{key}` does not apply to {method}: its samples.jsonl holds "
                              "every sampled completion with its rewards")
    defaults = TrainingConfig.__dataclass_fields__
    for key in ("pair_layout", "padding_free", "pack_length", "length_buckets", "max_shapes"):
        if getattr(tr, key) != defaults[key].default:
            raise ConfigError(f"{src}: `training.{key}` lays out the offline methods' pairs; {method} lays out "
                              "its own prompts and completions (leave the key out)")
    cut = {"ppo": "response_length", "online_dpo": "max_new_tokens"}.get(method, "max_completion_length")
    unread = {"max_length": f"prompts are cut by `training.max_prompt_length`, completions by `post_training.{cut}`",
              "truncation_mode": "a prompt over `training.max_prompt_length` keeps its last tokens, as TRL's did",
              "train_sampling_strategy": "prompts are shuffled each epoch (seeded), as TRL's sampler does",
              "per_device_eval_batch_size": "evaluation of an online method is not available yet"}
    for key, why in unread.items():
        if getattr(tr, key) != defaults[key].default:
            raise ConfigError(f"{src}: `training.{key}` does not apply to {method}: {why}")


def _dropout(cfg: Config) -> None:
    """TRL's trainers turn LoRA dropout off under `disable_dropout` (true by default for DPO, KTO,
    ORPO, CPO; false for GRPO and RLOO): a `lora.lora_dropout` it would switch off is refused
    rather than trained with (TRL's numbers) or without a word (the user's key ignored)."""
    pt, lo = cfg.post_training, cfg.lora
    if pt.method in ("online_dpo", "ppo"):
        return   # their loops train without dropout: `online_loop.check_online` refuses lora_dropout
    if lo.enabled and lo.lora_dropout > 0 and pt.disable_dropout:
        raise ConfigError(f"{cfg.source}: `lora.lora_dropout` {lo.lora_dropout} would be ignored: "
                          f"`post_training.disable_dropout` is true (TRL's default for {pt.method}); set "
                          "`post_training.disable_dropout: false` to train with LoRA dropout, or leave lora_dropout out")


def _lora(cfg: Config) -> None:
    src, lo = cfg.source, cfg.lora
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
    if lo.init_from and not lo.enabled:   # full fine-tuning trained the base, the adapter never read
        raise ConfigError(f"{src}: `lora.init_from` continues a LoRA adapter, but `lora.enabled: false` trains "
                          "every weight of the base model instead; set `lora.enabled: true`, or leave init_from out")
    unread = [i for i, m in enumerate(cfg.models) if m.ref_model_id]
    if unread and lo.enabled and not cfg.post_training.use_ref_model:   # the reference is the adapter off
        raise ConfigError(f"{src}: `models[{unread[0]}].ref_model_id` names a separate reference model, which is "
                          "read only with `post_training.use_ref_model: true` (or `lora.enabled: false`); "
                          "set it, or leave the key out")


def _training(cfg: Config) -> None:
    src, tr = cfg.source, cfg.training
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
    if tr.warmup_steps < 0 or (tr.warmup_steps >= 1 and tr.warmup_steps != int(tr.warmup_steps)):
        raise ConfigError(f"{src}: `training.warmup_steps` must be a whole number of steps, or below 1 a "
                          f"fraction of the run, got {tr.warmup_steps}")
    if not 0 <= tr.warmup_ratio <= 1:
        raise ConfigError(f"{src}: `training.warmup_ratio` must be in [0, 1], got {tr.warmup_ratio}")
    if tr.warmup_ratio > 0 and tr.warmup_steps > 0:   # warmup_steps would win and warmup_ratio be ignored
        raise ConfigError(f"{src}: `training.warmup_steps` ({tr.warmup_steps:g}) and `training.warmup_ratio` "
                          f"({tr.warmup_ratio:g}) are both set; give one (warmup_steps below 1 is a fraction)")
    if tr.eval_strategy is not None:
        _choice(tr.eval_strategy, ("no", "steps", "epoch"), "training.eval_strategy", src)
    if tr.max_grad_norm is None:   # TRL's default: the Trainer's 1.0; its PPOTrainer steps unclipped
        tr.max_grad_norm = 0.0 if cfg.post_training.method == "ppo" else TRAINER_MAX_GRAD_NORM
    if tr.weight_decay < 0 or tr.max_grad_norm < 0:
        raise ConfigError(f"{src}: `training.weight_decay` and `max_grad_norm` must be >= 0")
    _choice(tr.lr_scheduler_type, ("constant", "linear", "cosine", "constant_with_warmup"),
            "training.lr_scheduler_type", src)
    _choice(tr.optimizer, ("adamw", "sgd", "adafactor"), "training.optimizer", src)
    _choice(tr.truncation_mode, ("keep_start", "keep_end"), "training.truncation_mode", src)
    if tr.train_sampling_strategy is not None:
        _choice(tr.train_sampling_strategy, ("random", "sequential"), "training.train_sampling_strategy", src)
    _choice(tr.param_dtype, ("float32", "bfloat16"), "training.param_dtype", src)
    _choice(tr.compute_dtype, ("float32", "bfloat16"), "training.compute_dtype", src)
    lt = cfg.post_training.loss_type
    kl = pt_is_kto(cfg) and (lt or "kto") in ("kto", ["kto"])   # TRL's checks: apo_zero_unpaired has no KL
    if kl and tr.per_device_train_batch_size < 2:
        raise ConfigError(f"{src}: KTO needs `training.per_device_train_batch_size` >= 2 for its KL estimate")
    if kl and tr.train_sampling_strategy == "random":
        raise ConfigError(f"{src}: KTO's KL estimate pairs each example with its neighbour in data order, so "
                          "`training.train_sampling_strategy` must be sequential (its default) with loss_type kto")


def _training_layout(cfg: Config) -> None:
    src, tr = cfg.source, cfg.training
    _choice(tr.pair_layout, PAIR_LAYOUTS, "training.pair_layout", src)
    if tr.padding_free not in (True, False, "auto"):
        raise ConfigError(f"{src}: `training.padding_free` must be true, false or auto, got {tr.padding_free!r}")
    if tr.padding_free is True and tr.pair_layout.startswith("packed"):
        raise ConfigError(f"{src}: `training.padding_free` needs `training.pair_layout` concatenated or "
                          f"shared_prompt (packed layouts already share rows), got {tr.pair_layout}")
    if tr.pack_length is not None and tr.pack_length < 2:
        raise ConfigError(f"{src}: `training.pack_length` must be >= 2")
    if tr.vocab_chunk < 0:
        raise ConfigError(f"{src}: `training.vocab_chunk` must be >= 0 (0: the whole vocabulary), got {tr.vocab_chunk}")
    if tr.max_shapes < 1:
        raise ConfigError(f"{src}: `training.max_shapes` must be >= 1, got {tr.max_shapes}")
    bad = [b for b in tr.length_buckets or [] if b < 1]
    if bad:
        raise ConfigError(f"{src}: `training.length_buckets` are padded lengths in tokens (>= 1), got {bad[0]}")
    _choice(tr.attention, ATTENTION, "training.attention", src)
    if tr.recompute_activations not in (True, False, "auto"):
        raise ConfigError(f"{src}: `training.recompute_activations` must be true, false or auto, "
                          f"got {tr.recompute_activations!r}")
    _choice(tr.matmul_precision, ("highest", "tf32"), "training.matmul_precision", src)
    if pt_is_kto(cfg) and tr.pair_layout not in ("auto", "concatenated"):
        raise ConfigError(f"{src}: KTO needs `training.pair_layout: concatenated` (or auto)")
    _token_budget(cfg)


# Loss types whose value compares the pairs of one micro-batch with each other (sorting, a KL
# estimate): a token budget's micro-batches cannot reproduce them (`jaxpref.data.budget`).
BATCH_COUPLED_LOSSES = ("aot", "aot_unpaired", "aot_pair", "kto_pair")


def _token_budget(cfg: Config) -> None:
    """`training.max_tokens_per_batch`: a positive count, on the layouts and losses it can carry.
    The data-dependent check (the longest pair fits) is `training.setup.train_iterator`'s."""
    src, tr, pt = cfg.source, cfg.training, cfg.post_training
    n = tr.max_tokens_per_batch
    if n is None:
        return
    key = "`training.max_tokens_per_batch`"
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{src}: {key} must be a positive number of tokens, got {n!r}")
    if METHODS[pt.method].data != "paired":
        raise ConfigError(f"{src}: {key} is for the paired offline methods (dpo, ipo, orpo, cpo, simpo), not "
                          f"{pt.method}" + (" (its KL estimate is per micro-batch of pairs)" if pt_is_kto(cfg) else ""))
    if tr.padding_free is False or tr.pair_layout.startswith("packed"):
        what = "padding_free: false" if tr.padding_free is False else f"pair_layout: {tr.pair_layout}"
        raise ConfigError(f"{src}: {key} fills padding-free streams: it needs `training.padding_free` true or "
                          f"auto and `training.pair_layout` concatenated, shared_prompt or auto, not `{what}`")
    coupled = [lt for lt in cfg.loss_types if lt in BATCH_COUPLED_LOSSES]
    if coupled:
        raise ConfigError(f"{src}: {key} does not apply to loss_type {coupled[0]} (its loss compares the pairs of "
                          "a micro-batch with each other, so a different cut changes it)")
    if pt.precompute_ref_logps:
        raise ConfigError(f"{src}: {key} with `post_training.precompute_ref_logps` is not available yet "
                          "(the reference table is read per micro-batch of pairs)")


def pt_is_kto(cfg: Config) -> bool:
    return METHODS[cfg.post_training.method].data == "unpaired"


def _rest(cfg: Config) -> None:
    src = cfg.source
    ids = cfg.gpu.device_ids
    if ids is not None and (not ids or len(set(ids)) < len(ids)):
        what = "is empty" if not ids else f"names device {next(i for i in ids if ids.count(i) > 1)} twice"
        raise ConfigError(f"{src}: `gpu.device_ids` {what} (null: every device)")
    for axis, size in (cfg.gpu.mesh or {}).items():
        if size != -1 and size < 1:
            raise ConfigError(f"{src}: `gpu.mesh.{axis}` must be >= 1, or -1 for the devices left over, got {size}")
    _distributed(cfg.gpu.distributed, src)
    for r in cfg.report_to:
        _choice(r, ("tensorboard", "wandb", "mlflow"), "logging.report_to", src)
    _choice(cfg.finetuning.remat_policy, ("nothing_saveable", "dots_saveable",
                                           "dots_with_no_batch_dims_saveable", "everything_saveable"),
            "finetuning.remat_policy", src)
    if cfg.finetuning.early_stopping is not None:
        _choice(cfg.finetuning.early_stopping.mode, ("min", "max"), "finetuning.early_stopping.mode", src)
    validate_safety(cfg)


def _distributed(d, src: str) -> None:
    """`gpu.distributed`: auto, or all three of coordinator_address, num_processes, process_id."""
    if d is None:
        return
    if not d.auto:
        for key in ("coordinator_address", "num_processes", "process_id"):
            if getattr(d, key) is None:
                raise ConfigError(f"{src}: `gpu.distributed.{key}` is missing (or set `gpu.distributed.auto: true`)")
        if d.num_processes < 1 or not 0 <= d.process_id < d.num_processes:
            raise ConfigError(f"{src}: `gpu.distributed.process_id` must be in [0, num_processes - 1] and "
                              f"`num_processes` >= 1, got process_id {d.process_id} of {d.num_processes}")
    if d.timeout_s < 1:
        raise ConfigError(f"{src}: `gpu.distributed.timeout_s` must be >= 1, got {d.timeout_s}")


def derived_name(huggingface_id: str) -> str:
    """The run folder's name when `models[].name` is not given: the last part of the id or path
    (`./` and `.` name the current folder); empty when nothing can be derived (`/`)."""
    import os

    name = Path(huggingface_id.rstrip("/")).name
    if name in ("", ".", ".."):
        name = Path(os.path.abspath(os.path.expanduser(huggingface_id))).name
    return name.replace(".gguf", "")

"""Config -> what a run is made of: the model bundle and tokenizer, the LoRA spec, the loss spec,
the reference mode, the batch iterator, the planned shapes, the resume fingerprint. Shared by
train, dry run, evaluate and the benchmark so that all see exactly the same model and batches."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

from jaxpref.config import Config
from jaxpref.data.iterator import BatchIterator
from jaxpref.objectives.losses import LossSpec
from jaxpref.objectives.methods import get_method
from jaxpref.errors import ConfigError
from jaxpref.lora.tree import LoraSpec, check_expert_dropout, resolve_targets
from jaxpref.models import weights
from jaxpref.models.source import load_tokenizer, resolve


def lora_spec_for(cfg: Config, bundle_arch, abstract_params) -> LoraSpec | None:
    lo = cfg.lora
    if not lo.enabled:
        return None
    if lo.init_from:
        from jaxpref.lora.peft import spec_from_adapter
        spec = spec_from_adapter(Path(lo.init_from), lo.lora_dropout, arch=bundle_arch)
        mine = resolve_targets(lo.target_modules, bundle_arch, abstract_params, cfg.source)
        for key, theirs, ours in (("r", spec.r, lo.r), ("lora_alpha", spec.alpha, lo.lora_alpha),
                                  ("use_rslora", spec.use_rslora, lo.use_rslora),
                                  ("target_modules", set(spec.targets), set(mine))):
            if theirs != ours:
                raise ConfigError(f"{cfg.source}: `lora.{key}` is {ours if key != 'target_modules' else sorted(ours)} "
                                  f"but the adapter in `lora.init_from` has {theirs if key != 'target_modules' else sorted(theirs)}")
        out = LoraSpec(spec.r, spec.alpha, spec.targets, spec.use_rslora, lo.lora_dropout, lo.init)
    else:
        targets = resolve_targets(lo.target_modules, bundle_arch, abstract_params, cfg.source)
        out = LoraSpec(lo.r, lo.lora_alpha, targets, lo.use_rslora, lo.lora_dropout, lo.init)
    check_expert_dropout(out, bundle_arch, cfg.source)
    return out


def run_options(cfg: Config) -> dict:
    """Model options that change how the forward runs, never its numbers (policy and reference)."""
    tr = cfg.training
    return {"vocab_chunk": tr.vocab_chunk, "scan_layers": tr.scan_layers,
            "recompute_activations": tr.recompute_activations is not False, "attention": tr.attention,
            "matmul_precision": tr.matmul_precision}


def reference_source(cfg: Config, entry, tok):
    """(id, source) of the separate reference model of `entry` (`ref_model_id`, else its own base),
    refused when its tokenizer is not the policy's `tok`: the run and its dry run check it alike."""
    from jaxpref.models.source import load_tokenizer, resolve

    rid = entry.ref_model_id or entry.huggingface_id
    rsrc = resolve(rid)
    if load_tokenizer(rsrc).get_vocab() != tok.get_vocab():
        raise ConfigError(f"{cfg.source}: reference model `{rid}` has a different tokenizer from the policy")
    return rid, rsrc


def reference_bundle(cfg: Config, src):
    """A separate, frozen reference model: the run's dtypes and forward options, no remat."""
    return weights.build(src, cfg.training.param_dtype, cfg.training.compute_dtype, **run_options(cfg))


def check_attention(cfg: Config) -> None:
    """`training.attention: flash` where no flash kernel can run: one line, before any tracing."""
    import jax

    from jaxpref.models.flash import tokamax

    if cfg.training.attention != "flash":
        return
    if tokamax() is None:
        raise ConfigError(f"{cfg.source}: `training.attention: flash` needs tokamax, which is not installed "
                          "(uv sync --extra flash), or use auto")
    if jax.default_backend() == "tpu":
        raise ConfigError(f"{cfg.source}: `training.attention: flash` is not available on TPU (its kernel takes no "
                          "per-query key intervals); use auto, xla or xla_chunked")


def model_for(cfg: Config, index: int, training: bool = True, weights_needed: bool = True,
              full_rows: bool = True):
    """-> (bundle with LoRA options set, tokenizer, lora spec or None, abstract params).
    `full_rows` False: only KV-cached decoding will run (its own attention), so that
    `training.attention: flash` needs no kernel."""
    if full_rows:
        check_attention(cfg)
    entry = cfg.models[index]
    src = resolve(entry.huggingface_id, entry.revision, weights=weights_needed)
    bundle = weights.build(src, cfg.training.param_dtype, cfg.training.compute_dtype,
                           gradient_checkpointing=cfg.gradient_checkpointing,
                           remat_policy=cfg.finetuning.remat_policy, **run_options(cfg))
    tok = load_tokenizer(src, entry.tokenizer_id)  # after `build`: an unsupported model is named first
    bundle = _router_aux(cfg, bundle)
    abstract = bundle.abstract_params()
    spec = lora_spec_for(cfg, bundle.arch, abstract)
    if spec is not None:
        bundle = bundle.with_args(lora_scale=spec.scale, lora_dropout=spec.dropout,
                                  deterministic=not (training and spec.dropout > 0))
    return bundle, tok, spec, abstract


def _router_aux(cfg: Config, bundle):
    """A mixture of experts' load-balancing term, where TRL's trainer for the method adds it: DPO
    and IPO always (`router_aux_loss_coef` from the model's config), ORPO/CPO/SimPO only when the
    config sets `output_router_logits`; KTO (TRL's main forward only, not its KL pass) is refused
    while the coefficient is not 0."""
    coef = bundle.router_aux_coef
    method = cfg.post_training.method
    if not coef:
        return bundle
    if method == "kto":
        raise ConfigError(f"{cfg.source}: kto on a mixture of experts: TRL adds router_aux_loss_coef ({coef}) times "
                          f"the load-balancing loss, which jaxpref does not compute for KTO yet; set "
                          f"`router_aux_loss_coef: 0` in the model's config.json (TRL then adds none either)")
    if method in ("orpo", "cpo", "simpo") and not bundle.source.hf_config.get("output_router_logits"):
        return bundle.with_args(router_aux_loss_coef=0.0)
    return bundle


def router_aux_layout(cfg: Config, bundle, layout):
    """The layout when the loss has a router term: TRL's load-balancing statistics count every
    token of its rows, and the padding-free and packed layouts leave out each sequence's last token
    (it is only a target), so they are padded here (`padding_free: auto`) or refused."""
    if not bundle.router_aux_coef or not (layout.padding_free or layout.kind.packed):
        return layout
    if cfg.training.padding_free == "auto" and not layout.kind.packed:
        return dataclasses.replace(layout, padding_free=False)
    what = "`training.padding_free: true`" if layout.padding_free else f"`training.pair_layout: {layout.kind.value}`"
    raise ConfigError(f"{cfg.source}: {what} leaves each sequence's last token out of the router's load-balancing "
                      f"loss that TRL adds on a mixture of experts (router_aux_loss_coef {bundle.router_aux_coef}); "
                      f"use padded rows (padding_free: false, pair_layout concatenated or shared_prompt)")


def plan_shapes(it, cfg: Config, args, abstract, steps: int) -> tuple:
    """Fit the run's batch shapes (T, K) to its own steps, unless `training.length_buckets` fixes
    the lengths: at most `training.max_shapes` compilations, little padding. -> the shapes."""
    if cfg.training.length_buckets:
        return ()
    from jaxpref.runtime.flops import FlopModel
    fm = FlopModel.of(abstract, args)
    if it.layout.padding_free:
        per = it.units_per_stream()
        cost = lambda L, K, Tb: fm.step(1, L, K, blocks=(per, Tb))
    else:
        cost = lambda T, K: fm.step(1, T, K)
    return it.plan_shapes(steps, cost, cfg.training.max_shapes)


def loss_spec(cfg: Config) -> LossSpec:
    """The loss parameters of `post_training`: every key that is a `LossSpec` field, the method's
    other keys as `extra`; RPO (`rpo_alpha`) adds an `sft` term."""
    pt = cfg.post_training
    method = get_method(pt.method)
    types = tuple(cfg.loss_types)
    w = tuple(pt.loss_weights) if pt.loss_weights else tuple(1.0 for _ in types)
    if getattr(pt, "rpo_alpha", None) is not None and "sft" not in types:
        types, w = types + ("sft",), w + (pt.rpo_alpha,)
    fields = set(LossSpec.__dataclass_fields__) - {"method", "loss_types", "loss_weights", "extra"}
    keys = [k for k in vars(pt) if k in fields]
    frozen = lambda v: tuple(v) if isinstance(v, list) else v   # LossSpec is hashable (a static argument)
    extra = tuple((k, frozen(getattr(pt, k))) for k in method.keys.__dataclass_fields__ if k not in fields)
    return LossSpec(method=pt.method, loss_types=types, loss_weights=w, extra=extra,
                    **{k: getattr(pt, k) for k in keys})


def ref_mode(cfg: Config, spec: LossSpec, lora_enabled: bool) -> str:
    """Where reference log-probs come from (`training.step.reference_logps`), before the run
    refines it (an initial adapter, a precomputed table)."""
    if not get_method(spec.method).needs_reference(spec):
        return "none"
    if cfg.post_training.use_ref_model or not lora_enabled:
        return "separate"
    return "lora_off"


def iterator_class(cfg: Config):
    """The batch iterator of the method's data kind (`jaxpref.data.iterator`, `.unpaired`)."""
    if get_method(cfg.post_training.method).data == "unpaired":
        from jaxpref.data.unpaired import UnpairedIterator
        return UnpairedIterator
    return BatchIterator


def train_iterator(cfg: Config, data, B: int, G: int, layout, shuffle: bool = True, whole_steps: bool = False):
    """The train batch iterator: the method's (`iterator_class`), or with
    `training.max_tokens_per_batch` the token budget's (`jaxpref.data.budget`), which needs
    padding-free rows, one stream (one data-parallel device) and a budget that holds every pair.
    On one data-parallel device an epoch ends with a shorter step, as TRL's; on several, and with
    `whole_steps` (a benchmark's), the rows that do not fill a step are left out of the epoch."""
    if not layout.max_tokens:
        return iterator_class(cfg)(data, B, G, cfg.training.seed, layout, shuffle=shuffle,
                                   last_short=layout.streams == 1 and not whole_steps)
    from jaxpref.data.budget import BudgetIterator

    key = f"{cfg.source}: `training.max_tokens_per_batch`"
    if not layout.padding_free:
        raise ConfigError(f"{key} needs padding-free rows, which this run does not use (a mixture of experts' "
                          "router loss counts every token: see `training.padding_free`)")
    if layout.streams != 1:
        raise ConfigError(f"{key} is not available yet on {layout.streams} data-parallel devices (one device only)")
    it = BudgetIterator(data, B, G, cfg.training.seed, layout, shuffle=shuffle, last_short=not whole_steps)
    longest = it.longest_pair()
    if longest > layout.max_tokens:
        cut = cfg.training.max_length
        raise ConfigError(f"{key} {layout.max_tokens} is smaller than the longest pair ({longest} tokens "
                          + (f"after truncation to max_length {cut}); raise it to at least {longest} or lower "
                             "`training.max_length`" if cut is not None else
                             f"with no max_length); raise it to at least {longest} or set `training.max_length`"))
    return it


def model_config(cfg: Config, index: int) -> Config:
    """The resolved config of one model (what its run folder records)."""
    one = copy.deepcopy(cfg)
    one.models = [cfg.models[index]]
    return one


def critical_fingerprint(cfg: Config, entry, model_fp: str, layout_kind: str, padding_free: bool = False,
                         train_data=None, data_parallel: int | None = None) -> dict:
    """What must not change between a run and its resumption: what changes the numbers beyond
    float rounding. The attention backend, activation recompute and `vocab_chunk` do not, and
    may change. With LoRA dropout, what changes the batch's shapes or the layer loop changes the
    dropout masks: `padding_free` (resolved), `max_tokens_per_batch` (its micro-batch cuts) and
    `scan_layers` are kept then. `matmul_precision` counts where it applies (fp32 compute).
    The data: the dataset keys that choose the train rows, and `train_data` (the tokenized train
    split, when given) by a digest of its token ids, so that an edited data file or tokenizer is
    named too. The loss: every option of it; the optimizer: its betas and epsilon. The batch: per
    device, and (`data_parallel`, the mesh's data x fsdp size) the global batch, so that a
    checkpoint resumed on another mesh takes steps of the same pairs or is refused."""
    t, pt, lo, ds = cfg.training, cfg.post_training, cfg.lora, cfg.dataset
    dropout = {"padding_free": bool(padding_free), "max_tokens_per_batch": t.max_tokens_per_batch,
               "scan_layers": t.scan_layers} if lo.enabled and lo.lora_dropout > 0 else {}
    fp = {
        "base model": f"{entry.huggingface_id}@{model_fp}", "dataset": ds.name, "method": pt.method,
        "loss_type": list(cfg.loss_types), "beta": pt.beta, "lora.r": lo.r, "lora.lora_alpha": lo.lora_alpha,
        "lora.target_modules": lo.target_modules, "seed": t.seed,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        **({GLOBAL_BATCH: t.per_device_train_batch_size * data_parallel} if data_parallel else {}),
        "gradient_accumulation_steps": t.gradient_accumulation_steps, "max_length": t.max_length,
        "pair_layout": str(layout_kind), "compute_dtype": t.compute_dtype,
        # The optimizer state and the schedule: a resumed run must take the same updates.
        "optimizer": t.optimizer, "learning_rate": t.learning_rate, "lr_scheduler_type": t.lr_scheduler_type,
        "warmup_steps": t.warmup_steps, "warmup_ratio": t.warmup_ratio, "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm, "lora.enabled": lo.enabled,
        "lora.lora_dropout": lo.lora_dropout if lo.enabled else 0.0,
        "matmul_precision": t.matmul_precision if t.compute_dtype == "float32" else "n/a (bfloat16 compute)",
        **dropout,
        **{f"dataset.{k}": getattr(ds, k) for k in DATA_KEYS},
        **{f"post_training.{k}": getattr(pt, k) for k in LOSS_KEYS},
        **{f"training.{k}": getattr(t, k) for k in TRAINING_KEYS},
        **{f"lora.{k}": getattr(lo, k) for k in LORA_KEYS if lo.enabled},
        "reference model": entry.ref_model_id,
        **({"train data": train_data.digest()} if train_data is not None else {}),
    }
    return json.loads(json.dumps(fp, default=str))   # as the checkpoint's JSON record reads it back


GLOBAL_BATCH = "global batch (per_device_train_batch_size x gpu.mesh data x fsdp)"

# Keys beyond the named ones above that change a resumed run's numbers (its rows, its loss, its
# updates): refused when changed, as the rest (`checkpoint.check_fingerprint`).
# (`eval_split` may change: it adds or moves evaluation only; `eval_fraction`'s other train rows are
# named by the `train data` digest.)
DATA_KEYS = ("config_name", "split", "revision", "data_files", "prompt_column", "chosen_column",
             "rejected_column", "completion_column", "label_column", "max_samples")
LOSS_KEYS = ("loss_weights", "label_smoothing", "use_ref_model", "reference_free", "disable_dropout",
             "f_divergence_type", "f_alpha_divergence_coef", "use_weighting", "ld_alpha", "rpo_alpha",
             "discopop_tau", "desirable_weight", "undesirable_weight", "orpo_nll_span", "simpo_gamma", "cpo_alpha")
TRAINING_KEYS = ("adam_beta1", "adam_beta2", "adam_epsilon", "max_prompt_length", "truncation_mode",
                 "train_sampling_strategy", "param_dtype", "pack_length")
LORA_KEYS = ("use_rslora", "init", "init_from")


def on_mesh(bundle, mesh):
    """The bundle for a run on `mesh`: with several devices, custom attention kernels run per shard
    (`models.attention`), so the model carries the mesh."""
    return bundle.with_args(mesh=mesh) if mesh.devices.size > 1 else bundle


def planned_keys(cfg: Config, it) -> list:
    """The offline iterator's planned step shapes (none with fixed `length_buckets`)."""
    return it.shape_keys(cfg.training.gradient_accumulation_steps) if it.shapes else []


def skipped_part(skipped: dict, what: str = "rows") -> list[str]:
    """['N <what> skipped: reason n, ...'] for a note, or []."""
    return [f"{sum(skipped.values())} {what} skipped: " + ", ".join(f"{k} {v}" for k, v in skipped.items())] \
        if skipped else []


def note(parts: list[str]) -> str:
    """' (a; b)' for the start-of-run line, or ''."""
    return f" ({'; '.join(parts)})" if parts else ""


def rows_note(cfg: Config, prepared) -> str:
    """' (N rows skipped: reason n, ...; M truncated)' for the start-of-run line, or ''."""
    parts = skipped_part(prepared.train.skipped)
    if prepared.eval is not None and cfg.dataset.eval_split:
        parts += skipped_part(prepared.eval.skipped, "eval rows")
    if prepared.report.truncated:
        parts.append(f"{prepared.report.truncated} truncated")
    return note(parts)


def resolve_recompute(cfg: Config, bundle, abstract, lspec, keys: list, mesh):
    """`training.recompute_activations: auto`: recompute on a CPU (measured faster there:
    docs/performance.md); on an accelerator store the activations when the memory plan of the
    run's step shapes `keys` (the offline iterator's planned `shape_keys`, an online run's
    largest micro-batch) without recompute fits in 80% of the device's memory."""
    import jax

    from jaxpref.lora.tree import count, target_shapes
    from jaxpref.runtime.memory import memory_plan
    from jaxpref.runtime.mesh import per_device_elements

    if cfg.training.recompute_activations != "auto" or jax.default_backend() == "cpu" or not keys:
        return bundle
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    if not limit:
        return bundle
    trainable = count(abstract) if lspec is None else sum(
        s[0] * (s[1] + s[2]) * lspec.r if len(s) == 3 else (s[0] + s[1]) * lspec.r
        for s in target_shapes(abstract, lspec).values())
    args = dataclasses.replace(bundle.args, recompute_activations=False)
    plan = memory_plan(cfg, args, count(abstract), trainable, keys, mesh=mesh,
                       base_per_device=per_device_elements(abstract, mesh, bundle.arch.roles))
    return bundle.with_args(recompute_activations=plan["total"] > 0.8 * limit)

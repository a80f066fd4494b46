"""Config -> (model bundle, tokenizer) and config -> tokenized train/eval data. Shared by train,
dry-run and evaluate so that all three see exactly the same model and tokens."""
from __future__ import annotations

from pathlib import Path



from jaxpref.config import Config
from jaxpref.errors import ConfigError
from jaxpref.lora.tree import LoraSpec, resolve_targets
from jaxpref.models import weights
from jaxpref.models.source import load_tokenizer, resolve


def lora_spec_for(cfg: Config, bundle_arch, abstract_params) -> LoraSpec | None:
    lo = cfg.lora
    if not lo.enabled:
        return None
    if lo.init_from:
        from jaxpref.lora.peft import spec_from_adapter
        spec = spec_from_adapter(Path(lo.init_from), lo.lora_dropout)
        mine = resolve_targets(lo.target_modules, bundle_arch, abstract_params, cfg.source)
        for key, theirs, ours in (("r", spec.r, lo.r), ("lora_alpha", spec.alpha, lo.lora_alpha),
                                  ("use_rslora", spec.use_rslora, lo.use_rslora),
                                  ("target_modules", set(spec.targets), set(mine))):
            if theirs != ours:
                raise ConfigError(f"{cfg.source}: `lora.{key}` is {ours if key != 'target_modules' else sorted(ours)} "
                                  f"but the adapter in `lora.init_from` has {theirs if key != 'target_modules' else sorted(theirs)}")
        return LoraSpec(spec.r, spec.alpha, spec.targets, spec.use_rslora, lo.lora_dropout, lo.init)
    targets = resolve_targets(lo.target_modules, bundle_arch, abstract_params, cfg.source)
    return LoraSpec(lo.r, lo.lora_alpha, targets, lo.use_rslora, lo.lora_dropout, lo.init)


def run_options(cfg: Config) -> dict:
    """Model options that change how the forward runs, never its numbers (policy and reference)."""
    tr = cfg.training
    return {"vocab_chunk": tr.vocab_chunk, "scan_layers": tr.scan_layers,
            "recompute_activations": tr.recompute_activations}


def reference_bundle(cfg: Config, src):
    """A separate, frozen reference model: the run's dtypes and forward options, no remat."""
    return weights.build(src, cfg.training.param_dtype, cfg.training.compute_dtype, **run_options(cfg))


def model_for(cfg: Config, index: int, training: bool = True, weights_needed: bool = True):
    """-> (bundle with LoRA options set, tokenizer, lora spec or None, abstract params)."""
    entry = cfg.models[index]
    src = resolve(entry.huggingface_id, entry.revision, weights=weights_needed)
    bundle = weights.build(src, cfg.training.param_dtype, cfg.training.compute_dtype,
                           gradient_checkpointing=cfg.gradient_checkpointing,
                           remat_policy=cfg.finetuning.remat_policy, **run_options(cfg))
    tok = load_tokenizer(src, entry.tokenizer_id)  # after `build`: an unsupported model is named first
    abstract = bundle.abstract_params()
    spec = lora_spec_for(cfg, bundle.arch, abstract)
    if spec is not None:
        bundle = bundle.with_args(lora_scale=spec.scale, lora_dropout=spec.dropout,
                                  deterministic=not (training and spec.dropout > 0))
    return bundle, tok, spec, abstract


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

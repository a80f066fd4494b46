"""Config -> (model bundle, tokenizer) and config -> tokenized train/eval data. Shared by train,
dry-run and evaluate so that all three see exactly the same model and tokens."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxpref import data as data_mod
from jaxpref.batching import DEFAULT_BUCKETS, Layout, LengthReport, apply_lengths
from jaxpref.config import Config
from jaxpref.errors import ConfigError
from jaxpref.lora import LoraSpec, resolve_targets
from jaxpref.models import weights
from jaxpref.models.source import DEFAULT_CACHE, load_tokenizer, resolve


def lora_spec_for(cfg: Config, bundle_arch, abstract_params) -> LoraSpec | None:
    lo = cfg.lora
    if not lo.enabled:
        return None
    if lo.init_from:
        from jaxpref.export import spec_from_adapter
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


@dataclass
class PreparedData:
    train: data_mod.Tokenized
    eval: data_mod.Tokenized | None
    report: LengthReport
    layout: Layout


def data_for(cfg: Config, tok, max_rows: int | None = None, cache_root: Path | None = None) -> PreparedData:
    ds_cfg = cfg.dataset
    method = cfg.post_training.method
    cache = Path(cache_root or DEFAULT_CACHE) / "tokenized"
    rows = data_mod.load_rows(ds_cfg)
    if ds_cfg.max_samples is not None:
        max_rows = min(max_rows or ds_cfg.max_samples, ds_cfg.max_samples)
    train = data_mod.prepare(rows, ds_cfg, tok, method, cache, max_rows)
    ev = None
    if ds_cfg.eval_split:
        ev = data_mod.prepare(data_mod.load_rows(ds_cfg, ds_cfg.eval_split), ds_cfg, tok, method, cache, max_rows)
    elif ds_cfg.eval_fraction > 0:
        n = len(train)
        perm = np.random.default_rng(cfg.training.seed).permutation(n)
        k = max(1, int(round(n * ds_cfg.eval_fraction)))
        if k >= n:
            raise ConfigError(f"`dataset.eval_fraction` {ds_cfg.eval_fraction} takes all {n} usable rows "
                              "for evaluation; none is left to train on")
        ev, train = train.subset(np.sort(perm[:k])), train.subset(np.sort(perm[k:]))
    tr = cfg.training
    train, report = apply_lengths(train, tr.max_length, tr.max_prompt_length, tr.truncation_mode)
    if ev is not None:
        ev, _ = apply_lengths(ev, tr.max_length, tr.max_prompt_length, tr.truncation_mode)
    if len(train) == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in train.skipped.items())
        raise ConfigError(f"dataset `{ds_cfg.name}` is empty after filtering ({reasons})")
    buckets = tuple(tr.length_buckets) if tr.length_buckets else DEFAULT_BUCKETS
    if tr.max_length is not None and tr.pair_layout in ("concatenated", "packed"):
        buckets = tuple(b for b in buckets if b < tr.max_length) + (tr.max_length,)
    layout = Layout(tr.pair_layout, tr.max_length, tr.truncation_mode, buckets,
                    int(tok.pad_token_id if tok.pad_token_id is not None else 0),
                    cfg.post_training.ld_alpha,
                    pack_length=tr.pack_length or (tr.max_length if tr.pair_layout == "packed" else
                                                   int(1.5 * tr.max_length) if tr.max_length else None),
                    full_span=(cfg.post_training.method == "orpo"
                               and cfg.post_training.orpo_nll_span == "prompt_and_completion"),
                    padding_free=tr.padding_free)
    return PreparedData(train, ev, report, layout)


def plan_shapes(it, cfg: Config, args, abstract, steps: int) -> tuple:
    """Fit the run's batch shapes (T, K) to its own steps, unless `training.length_buckets` fixes
    the lengths: at most `training.max_shapes` compilations, little padding. -> the shapes."""
    if cfg.training.length_buckets:
        return ()
    from jaxpref.flops import FlopModel
    fm = FlopModel.of(abstract, args)
    if it.layout.padding_free:
        per = it.units_per_stream()
        cost = lambda L, K, Tb: fm.step(1, L, K, blocks=(per, Tb))
    else:
        cost = lambda T, K: fm.step(1, T, K)
    return it.plan_shapes(steps, cost, cfg.training.max_shapes)

"""The run loop for one model: the one place with side effects (files, logs, checkpoints)."""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref import pipeline
from jaxpref.batching import BatchIterator
from jaxpref.config import Config, dump_config
from jaxpref.errors import ConfigError, JaxprefError
from jaxpref.export import load_adapter, save_adapter
from jaxpref.lora import count, init_lora
from jaxpref.losses import LossSpec
from jaxpref.metrics import MetricSinks, ProgressBar
from jaxpref.models import weights
from jaxpref.step import StepOptions, TrainState, make_eval_step, make_optimizer, make_train_step


def loss_spec(cfg: Config) -> LossSpec:
    pt = cfg.post_training
    types = tuple(cfg.loss_types)
    w = tuple(pt.loss_weights) if pt.loss_weights else tuple(1.0 for _ in types)
    if pt.rpo_alpha is not None and "sft" not in types:
        types, w = types + ("sft",), w + (pt.rpo_alpha,)
    return LossSpec(method=pt.method, loss_types=types, loss_weights=w, beta=pt.beta,
                    label_smoothing=pt.label_smoothing, f_divergence_type=pt.f_divergence_type,
                    f_alpha_divergence_coef=pt.f_alpha_divergence_coef, use_weighting=pt.use_weighting,
                    reference_free=pt.reference_free, simpo_gamma=pt.simpo_gamma, cpo_alpha=pt.cpo_alpha,
                    desirable_weight=pt.desirable_weight, undesirable_weight=pt.undesirable_weight)


def ref_mode(cfg: Config, spec: LossSpec, lora_enabled: bool) -> str:
    if not spec.needs_reference:
        return "none"
    if cfg.post_training.use_ref_model or not lora_enabled:
        return "separate"
    return "lora_off"


def model_config(cfg: Config, index: int) -> Config:
    """The resolved config of one model (what its run folder records)."""
    one = copy.deepcopy(cfg)
    one.models = [cfg.models[index]]
    return one


def host_tokens(batch: dict, layout_kind: str) -> int:
    """Tokens in TRL's accounting (prompt counted with each completion), whatever the layout."""
    seg = batch["segment_ids"] > 0
    n = int(seg.sum())
    if layout_kind == "shared_prompt":
        n += int((seg & (batch["branch"] == 0)).sum())
    return n


def train_model(cfg: Config, index: int, run_dir: Path, resume: bool = False) -> dict:
    entry = cfg.models[index]
    if cfg.post_training.method == "kto":
        raise ConfigError(f"{cfg.source}: method `kto` is not available in this version of jaxpref")
    if not cfg.lora.enabled:
        raise ConfigError(f"{cfg.source}: `lora.enabled: false` (full fine-tuning) is not available in this version")
    if resume:
        raise ConfigError("--resume is not available in this version of jaxpref")
    unavailable = {
        "post_training.precompute_ref_logps": cfg.post_training.precompute_ref_logps,
        "gpu.mesh": cfg.gpu.mesh, "gpu.distributed": cfg.gpu.distributed,
        "gpu.device_ids": cfg.gpu.device_ids and len(cfg.gpu.device_ids) > 1,
        "finetuning.save_steps / training.save_steps": cfg.save_steps,
        "finetuning.early_stopping": cfg.finetuning.early_stopping,
    }
    for key, value in unavailable.items():
        if value:
            raise ConfigError(f"{cfg.source}: `{key}` is not available in this version of jaxpref")
    t_start = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    mcfg = model_config(cfg, index)
    dump_config(mcfg, run_dir / "config.yaml")
    tcfg = cfg.training

    bundle, tok, lspec, abstract = pipeline.model_for(cfg, index, training=True)
    prepared = pipeline.data_for(cfg, tok)
    spec = loss_spec(cfg)
    mode = ref_mode(cfg, spec, lspec is not None)
    B, G = tcfg.per_device_train_batch_size, tcfg.gradient_accumulation_steps
    it = BatchIterator(prepared.train, B, G, tcfg.seed, prepared.layout)
    if it.steps_per_epoch == 0:
        raise ConfigError(f"{cfg.source}: {len(prepared.train)} usable rows are fewer than one step's "
                          f"{B * G} pairs (per_device_train_batch_size x gradient_accumulation_steps)")
    total = tcfg.max_steps if tcfg.max_steps > 0 else int(math.ceil(tcfg.num_epochs * it.steps_per_epoch))

    params = weights.load_params(bundle)
    ref_bundle, ref_params = None, None
    if mode == "separate":
        rid = entry.ref_model_id or entry.huggingface_id
        from jaxpref.models.source import load_tokenizer, resolve
        rsrc = resolve(rid)
        rtok = load_tokenizer(rsrc)
        if rtok.get_vocab() != tok.get_vocab():
            raise ConfigError(f"{cfg.source}: reference model `{rid}` has a different tokenizer from the policy")
        ref_bundle = weights.build(rsrc, tcfg.param_dtype, tcfg.compute_dtype)
        ref_params = weights.load_params(ref_bundle) if rid != entry.huggingface_id else params

    rng = jax.random.PRNGKey(tcfg.seed)
    if cfg.lora.init_from:
        lora, _ = load_adapter(Path(cfg.lora.init_from), bundle, abstract)
    else:
        lora = init_lora(abstract, lspec, jax.random.fold_in(rng, 1), cfg.source)
    optimizer, schedule = make_optimizer(tcfg, total)
    state = TrainState(lora, optimizer.init(lora), jnp.zeros((), jnp.int32), jax.random.fold_in(rng, 2))
    opts = StepOptions(spec, 2 * B, need_wpo=spec.use_weighting,
                       orpo_span="completion" if cfg.post_training.orpo_nll_span == "completion" else "prompt_and_completion",
                       ref_mode=mode)
    step_fn = make_train_step(bundle, opts, optimizer, schedule, ref_bundle,
                              dropout=lspec.dropout > 0)
    eval_fn = None
    if prepared.eval is not None and len(prepared.eval) >= tcfg.per_device_eval_batch_size:
        eval_fn = make_eval_step(bundle.with_args(deterministic=True),
                                 replace(opts, num_seqs=2 * tcfg.per_device_eval_batch_size), ref_bundle)

    sinks = MetricSinks(run_dir, cfg, entry.name)
    bar = ProgressBar(total, enabled=cfg.logging.progress_bar)
    print(f"[{entry.name}] {bundle.source.model_type}, {count(params) / 1e6:.1f}M params, "
          f"{count(lora) / 1e6:.3f}M trainable (LoRA r={lspec.r}), {len(prepared.train)} pairs, "
          f"{it.steps_per_epoch} steps/epoch, {total} steps, layout {prepared.layout.kind}", file=sys.stderr)
    total_tokens = 0
    window_tokens, window_t0 = 0, time.time()
    last: dict = {}
    shapes = set()
    compile_s = None
    for step in range(total):
        batch, epoch = next(it)
        shapes.add(batch["input_ids"].shape)
        ntok = host_tokens(batch, prepared.layout.kind)
        total_tokens += ntok
        window_tokens += ntok
        t0 = time.time()
        state, m = step_fn(state, params, ref_params, batch, None)
        if compile_s is None:
            jax.block_until_ready(m["loss"])
            compile_s = time.time() - t0
        if step == 0 or (step + 1) % tcfg.logging_steps == 0 or step + 1 == total:
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            if not math.isfinite(m["loss"]):
                raise JaxprefError(f"loss is {m['loss']} at step {step + 1}; stopping")
            elapsed = time.time() - window_t0
            m.update(step=step + 1, epoch=round(epoch, 4), num_tokens=total_tokens,
                     tokens_per_second=round(window_tokens / max(elapsed, 1e-9), 1))
            window_tokens, window_t0 = 0, time.time()
            sinks.log(m)
            last = m
            bar.update(step + 1, m)
        else:
            bar.update(step + 1, None)
        if eval_fn is not None and tcfg.eval_steps and (step + 1) % tcfg.eval_steps == 0:
            ev = evaluate_split(eval_fn, state.lora, params, ref_params, prepared.eval,
                                tcfg.per_device_eval_batch_size, prepared.layout, tcfg.seed)
            ev["step"] = step + 1
            sinks.log(ev)
    bar.close()
    final_eval = None
    if eval_fn is not None:
        final_eval = evaluate_split(eval_fn, state.lora, params, ref_params, prepared.eval,
                                    tcfg.per_device_eval_batch_size, prepared.layout, tcfg.seed)
        final_eval["step"] = total
        sinks.log(final_eval)
    save_adapter(run_dir / "adapter", bundle, state.lora, lspec, entry.huggingface_id, tok)
    summary = {
        "model": entry.name,
        "steps": total,
        "wall_time_s": round(time.time() - t_start, 2),
        "compile_time_s": round(compile_s or 0.0, 2),
        "compiled_shapes": len(shapes),
        "train_pairs": len(prepared.train),
        "skipped_rows": prepared.train.skipped,
        "truncated_rows": prepared.report.truncated,
        "final_metrics": last,
        "final_eval": final_eval,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    sinks.close()
    print(f"[{entry.name}] done in {summary['wall_time_s']} s: loss {last.get('loss', float('nan')):.4f}, "
          f"rewards/accuracies {last.get('rewards/accuracies', float('nan')):.3f} -> {run_dir}", file=sys.stderr)
    return summary


def evaluate_split(eval_fn, lora, params, ref_params, data, batch_size: int, layout, seed: int) -> dict:
    """Mean of eval metrics over all full batches of the eval split, `eval_` prefixed."""
    it = BatchIterator(data, batch_size, 1, seed, layout, shuffle=False)
    sums: dict[str, float] = {}
    n = 0
    for _ in range(it.steps_per_epoch):
        batch, _ = next(it)
        m = jax.device_get(eval_fn(lora, params, ref_params, batch, None))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    return {f"eval_{k}": v / max(n, 1) for k, v in sums.items()}

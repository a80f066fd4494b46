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

from jaxpref.data import prepare
from jaxpref.training import setup
from jaxpref.data.iterator import BatchIterator
from jaxpref.data.shapes import shape_key
from jaxpref.data.layouts import trl_token_count
from jaxpref.config import Config, dump_config
from jaxpref.errors import ConfigError, JaxprefError
from jaxpref.lora.peft import load_adapter, save_adapter
from jaxpref.training.interrupt import StopRequest
from jaxpref.lora.tree import count, init_lora
from jaxpref.objectives.losses import LossSpec
from jaxpref.training.sinks import MetricSinks
from jaxpref.training.progress import ProgressBar
from jaxpref.models import weights
from jaxpref.runtime.memory import peak_memory
from jaxpref.training.step import compile_ahead, StepOptions, TrainState, make_eval_step, make_train_step
from jaxpref.training.optim import make_optimizer


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


def iterator_class(cfg: Config):
    if cfg.post_training.method == "kto":
        from jaxpref.data.unpaired import UnpairedIterator
        return UnpairedIterator
    return BatchIterator


def model_config(cfg: Config, index: int) -> Config:
    """The resolved config of one model (what its run folder records)."""
    one = copy.deepcopy(cfg)
    one.models = [cfg.models[index]]
    return one


def host_tokens(batch: dict, layout_kind: str) -> int:
    """Tokens in TRL's accounting (prompt counted with each completion), whatever the layout."""
    if "trl_tokens" in batch:  # padding-free: counted before the stream left tokens out
        return int(batch["trl_tokens"].sum())
    return trl_token_count(batch["segment_ids"], batch["branch"], "shared_prompt" in layout_kind)


def critical_fingerprint(cfg: Config, entry, model_fp: str) -> dict:
    """What must not change between a run and its resumption."""
    t, pt, lo, ds = cfg.training, cfg.post_training, cfg.lora, cfg.dataset
    return {
        "base model": f"{entry.huggingface_id}@{model_fp}", "dataset": ds.name, "method": pt.method,
        "loss_type": list(cfg.loss_types), "beta": pt.beta, "lora.r": lo.r, "lora.lora_alpha": lo.lora_alpha,
        "lora.target_modules": lo.target_modules, "seed": t.seed,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps, "max_length": t.max_length,
        "pair_layout": t.pair_layout, "compute_dtype": t.compute_dtype,
        # The optimizer state and the schedule: a resumed run must take the same updates.
        "optimizer": t.optimizer, "learning_rate": t.learning_rate, "lr_scheduler_type": t.lr_scheduler_type,
        "warmup_steps": t.warmup_steps, "warmup_ratio": t.warmup_ratio, "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm, "lora.enabled": lo.enabled,
    }


class EarlyStopping:
    def __init__(self, es):
        self.es = es
        self.best = None
        self.best_step = None
        self.bad = 0

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def restore(self, d: dict) -> None:
        self.best, self.best_step, self.bad = d.get("best"), d.get("best_step"), d.get("bad", 0)

    def update(self, metrics: dict, step: int) -> tuple[bool, bool]:
        """-> (improved, stop)."""
        key = self.es.metric
        if key not in metrics:
            raise ConfigError(f"`finetuning.early_stopping.metric` `{key}` is not logged; "
                              f"eval metrics are: {', '.join(sorted(metrics))}")
        v = metrics[key]
        better = (self.best is None or (v < self.best - self.es.min_delta if self.es.mode == "min"
                                        else v > self.best + self.es.min_delta))
        if better:
            self.best, self.best_step, self.bad = v, step, 0
        else:
            self.bad += 1
        return better, self.bad >= self.es.patience


def train_model(cfg: Config, index: int, run_dir: Path, resume: bool = False,
                resume_force: bool = False) -> dict:
    from jaxpref.training import checkpoint as ckpt
    from jaxpref.models.source import fingerprint

    entry = cfg.models[index]
    unavailable = {
    }
    for key, value in unavailable.items():
        if value:
            raise ConfigError(f"{cfg.source}: `{key}` is not available in this version of jaxpref")
    from jaxpref.runtime import mesh as mesh_mod
    mesh = mesh_mod.make_mesh(cfg.gpu, cfg.source)
    dp = mesh_mod.data_parallel_size(mesh)
    is_main = jax.process_index() == 0
    if resume and ckpt.is_finished(run_dir):
        print(f"[{entry.name}] already finished ({run_dir}); skipping", file=sys.stderr)
        return json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    t_start = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume and is_main:
        ckpt.clear_run(run_dir)
    mcfg = model_config(cfg, index)
    tcfg = cfg.training

    bundle, tok, lspec, abstract = setup.model_for(cfg, index, training=True)
    prepared = prepare.data_for(cfg, tok)
    # Padding-free: one stream of rows per data-parallel shard.
    prepared.layout = replace(prepared.layout, streams=dp)
    spec = loss_spec(cfg)
    mode = ref_mode(cfg, spec, lspec is not None)
    # The global batch: per-device pairs times the data-parallel size of the mesh.
    B, G = tcfg.per_device_train_batch_size * dp, tcfg.gradient_accumulation_steps
    iter_cls = iterator_class(cfg)
    if cfg.post_training.method == "kto" and prepared.layout.kind != "concatenated":
        raise ConfigError(f"{cfg.source}: KTO needs `training.pair_layout: concatenated`")
    strategy = tcfg.train_sampling_strategy or ("sequential" if cfg.post_training.method == "kto" else "random")
    it = iter_cls(prepared.train, B, G, tcfg.seed, prepared.layout, shuffle=strategy == "random")
    if it.steps_per_epoch == 0:
        raise ConfigError(f"{cfg.source}: {len(prepared.train)} usable rows are fewer than one step's "
                          f"{B * G} pairs (per_device_train_batch_size x gradient_accumulation_steps)")
    total = tcfg.total_steps(it.steps_per_epoch)
    setup.plan_shapes(it, cfg, bundle.args, abstract, total)

    from jaxpref.runtime.memory import runtime_rss
    rss_before_weights = runtime_rss()
    param_sh = mesh_mod.shardings(mesh_mod.param_specs(abstract, mesh, bundle.arch.roles), mesh)
    params = weights.load_params(bundle, shardings=param_sh)
    ref_bundle, ref_params = None, None
    if mode == "separate":
        rid = entry.ref_model_id or entry.huggingface_id
        from jaxpref.models.source import load_tokenizer, resolve
        rsrc = resolve(rid)
        rtok = load_tokenizer(rsrc)
        if rtok.get_vocab() != tok.get_vocab():
            raise ConfigError(f"{cfg.source}: reference model `{rid}` has a different tokenizer from the policy")
        ref_bundle = setup.reference_bundle(cfg, rsrc)
        if rid != entry.huggingface_id:
            ref_abstract = ref_bundle.abstract_params()
            ref_params = weights.load_params(ref_bundle, shardings=mesh_mod.shardings(
                mesh_mod.param_specs(ref_abstract, mesh, ref_bundle.arch.roles), mesh))
        else:
            ref_params = params

    rng = jax.random.PRNGKey(tcfg.seed)
    full_ft = lspec is None
    if full_ft:
        # Full fine-tuning: every base weight is trained; the reference keeps the loaded copy.
        lora = jax.tree_util.tree_map(jnp.copy, params)
    elif cfg.lora.init_from:
        lora, _ = load_adapter(Path(cfg.lora.init_from), bundle, abstract)
    else:
        lora = init_lora(abstract, lspec, jax.random.fold_in(rng, 1), cfg.source)
    if mode == "lora_off" and cfg.lora.init_from:
        mode = "initial_adapter"
        ref_params = jax.tree_util.tree_map(jnp.copy, lora)
        ref_bundle = bundle.with_args(deterministic=True)
    # With `training.scan_layers` off the step reads one weight tree per layer: split once, here.
    shared_ref = ref_params is params
    params = bundle.runtime_params(params)
    if shared_ref:
        ref_params = params
    elif mode == "separate":
        ref_params = ref_bundle.runtime_params(ref_params)
    optimizer, schedule = make_optimizer(tcfg, total)
    if mode == "initial_adapter":
        ref_params = jax.device_put(ref_params, mesh_mod.replicated(mesh))
    if full_ft:  # trainable weights and their optimizer state keep the base weights' sharding
        state = TrainState(lora, optimizer.init(lora), jnp.zeros((), jnp.int32), jax.random.fold_in(rng, 2))
    else:
        lora = jax.device_put(lora, mesh_mod.replicated(mesh))
        state = TrainState(lora, optimizer.init(lora), jnp.zeros((), jnp.int32), jax.random.fold_in(rng, 2))
        state = jax.device_put(state, mesh_mod.replicated(mesh))

    # Checkpoints: restore the newest whole one when resuming.
    fp = critical_fingerprint(cfg, entry, fingerprint(bundle.source))
    store = ckpt.CheckpointStore(run_dir, cfg.finetuning.save_total_limit)
    early = EarlyStopping(cfg.finetuning.early_stopping) if cfg.finetuning.early_stopping else None
    start, total_tokens = 0, 0
    if resume:
        check = lambda meta: ckpt.check_fingerprint(meta.get("fingerprint", {}), fp, run_dir, resume_force)
        try:
            found = store.restore_latest(ckpt.abstract_of(state), check, force=resume_force)
        except JaxprefError:
            store.close()
            raise
        if found is None:
            print(f"[{entry.name}] no checkpoint to resume from; starting fresh", file=sys.stderr)
        else:
            start, state, meta = found
            it.restore(meta["iterator"])
            total_tokens = int(meta["num_tokens"])
            if early is not None:
                early.restore(meta.get("early_stopping", {}))
            print(f"[{entry.name}] resuming from step {start}", file=sys.stderr)
    if is_main:
        ckpt.truncate_metrics(run_dir / "metrics.jsonl", start, final=start >= total)
        dump_config(mcfg, run_dir / "config.yaml")  # after the resume checks: a refused resume keeps the record

    ref_table = None
    eval_mode = mode
    if cfg.post_training.precompute_ref_logps and mode != "none":
        if cfg.post_training.method == "kto":
            raise ConfigError(f"{cfg.source}: `post_training.precompute_ref_logps` is not available for KTO "
                              "(its KL rows change with every batch)")
        from jaxpref.training import reference
        from jaxpref.models.source import DEFAULT_CACHE
        rb = ref_bundle if mode in ("separate", "initial_adapter") else bundle
        rp = ref_params if mode == "separate" else params
        if mode == "initial_adapter":
            raise ConfigError(f"{cfg.source}: `post_training.precompute_ref_logps` with `lora.init_from` is not available")
        key = reference.cache_key(fingerprint((rb or bundle).source), prepared.train, prepared.layout,
                                  entry.ref_model_id or "")
        ref_table = reference.precompute(rb.with_args(deterministic=True), rp, prepared.train, prepared.layout, B,
                                         DEFAULT_CACHE / "ref_logps", key)
        mode = "precomputed"
    opts = StepOptions(spec, 2 * B, need_wpo=spec.use_weighting,
                       orpo_span="completion" if cfg.post_training.orpo_nll_span == "completion" else "prompt_and_completion",
                       ref_mode=mode)
    step_fn = make_train_step(bundle, opts, optimizer, schedule, ref_bundle,
                              dropout=(lspec is not None and lspec.dropout > 0), full_finetune=full_ft)
    eval_fn = None
    EB = tcfg.per_device_eval_batch_size * dp
    if prepared.eval is not None and len(prepared.eval) >= EB:
        eval_fn = make_eval_step(bundle.with_args(deterministic=True),
                                 replace(opts, num_seqs=2 * EB, ref_mode=eval_mode),
                                 ref_bundle)
    if early is not None and eval_fn is None:
        raise ConfigError(f"{cfg.source}: `finetuning.early_stopping` needs an eval split "
                          "(`dataset.eval_split` or `dataset.eval_fraction`) and `training.eval_steps`")

    saved_steps: set[int] = set()

    def save(step_done: int) -> None:
        saved_steps.add(step_done)
        meta = {"fingerprint": fp, "iterator": it.state(), "num_tokens": total_tokens, "step": step_done,
                "early_stopping": early.state() if early else {}}
        store.save(step_done, state, meta)

    sinks = MetricSinks(run_dir, cfg, entry.name, append=start > 0, enabled=is_main)
    try:
        bar = ProgressBar(total - start, enabled=cfg.logging.progress_bar)
        print(f"[{entry.name}] {bundle.source.model_type}, {count(params) / 1e6:.1f}M params, "
              f"{count(lora) / 1e6:.3f}M trainable ({f'LoRA r={lspec.r}' if lspec else 'full fine-tune'}), "
              f"{len(prepared.train)} {'pairs' if prepared.train.paired else 'examples'}{rows_note(cfg, prepared)}, "
              f"{it.steps_per_epoch} steps/epoch, {total} steps, layout {prepared.layout.kind}", file=sys.stderr)
        window_tokens, window_t0 = 0, time.time()
        last: dict = ckpt.last_train_metrics(run_dir / "metrics.jsonl") if start else {}
        shapes = set()
        compile_s = None
        best_lora, stopped_early = None, False
        save_every = cfg.save_steps
        step = start
        ctrl_c = StopRequest(entry.name).__enter__()
        try:
            for step in range(start, total):
                ref_batch = None
                if ref_table is not None:
                    from jaxpref.training.reference import batch_reference, next_indices
                    ref_batch = jax.device_put(batch_reference(ref_table, next_indices(it), G),
                                               mesh_mod.replicated(mesh))
                batch, epoch = next(it)
                shape = shape_key(batch)
                ntok = host_tokens(batch, prepared.layout.kind)
                total_tokens += ntok
                window_tokens += ntok
                t0 = time.time()
                device_batch = mesh_mod.put_batch(batch, mesh)
                if shape not in shapes:
                    shapes.add(shape)
                    compile_ahead(step_fn, state, params, ref_params, device_batch, ref_batch)
                state, m = step_fn(state, params, ref_params, device_batch, ref_batch)
                if compile_s is None:
                    jax.block_until_ready(m["loss"])
                    compile_s = time.time() - t0
                done = step + 1
                if done == 1 or done % tcfg.logging_steps == 0 or done == total:
                    m = {k: float(v) for k, v in jax.device_get(m).items()}
                    if not math.isfinite(m["loss"]):
                        raise JaxprefError(f"loss is {m['loss']} at step {done}; stopping (the last good "
                                           f"checkpoint is kept in {store.dir})")
                    elapsed = time.time() - window_t0
                    # XLA compilations so far: grows only when a new length bucket appears.
                    m["compilations"] = int(step_fn._cache_size())
                    m.update(step=done, epoch=round(epoch, 4), num_tokens=total_tokens,
                             tokens_per_second=round(window_tokens / max(elapsed, 1e-9), 1))
                    window_tokens, window_t0 = 0, time.time()
                    sinks.log(m)
                    last = m
                    bar.update(done - start, m)
                else:
                    bar.update(done - start, None)
                if eval_fn is not None and tcfg.eval_steps and done % tcfg.eval_steps == 0:
                    ev = evaluate_split(eval_fn, *((None, state.lora) if full_ft else (state.lora, params)), ref_params, prepared.eval,
                                        EB, prepared.layout, tcfg.seed, iter_cls, mesh)
                    ev["step"] = done
                    sinks.log(ev)
                    if early is not None:
                        improved, stop = early.update(ev, done)
                        if improved:
                            best_lora = jax.device_get(state.lora)
                        if stop:
                            stopped_early = True
                            print(f"\n[{entry.name}] early stopping at step {done}: `{early.es.metric}` has not "
                                  f"improved for {early.es.patience} evaluations; best was step {early.best_step}",
                                  file=sys.stderr)
                if save_every and done % save_every == 0 and done != total:
                    save(done)
                if stopped_early:
                    break
                if ctrl_c.requested:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            if any(x.is_deleted() for x in jax.tree.leaves(state) if isinstance(x, jax.Array)):
                # Interrupted inside a step that had taken (donated) the state: nothing valid to save.
                store.close()
                print(f"[{entry.name}] interrupted: no checkpoint written; --resume continues from the "
                      "last saved one", file=sys.stderr)
                raise
            done = int(jax.device_get(state.step))
            if done not in saved_steps:  # not saved by this very step already
                save(done)
            store.close()
            print(f"[{entry.name}] interrupted: saved a checkpoint at step {done}; continue with --resume",
                  file=sys.stderr)
            raise
        finally:
            ctrl_c.__exit__()
        bar.close()
        final_step = int(jax.device_get(state.step))
        final_eval = None
        if eval_fn is not None and not stopped_early:
            final_eval = evaluate_split(eval_fn, *((None, state.lora) if full_ft else (state.lora, params)), ref_params, prepared.eval,
                                        EB, prepared.layout, tcfg.seed, iter_cls, mesh)
            final_eval["step"] = final_step
            sinks.log(final_eval)
        if save_every:
            save(final_step)
        store.close()
        export_lora = state.lora
        if stopped_early and best_lora is not None:
            export_lora = best_lora
        if is_main:
            if full_ft:
                from jaxpref.lora.merged import save_merged
                save_merged(run_dir / "model", bundle, export_lora, None, None, tok)
            else:
                save_adapter(run_dir / "adapter", bundle, export_lora, lspec, entry.huggingface_id, tok)
        summary = {
            "model": entry.name,
            "steps": final_step,
            "wall_time_s": round(time.time() - t_start, 2),
            "compile_time_s": round(compile_s or 0.0, 2),
            "compiled_shapes": len(shapes),
            "compilations": int(step_fn._cache_size()),
            "train_pairs": len(prepared.train),
            "skipped_rows": prepared.train.skipped,
            "truncated_rows": prepared.report.truncated,
            "eval_skipped_rows": prepared.eval.skipped if (prepared.eval is not None and cfg.dataset.eval_split) else None,
            "resumed_from_step": start or None,
            "early_stopped": stopped_early,
            "adapter_from_step": early.best_step if (stopped_early and best_lora is not None) else final_step,
            "peak_memory": peak_memory(),
            "memory_plan_mib": memory_plan_for(cfg, bundle, params, state.lora, shapes, dp, mesh,
                                              rss_before_weights) if shapes else None,
            "final_metrics": last,
            "final_eval": final_eval,
        }
        if is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    finally:
        sinks.close()
        try:  # already closed on success; after an error, let its pending writes finish first
            store.close()
        except Exception as e:
            print(f"jaxpref: warning: checkpoint store not closed cleanly ({type(e).__name__})", file=sys.stderr)
    if not is_main:
        return summary
    ckpt.mark_finished(run_dir)
    from jaxpref.plot import plot_run
    try:
        plot_run(run_dir)
    except Exception as e:  # a plot must never fail a finished run
        print(f"jaxpref: warning: plot not written ({type(e).__name__}: {e})", file=sys.stderr)
    acc = last.get("rewards/accuracies")  # KTO has none
    print(f"[{entry.name}] done in {summary['wall_time_s']} s: loss {last.get('loss', float('nan')):.4f}"
          + (f", rewards/accuracies {acc:.3f}" if acc is not None else "") + f" -> {run_dir}", file=sys.stderr)
    return summary


def rows_note(cfg: Config, prepared) -> str:
    """' (N rows skipped: reason n, ...; M truncated)' for the start-of-run line, or ''."""
    parts = []
    skipped = prepared.train.skipped
    if skipped:
        parts.append(f"{sum(skipped.values())} rows skipped: " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
    if prepared.eval is not None and cfg.dataset.eval_split and prepared.eval.skipped:
        ev = prepared.eval.skipped
        parts.append(f"{sum(ev.values())} eval rows skipped: " + ", ".join(f"{k} {v}" for k, v in ev.items()))
    if prepared.report.truncated:
        parts.append(f"{prepared.report.truncated} truncated")
    return f" ({'; '.join(parts)})" if parts else ""


def memory_plan_for(cfg, bundle, params, lora, shapes, dp, mesh, runtime: int) -> dict:
    """The dry-run's plan for the largest batch this run saw (runtime: RSS when it is computed)."""
    from jaxpref.runtime.memory import memory_plan
    n, t, k = (max(s[i] for s in shapes) for i in (1, 2, 3))   # shapes: (G, rows, T, K)
    plan = memory_plan(cfg, bundle.args, count(params), count(lora), max(n // dp, 1), t, k, mesh=mesh, runtime=runtime)
    return {k: round(v / 2**20, 1) for k, v in plan.items()}


def evaluate_split(eval_fn, lora, params, ref_params, data, batch_size: int, layout, seed: int,
                   iter_cls=BatchIterator, mesh=None) -> dict:
    """Mean of eval metrics over all full batches of the eval split, `eval_` prefixed."""
    it = iter_cls(data, batch_size, 1, seed, layout, shuffle=False)
    sums: dict[str, float] = {}
    n = 0
    for _ in range(it.steps_per_epoch):
        batch, _ = next(it)
        if mesh is not None:
            from jaxpref.runtime.mesh import put_batch
            batch = put_batch(batch, mesh)
        m = jax.device_get(eval_fn(lora, params, ref_params, batch, None))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    return {f"eval_{k}": v / max(n, 1) for k, v in sums.items()}

"""Setting a run up: config -> a `Run` holding everything the loop needs (model, data, batches,
weights, reference, train state, compiled step functions, checkpoint store), restored from the
newest checkpoint when resuming. No training happens here."""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxpref.config import Config, EarlyStoppingConfig
from jaxpref.data import prepare
from jaxpref.errors import ConfigError
from jaxpref.lora.peft import load_adapter
from jaxpref.lora.tree import init_lora
from jaxpref.models import weights
from jaxpref.objectives.methods import get_method
from jaxpref.runtime import mesh as mesh_mod
from jaxpref.runtime.memory import runtime_rss
from jaxpref.training import checkpoint as ckpt
from jaxpref.training import setup
from jaxpref.training.evaluation import EarlyStopping, check_eval
from jaxpref.training.optim import make_optimizer
from jaxpref.training.step import StepOptions, TrainState, make_eval_step, make_train_step


@dataclass
class Run:
    """One model's run. Sizes: B pairs per micro-batch (global, all data-parallel shards), G
    micro-batches per step, EB pairs per eval batch, `total` optimizer steps."""
    cfg: Config
    index: int
    run_dir: Path
    mesh: Any
    bundle: Any
    tok: Any
    lspec: Any                 # LoRA spec, or None for full fine-tuning
    prepared: Any              # jaxpref.data.prepare.PreparedData
    it: Any                    # the train batch iterator
    iter_cls: type
    B: int
    G: int
    EB: int
    total: int
    params: Any = None
    ref_bundle: Any = None
    ref_params: Any = None
    state: TrainState | None = None
    mode: str = "lora_off"     # reference mode (`training.step.reference_logps`)
    eval_mode: str | None = None  # the eval step's reference mode when it differs (precomputed)
    ref_table: Any = None      # precomputed reference log-probs [pairs, 2]
    optimizer: Any = None
    schedule: Any = None
    step_fn: Any = None
    eval_fn: Any = None        # n -> the eval step of batches of n rows
    store: Any = None
    early: EarlyStopping | None = None
    best: EarlyStopping | None = None  # `finetuning.load_best_model_at_end`: the best evaluation so far
    fingerprint: dict | None = None
    start: int = 0             # optimizer steps already done (resumed)
    best_lora: Any = None      # the best evaluation's adapter, restored with the state (resumed)
    stopped_early: bool = False  # resumed from a run that early stopping had ended
    num_tokens: int = 0        # TRL's token count so far
    metric_window: list = field(default_factory=list)  # the logging window's steps at the checkpoint
    rss_before_weights: int = 0

    @property
    def entry(self):
        return self.cfg.models[self.index]

    @property
    def full_finetune(self) -> bool:
        return self.lspec is None

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0


def build_run(cfg: Config, index: int, run_dir: Path, resume: bool, resume_force: bool,
              resume_from: int | None = None, finished: bool = False) -> Run:
    """Everything a run needs, restored from its newest checkpoint (or `resume_from`'s) when
    `resume`; `finished`: the run had finished (it is continued to more steps)."""
    run = _batches(cfg, index, run_dir)
    run.rss_before_weights = runtime_rss()
    _weights(run)
    _reference_model(run)
    _train_state(run)
    run.fingerprint = setup.critical_fingerprint(cfg, run.entry, _model_fp(run), run.prepared.layout.kind,
                                                   run.prepared.layout.padding_free, run.prepared.train,
                                                   data_parallel=mesh_mod.data_parallel_size(run.mesh))
    run.store = ckpt.CheckpointStore(run_dir, cfg.finetuning.save_total_limit)
    es = cfg.finetuning.early_stopping
    run.early = EarlyStopping(es) if es else None
    if cfg.finetuning.load_best_model_at_end:
        run.best = EarlyStopping(EarlyStoppingConfig(cfg.best_metric, "max" if cfg.greater_is_better else "min",
                                                     patience=2**31))
    if resume:
        _restore(run, resume_force, resume_from, finished)
    _precomputed_reference(run)
    _step_functions(run)
    return run


def _model_fp(run: Run) -> str:
    from jaxpref.models.source import fingerprint
    return fingerprint(run.bundle.source)


def _batches(cfg: Config, index: int, run_dir: Path) -> Run:
    """The model bundle, the data and the train iterator with its planned shapes."""
    mesh = mesh_mod.make_mesh(cfg.gpu, cfg.source)
    dp = mesh_mod.data_parallel_size(mesh)
    bundle, tok, lspec, abstract = setup.model_for(cfg, index, training=True)
    bundle = setup.on_mesh(bundle, mesh)
    prepared = prepare.data_for(cfg, tok)
    # Padding-free: one stream of rows per data-parallel shard. KTO's KL groups: the global
    # micro-batch (TRL's per-device batch on one device; one KL estimate over the whole mesh).
    layout = setup.router_aux_layout(cfg, bundle, prepared.layout)
    prepared.layout = replace(layout, streams=dp, kl_group=layout.kl_group and layout.kl_group * dp)
    tcfg = cfg.training
    # The global batch: per-device pairs times the data-parallel size of the mesh.
    B, G = tcfg.per_device_train_batch_size * dp, tcfg.gradient_accumulation_steps
    iter_cls = setup.iterator_class(cfg)
    unpaired = get_method(cfg.post_training.method).data == "unpaired"
    strategy = tcfg.train_sampling_strategy or ("sequential" if unpaired else "random")
    it = setup.train_iterator(cfg, prepared.train, B, G, prepared.layout, shuffle=strategy == "random")
    if it.steps_per_epoch == 0:
        raise ConfigError(f"{cfg.source}: {len(prepared.train)} usable rows are fewer than one step's "
                          f"{B * G} pairs (per_device_train_batch_size x gradient_accumulation_steps)")
    check_eval(cfg, prepared.eval, dp)
    total = tcfg.total_steps(it.steps_per_epoch)
    setup.plan_shapes(it, cfg, bundle.args, abstract, total)
    bundle = setup.resolve_recompute(cfg, bundle, abstract, lspec, setup.planned_keys(cfg, it), mesh)
    run = Run(cfg, index, run_dir, mesh, bundle, tok, lspec, prepared, it, iter_cls, B, G,
              tcfg.per_device_eval_batch_size * dp, total)
    run.params = abstract  # replaced by the weights in `_weights`
    return run


def _weights(run: Run) -> None:
    abstract = run.params
    shard = mesh_mod.shardings(mesh_mod.param_specs(abstract, run.mesh, run.bundle.arch.roles), run.mesh)
    run.params = weights.load_params(run.bundle, shardings=shard)


def _reference_model(run: Run) -> None:
    """A separate frozen reference model (`use_ref_model`, or full fine-tuning): its own weights
    when `ref_model_id` names another model, else the loaded base weights (no copy)."""
    spec = setup.loss_spec(run.cfg)
    run.mode = setup.ref_mode(run.cfg, spec, run.lspec is not None)
    if run.mode != "separate":
        return
    rid, rsrc = setup.reference_source(run.cfg, run.entry, run.tok)
    run.ref_bundle = setup.on_mesh(setup.reference_bundle(run.cfg, rsrc), run.mesh)
    if rid == run.entry.huggingface_id:
        run.ref_params = run.params
        return
    ref_abstract = run.ref_bundle.abstract_params()
    run.ref_params = weights.load_params(run.ref_bundle, shardings=mesh_mod.shardings(
        mesh_mod.param_specs(ref_abstract, run.mesh, run.ref_bundle.arch.roles), run.mesh))


def _train_state(run: Run) -> None:
    """The trainable tree (a fresh LoRA, `lora.init_from`'s adapter, or for full fine-tuning the
    whole base tree), its optimizer state, step 0 and the RNG."""
    cfg = run.cfg
    rng = jax.random.PRNGKey(cfg.training.seed)
    if run.full_finetune:   # a copy of the base tree, sharded as the step returns it
        lora = jax.tree_util.tree_map(lambda x: jax.device_put(x, _as_returned(x.sharding), may_alias=False),
                                      run.params)
    elif cfg.lora.init_from:
        lora, _ = load_adapter(Path(cfg.lora.init_from), run.bundle, run.bundle.abstract_params())
    else:
        lora = init_lora(run.bundle.abstract_params(), run.lspec, jax.random.fold_in(rng, 1), cfg.source)
    if run.mode == "lora_off" and cfg.lora.init_from:
        # Continuing from an adapter: the reference is its frozen initial copy (as TRL does).
        run.mode = "initial_adapter"
        run.ref_params = jax.device_put(jax.tree_util.tree_map(jnp.copy, lora), mesh_mod.replicated(run.mesh))
        run.ref_bundle = run.bundle.with_args(deterministic=True)
    # With `training.scan_layers` off the step reads one weight tree per layer: split once, here.
    shared_ref = run.ref_params is run.params
    run.params = run.bundle.runtime_params(run.params)
    if shared_ref:
        run.ref_params = run.params
    elif run.mode == "separate":
        run.ref_params = run.ref_bundle.runtime_params(run.ref_params)
    optimizer, schedule = make_optimizer(cfg.training, run.total)
    run.optimizer, run.schedule = optimizer, schedule
    if not run.full_finetune:  # trainable weights of a full fine-tune keep the base's sharding
        lora = jax.device_put(lora, mesh_mod.replicated(run.mesh))
    state = TrainState(lora, optimizer.init(lora), jnp.zeros((), jnp.int32), jax.random.fold_in(rng, 2))
    if run.full_finetune:
        # The step, the RNG and the optimizer's counters onto the mesh, as the step returns them.
        rep = mesh_mod.replicated(run.mesh)
        run.state = jax.tree_util.tree_map(
            lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding) else jax.device_put(x, rep), state)
    else:
        run.state = jax.device_put(state, mesh_mod.replicated(run.mesh))


def _as_returned(sharding):
    """`sharding` with the trailing unsharded axes of its spec dropped, as a jitted step returns an
    array (`P(None, None)` comes back as `P()`): a full fine-tune's state passed in as it comes
    back, so that the train step compiles once per shape, not again at the second step (nor
    again after a resume, which made a resumed run's `compilations` differ)."""
    from jax.sharding import NamedSharding, PartitionSpec

    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return NamedSharding(sharding.mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind)


def _restore(run: Run, force: bool, step: int | None = None, finished: bool = False) -> None:
    """The newest whole checkpoint (or `step`'s): state, data position, token count, early
    stopping and best-model state. Continuing from an earlier step sets the later ones aside."""
    found = ckpt.resume_point(run, force, step, finished)
    if found is None:
        return
    run.start, run.state, meta = found
    run.it.restore(meta["iterator"])
    run.num_tokens = int(meta["num_tokens"])
    kept = {}   # tracker -> whether the checkpoint's state of it was taken
    for name, tracker, key in (("finetuning.early_stopping", run.early, "early_stopping"),
                               ("finetuning.metric_for_best_model", run.best, "best_model")):
        if tracker is not None:
            kept[name] = tracker.restore(meta.get(key, {}))
            if not kept[name]:
                saved = meta.get(key, {})
                print(f"jaxpref: warning: `{name}` tracks {tracker.es.metric} ({tracker.es.mode}) now, "
                      f"{saved.get('metric')} ({saved.get('mode')}) in checkpoint {run.start}; its best "
                      "evaluation is tracked afresh from here", file=sys.stderr)
    owner = "finetuning.metric_for_best_model" if run.best is not None else "finetuning.early_stopping"
    if meta.get("best_saved") and kept.get(owner, False):   # the best adapter of the metric tracked now
        run.best_lora = run.store.restore_best(run.start, ckpt.abstract_of(run.state.lora))
    run.stopped_early = bool(meta.get("stopped_early"))
    run.metric_window = list(meta.get("metric_window", []))
    ckpt.set_aside_later(run, step)
    more = f" to {run.total} steps" if finished and run.start < run.total and not run.stopped_early else ""
    print(f"[{run.entry.name}] resuming from step {run.start}{more}", file=sys.stderr)


def _precomputed_reference(run: Run) -> None:
    """`precompute_ref_logps`: one reference pass over the training pairs before training
    (cached), so that the step needs no reference forward."""
    cfg = run.cfg
    if not cfg.post_training.precompute_ref_logps or run.mode == "none":
        return
    if run.mode == "initial_adapter":
        raise ConfigError(f"{cfg.source}: `post_training.precompute_ref_logps` with `lora.init_from` is not available")
    from jaxpref.models.source import DEFAULT_CACHE, fingerprint
    from jaxpref.training import reference

    rb = run.ref_bundle if run.mode == "separate" else run.bundle
    rp = run.ref_params if run.mode == "separate" else run.params
    key = reference.cache_key(fingerprint(rb.source), run.prepared.train, run.prepared.layout,
                              run.entry.ref_model_id or "")
    run.ref_table = reference.precompute(rb.with_args(deterministic=True), rp, run.prepared.train,
                                         run.prepared.layout, run.B, DEFAULT_CACHE / "ref_logps", key)
    run.eval_mode = run.mode
    run.mode = "precomputed"


def _step_functions(run: Run) -> None:
    """The jitted train step, and the eval step when the eval split fills a batch."""
    cfg = run.cfg
    spec = setup.loss_spec(cfg)
    eval_mode = run.eval_mode or run.mode
    opts = StepOptions(spec, 2 * run.B, ref_mode=run.mode)
    dropout = run.lspec is not None and run.lspec.dropout > 0
    run.step_fn = make_train_step(run.bundle, opts, run.optimizer, run.schedule, run.ref_bundle,
                                  dropout=dropout, full_finetune=run.full_finetune)
    ev = run.prepared.eval
    if ev is not None and len(ev) >= run.prepared.layout.streams:   # else refused by `evaluation.check_eval`
        # The eval step of batches of n rows: the full eval batch, and the split's shorter last one.
        run.eval_fn = functools.cache(lambda n: make_eval_step(
            run.bundle.with_args(deterministic=True), replace(opts, num_seqs=2 * n, ref_mode=eval_mode),
            run.ref_bundle))

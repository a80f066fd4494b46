"""The run loop for one model: setup, loop, finish. The one place with side effects (files, logs,
checkpoints); what happens between steps (logging, evaluation, early stopping, checkpoints) is
hooks (`hooks.Hooks.add_hook(fn, every=N)`)."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax

from jaxpref.config import Config, dump_config
from jaxpref.data.batches import shape_parts
from jaxpref.errors import JaxprefError
from jaxpref.lora.card import base_model_name, model_card
from jaxpref.lora.peft import save_adapter
from jaxpref.lora.tree import count
from jaxpref.runtime import mesh as mesh_mod
from jaxpref.runtime.memory import memory_plan, peak_memory
from jaxpref.training import checkpoint as ckpt
from jaxpref.training import setup
from jaxpref.training.assemble import Run, build_run
from jaxpref.training.evaluation import evaluate_split
from jaxpref.training.hooks import Hooks, StepInfo
from jaxpref.training.interrupt import StopRequest
from jaxpref.training.progress import clock, make_progress, metric_fields
from jaxpref.training.sinks import MetricSinks
from jaxpref.training.step import compile_ahead
from jaxpref.training.window import MetricWindow, final_speed


def train_model(cfg: Config, index: int, run_dir: Path, resume: bool = False, resume_from: int | None = None,
                resume_force: bool = False) -> dict:
    """Train `cfg.models[index]` into `run_dir`; returns its summary. `resume_from`: the kept
    checkpoint to continue from (default: the newest)."""
    entry = cfg.models[index]
    finished = resume and ckpt.is_finished(run_dir)
    if finished and resume_from is None and _same_length(cfg, index, run_dir):
        return ckpt.skip_finished(run_dir, entry.name)
    t_start = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0 and not resume:
        ckpt.clear_run(run_dir)  # allowed by train.py's claim on the folder (--overwrite-output-dir)
    run = build_run(cfg, index, run_dir, resume, resume_force, resume_from, finished)
    if run.is_main:  # after the resume checks: a refused resume keeps the run's record as it was
        dump_config(setup.model_config(cfg, index), run_dir / "config.yaml")
        if run.start < run.total:
            ckpt.unmark_finished(run_dir)  # a finished run continued to more steps
    trainer = Trainer(run)
    try:
        trainer.train()
        summary = trainer.finish(t_start)
    finally:
        trainer.close()
    if run.is_main:
        _after(run, summary, trainer.last)
    return summary


def _same_length(cfg: Config, index: int, run_dir: Path) -> bool:
    """Whether a finished run was asked for as many steps as now (its saved config's
    `max_steps` and `num_epochs`): then resuming it has nothing to do."""
    from jaxpref.config import load_config

    try:
        saved = load_config(run_dir / "config.yaml").training
    except JaxprefError:
        return False
    now = cfg.training
    return (saved.max_steps, saved.num_epochs) == (now.max_steps, now.num_epochs)


def eval_every(cfg: Config, steps_per_epoch: int) -> int | None:
    """Steps between evaluations (`training.eval_strategy`, TRL's rules), or None."""
    tr = cfg.training
    if tr.eval_strategy == "no":
        return None
    if tr.eval_strategy == "epoch":
        return steps_per_epoch
    if tr.eval_strategy == "steps":
        return tr.eval_steps or tr.logging_steps
    return tr.eval_steps


class Trainer:
    """Steps a `Run` from its start to `total` (or an early stop), with its hooks."""

    def __init__(self, run: Run):
        self.run = run
        cfg = run.cfg
        if run.is_main:
            # Resumed from the final checkpoint: the final evaluation is logged again.
            ckpt.truncate_metrics(run.run_dir / "metrics.jsonl", run.start, final=run.start >= run.total)
        self.sinks = MetricSinks(run.run_dir, setup.model_config(cfg, run.index), run.entry.name,
                                 append=run.start > 0, enabled=run.is_main)
        self.progress = make_progress(run.entry.name, run.start, run.total, cfg.logging.progress_bar and run.is_main)
        # The last logged train metrics (a run resumed from its final checkpoint logs none again).
        self.last: dict = ckpt.last_train_metrics(run.run_dir / "metrics.jsonl") if run.start else {}
        self.shapes: set = set()         # batch shapes compiled so far
        self.compile_s: float | None = None
        self.saved: set[int] = set()
        self.best_lora = run.best_lora    # the best evaluation's adapter (restored when resumed)
        self.stopped_early = run.stopped_early
        self.final_eval = None
        self.last_eval: dict | None = None
        self._window = (0, time.time())  # tokens and start time since the last log
        self._paused = 0.0               # seconds since the last log spent compiling, evaluating, sampling
        self._sampled: set[str] = set()  # models (base, tuned) sampled so far: the first compiles
        self._metrics = MetricWindow()   # the steps' metrics since the last log, as TRL averages them
        self._metrics.restore(run.metric_window)   # resumed inside a logging window: its steps so far
        self._tokens = 0                 # tokens of the last step
        self._loss_sum = 0.0             # the steps' losses (on the device): TRL's final train_loss
        self._t_train: float | None = None
        # The epoch (fractional) after the last step; the resumed step's before any.
        self._epoch = run.start / run.it.steps_per_epoch if run.it.steps_per_epoch else 0.0
        self.hooks = Hooks()
        self.hooks.add_hook(self._log, every=cfg.training.logging_steps, at_end=True)
        if run.eval_fn is not None:
            self.hooks.add_hook(self._evaluate, every=eval_every(cfg, run.it.steps_per_epoch))
        self.sampler = None
        if cfg.logging.sample_prompts:
            from jaxpref.training.samples import Sampler
            self.sampler = Sampler(run, self.sinks, append=run.start > 0)
            if run.eval_fn is not None:
                self.hooks.add_hook(lambda info: self._sample(info.step, info.state.lora),
                                    every=eval_every(cfg, run.it.steps_per_epoch))
        save_every = cfg.save_steps
        self.hooks.add_hook(lambda info: info.step != info.total and self.save(info.step), every=save_every)

    # --- the loop ---------------------------------------------------------------------------

    def train(self) -> None:
        run = self.run
        self._t_train = time.time()
        if run.is_main:
            self.progress.write(self._start_line())
        if self.stopped_early:   # resumed after early stopping ended the run: export only
            self.progress.note(f"[{run.entry.name}] early stopping ended this run at step {run.start}; "
                               "exporting its best adapter", err=True)
            return
        if self.sampler is not None:
            self._sample(0, None, "base")
        ctrl_c = StopRequest(run.entry.name).__enter__()
        try:
            for step in range(run.start, run.total):
                info = self._step(step)
                self.progress.step(info, self._tokens)
                if info.step == 1:
                    self._log(info)  # step 1 always
                self.hooks.run(info)
                if self.stopped_early:
                    break
                if ctrl_c.requested:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            self._interrupted()
            raise
        finally:
            ctrl_c.__exit__()

    def _step(self, step: int) -> StepInfo:
        """One optimizer step on the next batch; compiles ahead when its shape is new."""
        run = self.run
        ref_batch = self._reference_batch()
        batch, epoch = next(run.it)
        ntok = batch.trl_token_count()
        run.num_tokens += ntok
        self._tokens = ntok
        self._window = (self._window[0] + ntok, self._window[1])
        t0 = time.time()
        device_batch = mesh_mod.put_batch(batch, run.mesh)
        args = (run.state, run.params, run.ref_params, device_batch, ref_batch)
        if batch.shape_key not in self.shapes:
            self.shapes.add(batch.shape_key)
            planned = len(run.it.shapes) if run.it.shapes else None
            self.progress.compiling(f"the train step for batch shape {len(self.shapes)}"
                                    + (f" of {planned}" if planned else ""))
            compile_ahead(run.step_fn, *args)
            self._paused += self.progress.compiled()
        run.state, metrics = run.step_fn(*args)
        self._metrics.add(metrics)
        self._loss_sum = self._loss_sum + metrics["loss"]
        if self.compile_s is None:
            jax.block_until_ready(metrics["loss"])
            self.compile_s = time.time() - t0
        self._epoch = epoch
        return StepInfo(step + 1, epoch, run.total, metrics, run.state)

    def _reference_batch(self):
        run = self.run
        if run.ref_table is None:
            return None
        from jaxpref.training.reference import batch_reference, next_indices
        return jax.device_put(batch_reference(run.ref_table, next_indices(run.it), run.B),
                              mesh_mod.replicated(run.mesh))

    # --- hooks ------------------------------------------------------------------------------

    def _log(self, info: StepInfo) -> None:
        if self.last.get("step") == info.step:
            return  # step 1 logged already (it is also a multiple of logging_steps)
        # Step 1's row (logged always; TRL logs it only as a multiple of logging_steps) leaves the
        # window open, so that the rows at multiples of logging_steps average what TRL's do.
        extra = info.step == 1 and self.run.cfg.training.logging_steps > 1 and info.step != info.total
        m = MetricWindow() if extra else self._metrics
        if extra:
            m.add(info.metrics)
        m = m.row()
        if not extra:
            self._metrics.reset()
        if not math.isfinite(m["loss"]):
            raise JaxprefError(f"loss is {m['loss']} at step {info.step}; stopping (the last good "
                               f"checkpoint is kept in {self.run.store.dir})")
        tokens, t0 = self._window
        # XLA compilations so far: grows only when a new length bucket appears.
        m["compilations"] = int(self.run.step_fn._cache_size())
        m.update(step=info.step, epoch=float(info.epoch), num_tokens=self.run.num_tokens,
                 tokens_per_second=round(tokens / max(time.time() - t0 - self._paused, 1e-9), 1))
        self._window, self._paused = (0, time.time()), 0.0
        self.sinks.log(m)
        self.last = m
        self.progress.logged(info.step, m)

    def _evaluate(self, info: StepInfo) -> None:
        run = self.run
        ev = self.evaluate(info.step)
        if run.best is not None and run.best.update(ev, info.step)[0]:
            self.best_lora = jax.device_get(run.state.lora)  # load_best_model_at_end
        if run.early is None:
            return
        improved, stop = run.early.update(ev, info.step)
        if improved and run.best is None:
            self.best_lora = jax.device_get(run.state.lora)
        if stop:
            self.stopped_early = True
            es = run.early
            self.progress.note(f"[{run.entry.name}] early stopping at step {info.step}: `{es.es.metric}` has not "
                               f"improved for {es.es.patience} evaluations; best was step {es.best_step}", err=True)

    def evaluate(self, step: int) -> dict:
        run = self.run
        t0 = time.time()
        self.progress.evaluating(step)
        policy = (None, run.state.lora) if run.full_finetune else (run.state.lora, run.params)
        ev, batches, rows = evaluate_split(run.eval_fn, *policy, run.ref_params, run.prepared.eval, run.EB,
                                     run.prepared.layout, run.cfg.training.seed, run.iter_cls, run.mesh)
        # The rest of TRL's eval row: speed as transformers' `speed_metrics` rounds it, the train
        # tokens seen so far (DPOTrainer's eval `num_tokens`), the epoch, the step.
        seconds = max(time.time() - t0, 1e-9)
        ev.update(eval_runtime=round(seconds, 4), eval_samples_per_second=round(rows / seconds, 3),
                  eval_steps_per_second=round(batches / seconds, 3), eval_num_tokens=run.num_tokens,
                  epoch=float(self._epoch), step=step)
        self.last_eval = ev
        self.sinks.log(ev)
        self._paused += time.time() - t0
        self.progress.evaluated(step, ev, time.time() - t0)
        return ev

    def _sample(self, step: int, lora, model: str = "tuned") -> None:
        """`logging.sample_prompts`' completions; their seconds are left out of the tokens/s and
        (the first of each model, which compiles the decoder) of the ETA, as an evaluation's."""
        t0 = time.time()
        self.sampler.sample(step, lora, model)
        self._paused += time.time() - t0
        self.progress.sampled(time.time() - t0, first=model not in self._sampled)
        self._sampled.add(model)

    def save(self, step: int) -> None:
        run = self.run
        self.saved.add(step)
        meta = {"fingerprint": run.fingerprint, "iterator": run.it.state(), "num_tokens": run.num_tokens,
                "step": step, "early_stopping": run.early.state() if run.early else {},
                "best_model": run.best.state() if run.best else {}, "stopped_early": self.stopped_early,
                "metric_window": self._metrics.state()}
        run.store.save(step, run.state, meta, best=self.best_lora)

    def _interrupted(self) -> None:
        """Ctrl-C: save the state the last whole step left (a second Ctrl-C stops without one)."""
        run = self.run
        self.progress.close()
        if any(x.is_deleted() for x in jax.tree.leaves(run.state) if isinstance(x, jax.Array)):
            # Interrupted inside a step that had taken (donated) the state: nothing valid to save.
            run.store.close()
            self.progress.note(f"[{run.entry.name}] interrupted: no checkpoint written; --resume continues "
                               "from the last saved one", err=True)
            return
        done = int(jax.device_get(run.state.step))
        if done not in self.saved:  # not saved by this very step already
            self.save(done)
        run.store.close()
        self.progress.note(f"[{run.entry.name}] interrupted: saved a checkpoint at step {done}; continue with "
                           "--resume", err=True)

    # --- finish -----------------------------------------------------------------------------

    def finish(self, t_start: float) -> dict:
        """Final evaluation and checkpoint, the adapter (or merged model), summary.json."""
        run = self.run
        final_step = int(jax.device_get(run.state.step))
        if run.eval_fn is not None and not self.stopped_early and run.cfg.training.eval_strategy != "no":
            # The last step may have been evaluated by its hook already: not twice.
            done = self.last_eval if self.last_eval and self.last_eval["step"] == final_step else None
            self.final_eval = done or self.evaluate(final_step)
            if run.best is not None and run.best.update(self.final_eval, final_step)[0]:
                self.best_lora = None  # the final state is the best one
        self.progress.close()
        if run.cfg.save_steps and final_step not in self.saved:   # (an early stop may have saved it)
            self.save(final_step)
        run.store.close()
        best = (self.stopped_early or run.best is not None) and self.best_lora is not None
        export = self.best_lora if best else run.state.lora
        if self.sampler is not None:
            self._sample((run.best or run.early).best_step if best else final_step, export)
        summary = self._summary(t_start, final_step, best)
        self.sinks.log_final(summary, final_step)
        if run.is_main:
            card = model_card(run.cfg, run.index, summary, kind="merged" if run.full_finetune else "adapter")
            if run.full_finetune:
                from jaxpref.lora.merged import save_merged
                save_merged(run.run_dir / "model", run.bundle, export, None, None, run.tok,
                            dtype=run.cfg.training.param_dtype, card=card)
            else:
                save_adapter(run.run_dir / "adapter", run.bundle, export, run.lspec,
                             base_model_name(run.bundle.source), run.tok, card=card)
            (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _summary(self, t_start: float, final_step: int, best: bool) -> dict:
        run, prepared = self.run, self.run.prepared
        return {
            "model": run.entry.name,
            "steps": final_step,
            "wall_time_s": round(time.time() - t_start, 2),
            "compile_time_s": round(self.compile_s or 0.0, 2),
            "compiled_shapes": len(self.shapes),
            "compilations": int(run.step_fn._cache_size()),
            "train_pairs": len(prepared.train),
            "skipped_rows": prepared.train.skipped,
            "truncated_rows": prepared.report.truncated,
            "eval_skipped_rows": prepared.eval.skipped if (prepared.eval is not None and run.cfg.dataset.eval_split) else None,
            "resumed_from_step": run.start or None,
            "early_stopped": self.stopped_early,
            "adapter_from_step": (run.best or run.early).best_step if best else final_step,
            "peak_memory": peak_memory(),
            "memory_plan_mib": self._memory_plan() if self.shapes else None,
            "final_metrics": self.last,
            "final_eval": self.final_eval,
            **final_speed(run, final_step - run.start, time.time() - (self._t_train or time.time()), self._loss_sum),
        }

    def _memory_plan(self) -> dict:
        """The dry run's plan for the batch shapes this run compiled."""
        run = self.run
        shapes = sorted({k for s in self.shapes for k in shape_parts(s)})
        plan = memory_plan(run.cfg, run.bundle.args, count(run.params), count(run.state.lora), shapes,
                           mesh=run.mesh, runtime=run.rss_before_weights,
                           base_per_device=mesh_mod.per_device_elements(run.bundle.abstract_params(), run.mesh,
                                                                        run.bundle.arch.roles))
        return {key: round(v / 2**20, 1) for key, v in plan.items()}

    def _start_line(self) -> str:
        run = self.run
        what = f"LoRA r={run.lspec.r}" if run.lspec else "full fine-tune"
        rows = "pairs" if run.prepared.train.paired else "examples"
        return (f"[{run.entry.name}] {run.bundle.source.model_type}, {count(run.params) / 1e6:.1f}M params, "
                f"{count(run.state.lora) / 1e6:.3f}M trainable ({what}), {len(run.prepared.train)} {rows}"
                f"{setup.rows_note(run.cfg, run.prepared)}, {run.it.steps_per_epoch} steps/epoch, "
                f"{run.total} steps, layout {run.prepared.layout.kind}")

    def close(self) -> None:
        self.progress.close()
        self.sinks.close()
        try:  # already closed on success; after an error, let its pending writes finish first
            self.run.store.close()
        except Exception as e:
            print(f"jaxpref: warning: checkpoint store not closed cleanly ({type(e).__name__})", file=sys.stderr)


def _after(run: Run, summary: dict, last: dict) -> None:
    """A finished run: FINISHED, the plot, the closing line (with the final evaluation's numbers)."""
    ckpt.mark_finished(run.run_dir)
    from jaxpref.plot import plot_run
    try:
        plot_run(run.run_dir)
    except Exception as e:  # a plot must never fail a finished run
        print(f"jaxpref: warning: plot not written ({type(e).__name__}: {e})", file=sys.stderr)
    parts = metric_fields(last) + metric_fields(summary.get("final_eval") or {}, "eval_")
    print(f"[{run.entry.name}] done in {clock(summary['wall_time_s'])} ({summary['steps']} steps): "
          + ", ".join(parts) + f" -> {run.run_dir}", flush=True)

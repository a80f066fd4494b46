"""The run loop of an online method (GRPO, RLOO, online DPO): each generation samples `num_generations`
completions for a batch of prompts with the current adapter (the generation engine), scores them
with the reward functions, turns the rewards into advantages (the method's `score`) and takes
`num_iterations` optimizer steps on them (`online_step`).

Sizes, as TRL's GRPOTrainer counts them: a generation holds per_device_train_batch_size x
data-parallel devices x gradient_accumulation_steps completions (TRL's generation batch with
steps_per_generation = gradient_accumulation_steps), i.e. that divided by num_generations
prompts (`online_plan`); one optimizer step runs its gradient_accumulation_steps micro-batches. Prompts are
shuffled each epoch (seeded). Outputs in the run folder: config.yaml, metrics.jsonl (TRL's metric
names, plus `time/generate` and `time/update`), samples.jsonl (every completion with its
rewards and advantage), adapter/, summary.json and FINISHED. Online DPO (two completions per prompt,
ranked by the reward; per_device_train_batch_size counts prompts, as TRL's) is `online_pairs`.
Checkpoints (`finetuning.save_steps`) and `--resume` continue a run exactly (`online_resume`);
`--dry-run` is `online_dryrun`. PPO runs on these pieces in `ppo_loop` (its own rollout, update
and loop; checkpoints, --resume and --dry-run as here). Not yet: full fine-tuning.
"""
from __future__ import annotations

import json
import sys
import time
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.config import Config, dump_config
from jaxpref.errors import ConfigError
from jaxpref.objectives.methods import get_method
from jaxpref.objectives.methods.base import ScoringInputs
from jaxpref.objectives.methods.rollout import reward_entries
from jaxpref.training import online_pairs, rollouts, setup
from jaxpref.training.online_plan import PAIRS
from jaxpref.training.online_step import make_online_step, micro_batches
from jaxpref.training.window import MetricWindow

ONLINE_LOOP = ("grpo", "rloo", "online_dpo", "ppo")   # the online methods this loop trains (ppo: `ppo_loop`)
# Logged as their last value in the window, not the mean: TRL's running token count, and the
# Trainer's grad_norm and learning_rate (those of the logged step).
LATEST = ("num_tokens", "grad_norm", "learning_rate")


def check_online(cfg: Config) -> None:
    """One-line ConfigErrors for what the online loop does not do."""
    pt = cfg.post_training
    if pt.method not in ONLINE_LOOP:
        raise ConfigError(f"`post_training.method` {pt.method}: online training is available for "
                          f"{', '.join(ONLINE_LOOP)}; {pt.method}'s loss exists but its loop does not yet")
    if not cfg.lora.enabled:
        raise ConfigError(f"{cfg.source}: {pt.method} trains a LoRA adapter (`lora.enabled: false` is not available yet)")
    if pt.method in (PAIRS, "ppo") and cfg.lora.lora_dropout > 0:
        why = "TRL's OnlineDPOConfig disable_dropout" if pt.method == PAIRS else "TRL's PPOTrainer turns it off"
        raise ConfigError(f"{cfg.source}: `lora.lora_dropout` {cfg.lora.lora_dropout}: {pt.method} trains without "
                          f"dropout ({why}); set it to 0")


def train_online(cfg: Config, index: int, run_dir: Path, resume: bool = False, resume_from: int | None = None,
                 resume_force: bool = False, run_cls=None) -> dict:
    """Train `cfg.models[index]` with its online method into `run_dir` (continued from its newest
    checkpoint, or `resume_from`'s, when `resume`; `run_cls`: the run's class, default `OnlineRun`); returns the summary."""
    from jaxpref.training import checkpoint as ckpt
    from jaxpref.training import online_resume

    main = jax.process_index() == 0
    finished = resume and ckpt.is_finished(run_dir)
    if finished and resume_from is None and online_resume.same_length(cfg, run_dir):
        return ckpt.skip_finished(run_dir, cfg.models[index].name)
    t_start = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    if main and not resume:
        ckpt.clear_run(run_dir)  # only what `rundir.claim_run_dir` allowed (--overwrite-output-dir)
    loop = (run_cls or OnlineRun)(cfg, index, run_dir)
    loop.store = ckpt.CheckpointStore(run_dir, cfg.finetuning.save_total_limit)
    if resume:
        online_resume.restore(loop, resume_force, resume_from, finished)
    if main:  # after the resume checks: a refused resume keeps the run's record as it was
        dump_config(setup.model_config(cfg, index), run_dir / "config.yaml")
        if loop.start < loop.total:
            ckpt.unmark_finished(run_dir)
    loop.open_outputs()
    try:
        loop.train()
        summary = loop.finish(t_start)
    finally:
        loop.close()
    if main:
        ckpt.mark_finished(run_dir)
    return summary


class OnlineRun:
    """Model, prompts, reward functions, generator and compiled step of one online run."""

    SHOWN = ("loss", "reward", "reward_std", "kl")   # the metrics of the log line
    COUNTERS = ("num_tokens",)   # run counters a checkpoint keeps (`online_resume`)
    UNIT = "generation"          # what the run finishes before a Ctrl-C stops it

    def __init__(self, cfg: Config, index: int, run_dir: Path):
        from jaxpref.data.prompts import stop_token_ids
        from jaxpref.generation.engine import Generator
        from jaxpref.generation.text import eos_ids

        pt = cfg.post_training
        abstract = self._open(cfg, index, run_dir)
        self.pairs = pt.method == PAIRS
        lora = self._trainable(abstract)
        self._train_state(lora)
        self.eos = stop_token_ids(self.tok, list(eos_ids(self.bundle.source.path, self.tok)))
        self.opts = (online_pairs.decode_options if self.pairs else rollouts.decode_options)(pt, self.tok, self.eos)
        self.generator = Generator(self.bundle, self.params, mesh=self.mesh if self.dp > 1 else None,
                                   batch_size=self.per_gen * self.K)
        temperature = online_pairs.LOGP_TEMPERATURE if self.pairs else pt.temperature
        self.logps = rollouts.make_logps_fn(self.bundle.with_args(deterministic=True), temperature)
        dropout = self.lspec.dropout > 0
        self.step_fn = make_online_step(self.bundle, self.method, self.spec, self.optimizer, self.schedule,
                                        temperature, dropout=dropout, sum_grads=self.pairs)
        self.num_tokens = 0   # prompt + completion tokens sampled so far (TRL's num_input_tokens_seen)

    def _open(self, cfg: Config, index: int, run_dir: Path):
        """Settings, mesh, reward functions, model and prompts, the run's sizes (`online_plan`) and
        where it stands (restored by `online_resume`: optimizer steps and generations done).
        -> the abstract params."""
        from jaxpref.data.load import load_rows
        from jaxpref.data.prompts import prepare_prompts
        from jaxpref.data.rewards import load_reward_func
        from jaxpref.models.source import fingerprint
        from jaxpref.runtime import mesh as mesh_mod
        from jaxpref.training.online_plan import per_generation, plan, step_key
        from jaxpref.training.online_resume import fingerprint as run_fingerprint

        self.cfg, self.run_dir, self.entry = cfg, run_dir, cfg.models[index]
        pt, tcfg = cfg.post_training, cfg.training
        self.method, self.spec = get_method(pt.method), setup.loss_spec(cfg)
        self.mesh = mesh_mod.make_mesh(cfg.gpu, cfg.source)
        self.dp = mesh_mod.data_parallel_size(self.mesh)
        per_generation(cfg, self.dp)   # the batch-size rules first, before anything is loaded
        self.funcs = [load_reward_func(e, Path(cfg.source).parent) for e in reward_entries(pt)]
        self.weights = np.asarray(pt.reward_weights or [1.0] * len(self.funcs), np.float32)
        self.bundle, self.tok, self.lspec, abstract = setup.model_for(cfg, index, training=True)
        self.bundle = setup.on_mesh(self.bundle, self.mesh)
        self.data = prepare_prompts(load_rows(cfg.dataset), cfg.dataset, self.tok, tcfg.max_prompt_length,
                                    rule=self.method.tokenization)
        self.sizes = plan(cfg, self.dp, len(self.data))
        longest = max(len(p) for p in self.data.prompt_ids)   # `recompute_activations: auto` by the memory plan
        self.bundle = setup.resolve_recompute(cfg, self.bundle, abstract, self.lspec,
                                              [step_key(cfg, self.sizes, longest)], self.mesh)
        self.B, self.G, self.K, self.per_gen = self.sizes.B, self.sizes.G, self.sizes.K, self.sizes.per_gen
        self.steps_per_epoch, self.total = self.sizes.gens_per_epoch, self.sizes.total
        self.sinks, self.samples = None, None   # `open_outputs`
        self.last: dict = {}
        self.window = MetricWindow(latest=LATEST, skip_nan=True)   # the steps' metrics since the last log
        self.start, self.generation, self.store = 0, 0, None
        self.fingerprint = run_fingerprint(cfg, self.entry, fingerprint(self.bundle.source), self.dp)
        return abstract

    def _trainable(self, abstract):
        """The base weights (`self.params`, sharded over the mesh) and the adapter to train: a new
        LoRA, or `lora.init_from`'s. Continuing an adapter, GRPO's and RLOO's reference is its frozen
        initial copy (`self.ref_lora`; TRL's GRPOTrainer / RLOOTrainer add it as a "ref" adapter);
        online DPO's and PPO's stay the base, the adapter off (TRL disables the adapter)."""
        from jaxpref.lora.tree import init_lora
        from jaxpref.models import weights
        from jaxpref.runtime import mesh as mesh_mod

        shard = mesh_mod.shardings(mesh_mod.param_specs(abstract, self.mesh, self.bundle.arch.roles), self.mesh)
        self.params = self.bundle.runtime_params(weights.load_params(self.bundle, shardings=shard))
        self.ref_lora = None
        if self.cfg.lora.init_from:
            from jaxpref.lora.peft import load_adapter

            lora, _ = load_adapter(Path(self.cfg.lora.init_from), self.bundle, self.bundle.abstract_params())
            if self.method.name in ("grpo", "rloo"):
                self.ref_lora = jax.device_put(jax.tree_util.tree_map(jnp.copy, lora), mesh_mod.replicated(self.mesh))
            return lora
        rng = jax.random.PRNGKey(self.cfg.training.seed)
        return init_lora(self.bundle.abstract_params(), self.lspec, jax.random.fold_in(rng, 1), self.cfg.source)

    def _train_state(self, trainable, every: int = 1) -> None:
        """The optimizer (its schedule moving once every `every` updates) and the train state of
        `trainable`, replicated over the mesh (one compiled step)."""
        from jaxpref.runtime import mesh as mesh_mod
        from jaxpref.training.optim import make_optimizer
        from jaxpref.training.step import TrainState

        self.optimizer, self.schedule = make_optimizer(self.cfg.training, self.total, every=every)
        rng = jax.random.fold_in(jax.random.PRNGKey(self.cfg.training.seed), 2)
        state = TrainState(trainable, self.optimizer.init(trainable), jnp.zeros((), jnp.int32), rng)
        self.state = jax.device_put(state, mesh_mod.replicated(self.mesh))

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    def open_outputs(self) -> None:
        """metrics.jsonl and samples.jsonl: new, or continued after the resumed step (the rows
        logged after it are dropped; they are written again)."""
        from jaxpref.training import checkpoint as ckpt
        from jaxpref.training.online_resume import truncate_samples
        from jaxpref.training.sinks import MetricSinks

        if self.is_main and self.start:
            ckpt.truncate_metrics(self.run_dir / "metrics.jsonl", self.start)
            truncate_samples(self.run_dir / "samples.jsonl", self.start)
            self.last = ckpt.last_train_metrics(self.run_dir / "metrics.jsonl")
        self.sinks = MetricSinks(self.run_dir, self.cfg, self.entry.name, append=self.start > 0, enabled=self.is_main)
        self.samples = open(self.run_dir / "samples.jsonl", "a" if self.start else "w") if self.is_main else None

    # --- one generation ------------------------------------------------------------------------

    def _rollout(self, step: int, idx: list[int], epoch: float):
        from jaxpref.data.rewards import TrainerState

        if self.pairs:
            return online_pairs.rollout(self, step, idx, epoch)
        t0 = time.time()
        rows, comps, prompts = rollouts.sample(self.generator, self.data, idx, self.K, self.opts,
                                               self.state.lora, seed=self.cfg.training.seed * 1_000_003 + step)
        t_gen = time.time() - t0
        r = rollouts.assemble(self.tok, self.data, rows, prompts, comps, self.opts, self.funcs,
                              TrainerState(step, epoch, self.total), pad_ends=True)
        ids, valid = jnp.asarray(r.ids), jnp.asarray(r.valid)
        # No-gradient passes (TRL's): the rollout policy's log-probs when the method reads them
        # (RLOO always; GRPO when a rollout is reused), the reference's when the KL weight is not 0.
        need_old = self.method.name == "rloo" or self.cfg.post_training.num_iterations > 1
        old = self.logps(self.params, self.state.lora, ids, valid, r.P) if need_old else None
        ref = self.logps(self.params, self.ref_lora, ids, valid, r.P) if self.method.needs_reference(self.spec) else None
        x = ScoringInputs(per_func=jnp.asarray(r.per_func), weights=jnp.asarray(self.weights),
                          names=tuple(f.name for f in self.funcs), lengths=jnp.asarray(r.lengths),
                          truncated=jnp.asarray(r.truncated), contains_eos=jnp.asarray(~r.truncated),
                          mask=jnp.asarray(r.mask), old_logp=old, ref_logp=ref)
        scored, metrics = self.method.score(x, self.spec)
        arrays = dict(scored, ids=ids, valid=valid)
        if old is not None and self.method.name == "grpo":
            arrays["old_logp"] = old
        if ref is not None and self.method.name == "grpo":
            arrays["ref_logp"] = ref
        num_items = jnp.sum(scored["mask"]) / self.G
        self._write_samples(step, r, np.asarray(scored["advantages"]))
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics.update({k: float(np.mean(v)) for k, v in r.extra_metrics.items()})
        self.num_tokens += sum(map(len, prompts)) + int(np.sum(r.lengths))
        metrics["num_tokens"] = float(self.num_tokens)
        return micro_batches(arrays, self.G), num_items, r.P, metrics, t_gen

    def _write_samples(self, step: int, r, adv: np.ndarray) -> None:
        if self.samples is None:
            return
        names = [f.name for f in self.funcs]
        total = np.nansum(r.per_func * self.weights[None], axis=1)
        for i in range(len(r.rows)):
            rew = {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, r.per_func[i])}
            self.samples.write(json.dumps({"step": step, "prompt": r.prompts[i], "completion": r.completions[i],
                                           "completion_length": int(r.lengths[i]), "truncated": bool(r.truncated[i]), "reward": float(total[i]), "rewards": rew,
                                           "advantage": float(adv[i]), **r.extra(i)}) + "\n")
        self.samples.flush()

    # --- the loop ------------------------------------------------------------------------------

    def _prompt_batches(self, start: int = 0):
        """Prompt indices per generation from generation `start` on, epoch after epoch, shuffled
        with the seed (TRL's sampler)."""
        epoch, first = divmod(start, self.steps_per_epoch)
        while True:
            order = np.random.default_rng([self.cfg.training.seed, epoch]).permutation(len(self.data))
            for s in range(first, self.steps_per_epoch):
                yield epoch + s / self.steps_per_epoch, order[s * self.per_gen:(s + 1) * self.per_gen].tolist()
            epoch, first = epoch + 1, 0

    def train(self) -> None:
        """From the start (or the resumed step) to `total`; a first Ctrl-C stops after the
        generation under way, with a checkpoint."""
        from jaxpref.training.interrupt import StopRequest

        print(f"[{self.entry.name}] {self.cfg.post_training.method}: {len(self.data)} prompts{self._rows_note()}, "
              f"{self._intro()}", file=sys.stderr)
        with StopRequest(self.entry.name, unit=self.UNIT) as ctrl_c:
            self._loop(ctrl_c)

    def _intro(self) -> str:
        return f"{self.per_gen} prompts x {self.K} completions per generation, {self.total} steps"

    def _rows_note(self) -> str:
        """' (N rows skipped: reason n, ...; M prompts truncated to max_prompt_length L)', or ''."""
        d = self.data
        parts = setup.skipped_part(d.skipped)
        if d.truncated:
            parts.append(f"{d.truncated} prompts truncated to max_prompt_length {self.cfg.training.max_prompt_length}")
        return setup.note(parts)

    def _loop(self, ctrl_c) -> None:
        pt = self.cfg.post_training
        step, batches = self.start, self._prompt_batches(self.generation)
        while step < self.total:
            epoch, idx = next(batches)
            batch, num_items, P, rollout_metrics, t_gen = self._rollout(step, idx, epoch)
            self.generation, before = self.generation + 1, step
            for it in range(pt.num_iterations):
                if step >= self.total:
                    break
                t0 = time.time()
                self.state, m = self.step_fn(self.state, self.params, batch, num_items, P=P)
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                step += 1
                # A generation's own metrics (reward, completions/*, num_tokens, ...) go with the step
                # that sampled it only: TRL logs them once per generation, so a logged row averages
                # the generations of its window, and a step reusing a rollout logs none of them.
                row = dict(m, **(rollout_metrics if it == 0 else {}))
                self.window.add(dict(row, **{"time/generate": t_gen, "time/update": time.time() - t0}))
                t_gen = 0.0
                if self._log_due(step):   # the epochs done after this step (TRL's, HF's Trainer's `epoch`)
                    self._log(step, step / (self.steps_per_epoch * self.sizes.steps_per_gen))
            self._generation_done(before, step, ctrl_c.requested)

    def _log_due(self, step: int) -> bool:
        return step == 1 or step % self.cfg.training.logging_steps == 0 or step == self.total

    def _generation_done(self, before: int, step: int, stop: bool = False) -> None:
        """A generation took the run from step `before` to `step`: a checkpoint when one is due;
        `stop` (Ctrl-C): a checkpoint here in any case, then KeyboardInterrupt."""
        from jaxpref.training import online_resume

        if step >= self.total:
            return
        if online_resume.due(self.cfg.save_steps, before, step) or stop:
            online_resume.save(self, step)
        if stop:
            self.store.close()
            print(f"[{self.entry.name}] interrupted: saved a checkpoint at step {step}; continue with --resume",
                  file=sys.stderr)
            raise KeyboardInterrupt

    def _log(self, step: int, epoch: float) -> None:
        """The window's metrics averaged, NaN left out (TRL averages what it gathered since the
        last log). A metric NaN throughout (no completion scored, ...) is null for GRPO and RLOO,
        as their trainers log it, NaN for the others."""
        empty = None if self.cfg.post_training.method in ("grpo", "rloo") else float("nan")
        row = {"step": step, "epoch": float(epoch)}
        row.update({k: (empty if k not in LATEST and math.isnan(v) else v) for k, v in self.window.row().items()})
        if step != 1 or step % self.cfg.training.logging_steps == 0:
            # Step 1 off the logging_steps grid is a preview: its window goes on, so the first row
            # on the grid averages the same steps as TRL's (logging_first_step off).
            self.window.reset()
        self.last = row
        self.sinks.log(row)
        shown = " ".join(f"{k} {'-' if row[k] is None else format(row[k], '.4g')}" for k in self.SHOWN if k in row)
        print(f"[{self.entry.name}] step {step}/{self.total} {shown}", file=sys.stderr)

    def finish(self, t_start: float) -> dict:
        from jaxpref.training import online_resume

        if self.cfg.save_steps:   # the final checkpoint (inside a generation when num_iterations cuts it)
            online_resume.save(self, self.total, boundary=self.total % self.sizes.steps_per_gen == 0)
        self.store.close()
        summary = {"model": self.entry.name, "method": self.cfg.post_training.method, "steps": self.total,
                   "train_runtime": round(time.time() - t_start, 2), "resumed_from_step": self.start or None,
                   "skipped_rows": self.data.skipped, "truncated_rows": self.data.truncated,
                   "final_metrics": self.last}
        if self.is_main:
            self._save_trained(jax.device_get(self.state.lora))
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"[{self.entry.name}] done: {self.run_dir}", file=sys.stderr)
        return summary

    def _save_trained(self, lora) -> None:
        """The trained adapter into adapter/ (PEFT's layout)."""
        from jaxpref.lora.peft import save_adapter

        save_adapter(self.run_dir / "adapter", self.bundle, lora, self.lspec, self.entry.huggingface_id,
                     tokenizer=self.tok)

    def close(self) -> None:
        if self.sinks is not None:
            self.sinks.close()
        if self.samples is not None:
            self.samples.close()
        if self.store is not None:
            try:  # already closed on success; after an error, let its pending writes finish first
                self.store.close()
            except Exception as e:
                print(f"jaxpref: warning: checkpoint store not closed cleanly ({type(e).__name__})", file=sys.stderr)

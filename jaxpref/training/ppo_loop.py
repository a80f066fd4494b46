"""The run loop of PPO (TRL's PPOTrainer.train), on the online loop's pieces (`online_loop`).

Each step (TRL's "update") takes one rollout batch: per_device_train_batch_size x data-parallel
devices x gradient_accumulation_steps prompts (TRL's batch_size), one completion each, sampled
with the current adapter (at most `response_length` tokens, ending at the stop token: `stop_token:
eos` or `stop_token_id`; without one, every completion runs to `response_length` as in TRL). Then,
without gradient: the rollout's log-probs and values (adapter on), the reference log-probs (adapter
off), the scores (the weighted sum of the reward functions on the completion, minus
`missing_eos_penalty` for a completion without the tokenizer's EOS; a reward model scores the
policy's token ids as TRL's PPOTrainer does, `reward_model_scores`) -> per-token rewards with the
KL, GAE advantages and returns (`objectives.ppo`). Then `num_ppo_epochs` passes, each over a fresh
seeded shuffle of the batch cut into `num_mini_batches` mini-batches: one optimizer step per
mini-batch, over its micro-batches of per_device_train_batch_size x devices rows. The learning rate
moves once per rollout batch (TRL's scheduler), so `training.max_steps` counts rollout batches;
`num_epochs` (without max_steps) gives TRL's count: ceil(int(num_epochs x prompts) / rollout batch),
epoch after epoch, each pass dropping its last partial batch.

Where this differs from TRL's code: TRL's `accelerator.accumulate` steps the optimizer every
gradient_accumulation_steps micro-batches whatever the mini-batches are, and its stats tensors
keep zeros for micro-batches a mini-batch does not have; both agree with this loop at
`num_mini_batches: 1` (TRL's default). TRL masks every pad-id token out of attention (the EOS too
where the pad is the EOS); here the completion's tokens are attended as generated. TRL never clips
gradients in PPO: `training.max_grad_norm` defaults to 0 (no clipping) here, and applies when set.

Metrics per step, TRL's names: objective/kl, objective/entropy, objective/non_score_reward,
objective/rlhf_reward, objective/scores, policy/approxkl_avg, policy/clipfrac_avg,
loss/policy_avg, loss/value_avg, val/clipfrac_avg, policy/entropy_avg, val/ratio, val/ratio_var,
val/num_eos_tokens, lr, episode, eps; plus time/generate and time/update. samples.jsonl: each
completion with its rewards and score. Outputs: adapter/ (PEFT) and value_head.safetensors beside
it (`score.weight` [1, hidden], as a sequence-classification head stores it).

Checkpoints (`finetuning.save_steps`: every N rollout batches, and at the end), `--resume` and its
checks are the online loop's (`online_resume`): the train state holds the adapter, the value head
and the optimizer state of both, the record the rollout batches done (the data position; the
sampling seed and the mini-batch shuffles follow from the seed and the step) and `episode`.
`--dry-run` prints PPO's plan (`online_dryrun`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.config import Config
from jaxpref.errors import ConfigError
from jaxpref.objectives import ppo as ppo_math
from jaxpref.objectives.methods.base import ScoringInputs
from jaxpref.training import rollouts
from jaxpref.training.online_loop import OnlineRun
from jaxpref.training.reward_model import RewardModel
from jaxpref.training.ppo_step import (LOSS_KEYS, VALUE_HEAD_FILE, init_value_head, make_ppo_step,
                                       make_rollout_pass, mini_batch)


def stop_token(cfg: Config, tok) -> int | None:
    """The id a completion ends at (TRL: `stop_token: eos` or `stop_token_id`), or None."""
    pt = cfg.post_training
    if pt.stop_token == "eos":
        if tok.eos_token_id is None:
            raise ConfigError(f"{cfg.source}: `post_training.stop_token: eos`, but the tokenizer has no EOS token")
        return tok.eos_token_id
    if pt.stop_token_id is not None and not 0 <= pt.stop_token_id < len(tok):
        raise ConfigError(f"{cfg.source}: `post_training.stop_token_id` {pt.stop_token_id} is not a token id of the "
                          f"tokenizer (0 .. {len(tok) - 1}): no completion could end at it")
    return pt.stop_token_id


def reward_model_scores(funcs: list, models: list[int], per_func: np.ndarray, prompts: list[list[int]],
                        post: np.ndarray, pad: int) -> np.ndarray:
    """The reward functions' scores [N, F - len(models)] with the reward models' (`funcs[j]` for
    j in `models`) put in their columns -> [N, F]. A reward model scores as TRL's PPOTrainer
    (`get_reward`): the policy's own token ids, the prompt and the response up to its first pad
    (after the stop token's truncation), pad ids out of attention, read at the last token."""
    ends = np.asarray(ppo_math.sequence_lengths(jnp.asarray(post), pad)) + 1
    seqs = [list(p) + post[i, :ends[i]].tolist() for i, p in enumerate(prompts)]
    out = np.full((len(prompts), len(funcs)), np.nan, np.float32)
    out[:, [j for j in range(len(funcs)) if j not in models]] = per_func
    for j in models:
        out[:, j] = funcs[j].fn.score_ids(seqs, mask_id=pad)
    return out


def check_reward_models(cfg: Config, funcs: list, tok) -> None:
    """TRL's PPOTrainer gives its reward model the policy's token ids: a reward model whose
    tokenizer is not the policy's is a one-line ConfigError."""
    vocab = tok.get_vocab()
    for f in funcs:
        if isinstance(f.fn, RewardModel) and f.fn.tok.get_vocab() != vocab:
            raise ConfigError(f"{cfg.source}: reward model `{f.entry}`: ppo scores the policy's token ids with it, "
                              "as TRL's PPOTrainer does, so its tokenizer must be the policy's (their vocabularies "
                              "differ)")


class PpoRun(OnlineRun):
    """Model with its value head, prompts, reward functions, generator and compiled step of a
    PPO run (`online_loop.train_online(..., run_cls=PpoRun)`)."""

    SHOWN = ("objective/scores", "objective/rlhf_reward", "objective/kl", "loss/policy_avg", "loss/value_avg")
    COUNTERS = ("episode",)   # completions sampled so far (TRL's state.episode)
    UNIT = "rollout batch"

    def __init__(self, cfg: Config, index: int, run_dir: Path):
        from jaxpref.generation.engine import DecodeOptions, Generator
        from jaxpref.generation.sampling import Sampling

        pt = cfg.post_training
        abstract = self._open(cfg, index, run_dir)
        self.stop = stop_token(cfg, self.tok)
        check_reward_models(cfg, self.funcs, self.tok)
        lora = self._trainable(abstract)
        # The value head trains with the adapter: one optimizer state covers both.
        self._train_state({"lora": lora, "value_head": init_value_head(self.bundle.args.hidden_size)},
                          every=pt.num_ppo_epochs * pt.num_mini_batches)
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.opts = DecodeOptions(max_new_tokens=pt.response_length,
                                  sampling=Sampling(temperature=pt.temperature, top_p=pt.top_p, top_k=pt.top_k),
                                  eos_ids=() if self.stop is None else (self.stop,), pad_id=self.pad)
        self.generator = Generator(self.bundle, self.params, mesh=self.mesh if self.dp > 1 else None,
                                   batch_size=self.per_gen)
        bundle = self.bundle.with_args(deterministic=True)   # TRL turns dropout off in PPO
        self.rollout_pass = make_rollout_pass(bundle, pt.temperature)
        self.step_fn = make_ppo_step(bundle, self.method, self.spec, self.optimizer, pt.temperature)
        self.episode = 0

    # --- one rollout batch -----------------------------------------------------------------------

    def _rollout(self, step: int, idx: list[int], epoch: float):
        from jaxpref.data.rewards import TrainerState

        t0 = time.time()
        rows, comps, prompts = rollouts.sample(self.generator, self.data, idx, 1, self.opts, self.state.lora["lora"],
                                               seed=self.cfg.training.seed * 1_000_003 + step)
        t_gen = time.time() - t0
        models = [j for j, f in enumerate(self.funcs) if isinstance(f.fn, RewardModel)]
        r = rollouts.assemble(self.tok, self.data, rows, prompts, comps, self.opts,
                              [f for j, f in enumerate(self.funcs) if j not in models],
                              TrainerState(step, epoch, self.total))
        ids, valid = jnp.asarray(r.ids), jnp.asarray(r.valid)
        responses = ids[:, r.P:]
        post = responses if self.stop is None else ppo_math.truncate_after_stop(responses, self.stop, self.pad)
        if models:
            r.per_func = reward_model_scores(self.funcs, models, r.per_func, prompts, np.asarray(post), self.pad)
        eos = -1 if self.tok.eos_token_id is None else self.tok.eos_token_id
        old, ref, values = self.rollout_pass(self.params, self.state.lora, ids, valid, r.P)
        x = ScoringInputs(per_func=jnp.asarray(r.per_func), weights=jnp.asarray(self.weights),
                          names=tuple(f.name for f in self.funcs), lengths=jnp.asarray(r.lengths),
                          truncated=jnp.asarray(r.truncated), contains_eos=jnp.any(post == eos, axis=1),
                          mask=jnp.asarray(r.mask), old_logp=old, ref_logp=ref, values=values,
                          seq_lengths=ppo_math.sequence_lengths(post, self.pad))
        scored, metrics = self.method.score(x, self.spec)
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["val/num_eos_tokens"] = float(jnp.sum(responses == eos))   # TRL: EOS ids in the raw responses
        metrics.update({k: float(np.mean(v)) for k, v in r.extra_metrics.items()})
        self._write_samples(step, r, scored)
        arrays = dict({k: scored[k] for k in LOSS_KEYS}, ids=ids, valid=valid)
        return arrays, r.P, metrics, t_gen

    def _write_samples(self, step: int, r, scored: dict) -> None:
        if self.samples is None:
            return
        names = [f.name for f in self.funcs]
        total = np.nansum(r.per_func * self.weights[None], axis=1)
        scores, kl = np.asarray(scored["scores"]), np.asarray(jnp.sum(scored["kl"], axis=1))
        for i in range(len(r.rows)):
            rew = {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, r.per_func[i])}
            self.samples.write(json.dumps({"step": step, "prompt": r.prompts[i], "completion": r.completions[i],
                                           "completion_length": int(r.lengths[i]), "truncated": bool(r.truncated[i]),
                                           "reward": float(total[i]), "rewards": rew, "score": float(scores[i]),
                                           "kl": float(kl[i]), **r.extra(i)}) + "\n")
        self.samples.flush()

    def _update(self, step: int, arrays: dict, P: int) -> dict:
        """num_ppo_epochs x num_mini_batches optimizer steps on one rollout batch -> TRL's
        policy/, loss/ and val/ averages over its micro-batches, and val/ratio_var."""
        pt = self.cfg.post_training
        n = self.per_gen
        size = n // pt.num_mini_batches
        stats: list[dict] = []
        for e in range(pt.num_ppo_epochs):
            order = np.random.default_rng([self.cfg.training.seed, step, e]).permutation(n)
            for k in range(pt.num_mini_batches):
                batch = mini_batch(arrays, order[k * size:(k + 1) * size], self.B)
                self.state, m = self.step_fn(self.state, self.params, batch, P=P)
                stats.append(jax.device_get(m))
        per_micro = {k: np.concatenate([s[k] for s in stats]) for k in stats[0] if k not in ("loss", "grad_norm")}
        out = {k: float(np.mean(v)) for k, v in per_micro.items()}
        ratios = per_micro["val/ratio"]
        out["val/ratio_var"] = float(np.var(ratios, ddof=1)) if len(ratios) > 1 else float("nan")
        return out

    # --- the loop --------------------------------------------------------------------------------

    def _intro(self) -> str:
        pt = self.cfg.post_training
        return (f"{self.per_gen} completions per rollout batch, {pt.num_ppo_epochs} x {pt.num_mini_batches} "
                f"optimizer steps each, {self.total} rollout batches")

    def _loop(self, ctrl_c) -> None:
        """One step per rollout batch; a checkpoint after each one that is due (every step is a
        boundary). `eps`: the completions sampled per second since this process started (TRL's
        episodes / time, which a resumed run would inflate with the episodes before it)."""
        step, batches = self.start, self._prompt_batches(self.generation)
        t_start, first_episode = time.time(), self.episode
        while step < self.total:
            epoch, idx = next(batches)
            arrays, P, metrics, t_gen = self._rollout(step, idx, epoch)
            t0 = time.time()
            metrics.update(self._update(step, arrays, P))
            t_update = time.time() - t0
            step, self.generation = step + 1, self.generation + 1
            self.episode += self.per_gen
            metrics.update({"lr": float(self.schedule(step - 1)), "episode": self.episode,
                            "eps": int((self.episode - first_episode) / (time.time() - t_start)),
                            "time/generate": t_gen, "time/update": t_update})
            self.window.add(metrics)
            if self._log_due(step):
                self._log(step, self.episode / len(self.data))   # TRL's epoch: episodes / prompts
            self._generation_done(step - 1, step, ctrl_c.requested)

    def _save_trained(self, trainable) -> None:
        """The adapter, and the value head beside it as a sequence-classification head stores it."""
        from safetensors.numpy import save_file

        super()._save_trained(trainable["lora"])
        head = np.asarray(trainable["value_head"], np.float32)[None, :]
        save_file({"score.weight": head}, str(self.run_dir / VALUE_HEAD_FILE), metadata={"format": "pt"})

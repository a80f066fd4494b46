"""Online DPO's rollout in the online loop (TRL's experimental `OnlineDPOTrainer.training_step`):
two completions per prompt sampled with the current adapter (`max_new_tokens`, `temperature`,
`top_p`, `top_k`), scored by the reward functions (minus `missing_eos_penalty` without an EOS),
the better-rewarded one of each pair chosen (the first sample on ties), the reference log-probs
taken with the adapter off. Log-probs are those of the plain logits (TRL's `_forward` does not
divide by the temperature).

Sizes: TRL samples per micro-batch of per_device_train_batch_size prompts, with the weights of the
optimizer step; here a generation holds one optimizer step's prompts, B = per_device_train_batch_size
x devices per micro-batch times gradient_accumulation_steps, and twice as many completions.
Micro-batch g's rows are in TRL's orders: its B prompts' first samples, then their second ones,
for the reward functions and the pairing; its B chosen completions, then their rejected ones, for
the loss (`jaxpref.objectives.methods.online_dpo`). The run (`online_loop.OnlineRun`) is passed
in; this module does not import the loop.
"""
from __future__ import annotations

import dataclasses
import json
import time

import jax.numpy as jnp
import numpy as np

from jaxpref.objectives.methods.base import ScoringInputs
from jaxpref.training import rollouts
from jaxpref.training.online_step import micro_batches

SAMPLES = 2          # completions per prompt
LOGP_TEMPERATURE = 1.0


def decode_options(pt, tok, eos_ids: list[int]):
    """The sampling keys with online DPO's completion limit, `max_new_tokens`."""
    return dataclasses.replace(rollouts.decode_options(pt, tok, eos_ids), max_new_tokens=pt.max_new_tokens)


def trl_order(n_prompts: int, B: int) -> np.ndarray:
    """Sampled rows (prompt p's samples at 2p, 2p + 1) -> TRL's rows: per micro-batch of B prompts,
    the first samples, then the second ones."""
    out = []
    for g in range(n_prompts // B):
        ps = np.arange(g * B, (g + 1) * B)
        out += [SAMPLES * ps, SAMPLES * ps + 1]
    return np.concatenate(out)


def contains_eos(comps: list[list[int]], eos_ids) -> np.ndarray:
    """[N] bool: an end-of-sequence id among the completion's tokens (TRL's `contain_eos_token`)."""
    stop = set(eos_ids)
    return np.array([any(t in stop for t in c) for c in comps], bool)


def rollout(run, step: int, idx: list[int], epoch: float):
    """One generation of `run` (an `OnlineRun` training online_dpo) for the prompts `idx` ->
    (micro-batches, num_items, P, rollout metrics, generation seconds), as `OnlineRun._rollout`."""
    from jaxpref.data.rewards import TrainerState

    t0 = time.time()
    rows, comps, prompts = rollouts.sample(run.generator, run.data, idx, SAMPLES, run.opts, run.state.lora,
                                           seed=run.cfg.training.seed * 1_000_003 + step)
    t_gen = time.time() - t0
    perm = trl_order(len(idx), run.B)
    rows, comps, prompts = ([x[i] for i in perm] for x in (rows, comps, prompts))
    r = rollouts.assemble(run.tok, run.data, rows, prompts, comps, run.opts, run.funcs,
                          TrainerState(step, epoch, run.total))
    ids, valid = jnp.asarray(r.ids), jnp.asarray(r.valid)
    ref = run.logps(run.params, None, ids, valid, r.P)
    eos = contains_eos(comps, run.opts.eos_ids)
    order, scores = _pair(run, r, eos)
    arrays = {"ids": ids[order], "valid": valid[order], "mask": jnp.asarray(r.mask)[order],
              "ref_logp": ref[order], "scores": scores, "contains_eos": jnp.asarray(eos[order])}
    _write_samples(run, step, r, eos, order)
    num_items = jnp.sum(arrays["mask"]) / run.G
    metrics = {k: float(np.mean(v)) for k, v in r.extra_metrics.items()}
    return micro_batches(arrays, run.G), num_items, r.P, metrics, t_gen


def _pair(run, r, eos: np.ndarray) -> tuple[np.ndarray, jnp.ndarray]:
    """Each micro-batch's pairs through the method's `score` -> (rows chosen then rejected, per
    micro-batch, into the generation [N]; their scores [N])."""
    n = 2 * run.B
    order, scores = [], []
    for g in range(run.G):
        s = slice(g * n, (g + 1) * n)
        x = ScoringInputs(per_func=jnp.asarray(r.per_func[s]), weights=jnp.asarray(run.weights),
                          names=tuple(f.name for f in run.funcs), lengths=jnp.asarray(r.lengths[s]),
                          truncated=jnp.asarray(r.truncated[s]), contains_eos=jnp.asarray(eos[s]),
                          mask=jnp.asarray(r.mask[s]))
        scored, _ = run.method.score(x, run.spec)
        order.append(g * n + np.asarray(scored["order"]))
        scores.append(scored["scores"])
    return np.concatenate(order), jnp.concatenate(scores)


def _write_samples(run, step: int, r, eos: np.ndarray, order: np.ndarray) -> None:
    """samples.jsonl: every completion with its rewards, its score (the weighted sum the pairing
    ranks, after `missing_eos_penalty`) and whether it was chosen."""
    if run.samples is None:
        return
    names = [f.name for f in run.funcs]
    penalty = run.spec.option("missing_eos_penalty")
    total = np.nansum(r.per_func * run.weights[None], axis=1) - np.where(eos, 0.0, penalty or 0.0)
    chosen = np.zeros(len(r.rows), bool)
    n = 2 * run.B
    for g in range(run.G):
        chosen[order[g * n:g * n + run.B]] = True
    for i in range(len(r.rows)):
        rew = {k: (None if np.isnan(v) else float(v)) for k, v in zip(names, r.per_func[i])}
        run.samples.write(json.dumps({
            "step": step, "prompt": r.prompts[i], "completion": r.completions[i],
            "completion_length": int(r.lengths[i]), "truncated": bool(r.truncated[i]),
            "contains_eos": bool(eos[i]), "reward": float(total[i]), "rewards": rew,
            "chosen": bool(chosen[i]), **r.extra(i)}) + "\n")
    run.samples.flush()

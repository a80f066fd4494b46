"""Online objectives on rollouts: rewards -> advantages, and the losses of GRPO (grpo, bnpo,
dr_grpo, dapo), RLOO and online DPO. Pure functions of arrays; no model, no generation.

Formulas and metric names follow TRL 1.16: `trl/trainer/grpo_trainer.py`
(`GRPOTrainer._generate_and_score_completions`, `_compute_loss`), `trl/trainer/rloo_trainer.py`
(`RLOOTrainer._generate_and_score_completions`, `_compute_loss`) and
`trl/experimental/online_dpo/online_dpo_trainer.py` (`OnlineDPOTrainer.training_step`); tests
pin them to that code (tests/test_online_trl.py). PPO is `jaxpref.objectives.ppo`.

Shapes. A rollout batch holds N = prompts x G completions, prompt p's G generations in rows
p*G .. p*G+G-1 (TRL's RepeatSampler order). Rewards are [N, F] float32 for F reward functions,
NaN where a function returned None. A micro-batch of the loss holds B completions; per-token
arrays are [B, C] float32 over C right-padded completion slots, `mask` [B, C] 1.0 on the tokens
that count (EOS included; a truncated completion all 0 under `mask_truncated_completions`). Token
log-probs and entropies are those of logits / temperature (GRPO, RLOO), as TRL computes them.
Metrics come back as [1] arrays, one value per micro-batch: TRL logs the mean of its per-micro-batch
values, and so does the step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.nn import log_sigmoid

STD_EPS = 1e-4        # GRPO / RLOO: advantages / (std + 1e-4)
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def nanstd(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """TRL's `nanstd`: Bessel-corrected standard deviation ignoring NaN; NaN below two values."""
    mean = jnp.nanmean(x, axis=axis, keepdims=True)
    var = jnp.nanmean((x - mean) ** 2, axis=axis, keepdims=keepdims)
    n = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=keepdims).astype(jnp.float32)
    return jnp.sqrt(var * jnp.where(n > 1, n / jnp.maximum(n - 1, 1.0), jnp.nan))


def _metric(x) -> jax.Array:
    return jnp.reshape(jnp.asarray(x, jnp.float32), (1,))


# ---------------------------------------------------------------------------------------------
# Rollout scoring: rewards -> advantages (once per rollout batch, before the loss)


def combine_rewards(per_func: jax.Array, weights: jax.Array, unscorable_nan: bool = True) -> jax.Array:
    """[N, F] rewards (NaN = None) and [F] weights -> [N] weighted sums ignoring None. A completion
    every function left unscored is NaN (GRPO, RLOO), or 0 with `unscorable_nan=False` (online DPO)."""
    per_func = jnp.asarray(per_func, jnp.float32)
    total = jnp.nansum(per_func * jnp.asarray(weights, jnp.float32)[None, :], axis=1)
    if unscorable_nan:
        total = jnp.where(jnp.all(jnp.isnan(per_func), axis=1), jnp.nan, total)
    return total


def grpo_advantages(rewards: jax.Array, num_generations: int, scale_rewards: str) -> tuple[jax.Array, jax.Array]:
    """GRPO's group-relative advantages (TRL's `sum_then_normalize`).

    rewards [N] (NaN: unscorable) -> (advantages [N], std [N]): reward minus its group's mean,
    divided by (std + 1e-4) where std is the group's (`group`) or the whole batch's (`batch`);
    `none` does not divide. NaN advantages (unscorable) become 0. `std` feeds
    `frac_reward_zero_std` (TRL computes it from the group std under `none` too)."""
    g = num_generations
    grouped = rewards.reshape(-1, g)
    mean = jnp.repeat(jnp.nanmean(grouped, axis=1), g)
    if scale_rewards in ("group", "none"):
        std = jnp.repeat(nanstd(grouped, axis=1), g) if g > 1 else jnp.zeros_like(rewards)
    elif scale_rewards == "batch":
        std = jnp.broadcast_to(nanstd(rewards), rewards.shape) if rewards.size > 1 else jnp.zeros_like(rewards)
    else:
        raise ValueError(f"scale_rewards {scale_rewards!r}; one of {SCALE_REWARDS}")
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + STD_EPS)
    return jnp.nan_to_num(adv, nan=0.0), std


def rloo_rewards(rewards: jax.Array, beta: float, old_logp: jax.Array | None = None,
                 ref_logp: jax.Array | None = None, mask: jax.Array | None = None,
                 clip_range: tuple[float, float] | None = None) -> tuple[jax.Array, dict]:
    """RLOO's rewards before the baseline: clipped to `reward_clip_range`, then minus beta times
    the sequence KL sum(old_logp - ref_logp) over the mask (first-order estimate, the rollout
    policy's log-probs). -> (rewards [N], {"kl": token mean of the per-token KL} when beta != 0)."""
    if clip_range is not None:
        rewards = jnp.clip(rewards, clip_range[0], clip_range[1])
    if beta == 0.0:
        return rewards, {}
    per_token = (old_logp - ref_logp) * mask
    rewards = rewards - beta * jnp.sum(per_token, axis=-1)
    return rewards, {"kl": _metric(jnp.sum(per_token) / jnp.maximum(jnp.sum(mask), 1.0))}


def rloo_advantages(rewards: jax.Array, num_generations: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Leave-one-out advantages: reward minus the mean of its group's other scorable rewards;
    optionally normalised over the batch. rewards [N] (KL-penalised, NaN: unscorable) ->
    (advantages [N], group std [N / G]). NaN advantages become 0."""
    g = num_generations
    grouped = rewards.reshape(-1, g)
    std = nanstd(grouped, axis=1) if g > 1 else jnp.zeros((grouped.shape[0],), jnp.float32)
    if g > 1:
        scorable = jnp.sum(~jnp.isnan(grouped), axis=1, keepdims=True).astype(jnp.float32)
        baseline = (jnp.nansum(grouped, axis=1, keepdims=True) - grouped) / (scorable - 1)
        adv = rewards - baseline.reshape(-1)
    else:
        adv = jnp.zeros_like(rewards)
    if normalize:
        adv = (adv - jnp.nanmean(adv)) / (nanstd(adv) + STD_EPS)
    return jnp.nan_to_num(adv, nan=0.0), std


def reward_metrics(per_func: jax.Array, weights: jax.Array, names: list[str], std: jax.Array) -> dict:
    """`reward`, `reward_std` (of the weighted sums, unscorable left out), `frac_reward_zero_std`
    (groups, or completions, whose std is 0) and `rewards/<name>/mean|std` per function."""
    per_func = jnp.asarray(per_func, jnp.float32)
    out = {}
    for i, name in enumerate(names):
        out[f"rewards/{name}/mean"] = _metric(jnp.nanmean(per_func[:, i]))
        out[f"rewards/{name}/std"] = _metric(nanstd(per_func[:, i]))
    total = combine_rewards(per_func, weights)
    out["reward"] = _metric(jnp.nanmean(total))
    out["reward_std"] = _metric(nanstd(total))
    out["frac_reward_zero_std"] = _metric(jnp.mean(jnp.isclose(std, 0.0)))
    return out


def completion_metrics(lengths: jax.Array, truncated: jax.Array) -> dict:
    """`completions/*` of a rollout batch: lengths [N] (generated tokens, EOS included) and
    truncated [N] bool (the last token is neither EOS nor pad: cut at max_completion_length)."""
    lengths = jnp.asarray(lengths, jnp.float32)
    truncated = jnp.asarray(truncated, bool)
    done = ~truncated
    # TRL: the terminated-length stats are 0 when every completion was truncated.
    some = lambda v: jnp.where(jnp.any(done), v, 0.0)
    return {
        "completions/mean_length": _metric(jnp.mean(lengths)),
        "completions/min_length": _metric(jnp.min(lengths)),
        "completions/max_length": _metric(jnp.max(lengths)),
        "completions/clipped_ratio": _metric(jnp.mean(truncated)),
        "completions/mean_terminated_length": _metric(some(
            jnp.sum(jnp.where(done, lengths, 0.0)) / jnp.maximum(jnp.sum(done), 1))),
        "completions/min_terminated_length": _metric(some(jnp.min(jnp.where(done, lengths, jnp.inf)))),
        "completions/max_terminated_length": _metric(some(jnp.max(jnp.where(done, lengths, -jnp.inf)))),
    }


def loss_mask(completion_mask: jax.Array, truncated: jax.Array, mask_truncated_completions: bool) -> jax.Array:
    """[B, C] completion mask, truncated completions [B] zeroed when `mask_truncated_completions`."""
    if not mask_truncated_completions:
        return completion_mask
    return completion_mask * (~jnp.asarray(truncated, bool))[:, None].astype(completion_mask.dtype)


# ---------------------------------------------------------------------------------------------
# GRPO: per-token clipped surrogate + k3 KL, four aggregations


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token KL(policy || reference) estimate exp(r) - r - 1, r = ref_logp - logp (>= 0)."""
    r = ref_logp - logp
    return jnp.exp(r) - r - 1


def grpo_token_loss(logp, advantages, old_logp, ref_logp, beta: float, eps_low: float, eps_high: float,
                    bias_correction_kl: bool = True) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """-> (per-token loss [B, C], ratio [B, C], per-token KL [B, C] or None).

    ratio = exp(logp - old_logp), with old_logp the rollout policy's log-probs, or the current
    ones without gradient (None: TRL's num_iterations == 1, ratio 1 and the gradient of A * logp);
    loss = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3 KL, the KL
    times the ratio with `bias_correction_kl` (TRL 1.16's default `use_bias_correction_kl`: the
    unbiased reverse-KL gradient; it changes the gradient even where the ratio is 1)."""
    old = jax.lax.stop_gradient(logp) if old_logp is None else old_logp
    ratio = jnp.exp(logp - old)
    a = advantages[:, None]
    loss = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - eps_low, 1 + eps_high) * a)
    kl = None
    if beta != 0.0:
        kl = k3_kl(logp, ref_logp)
        if bias_correction_kl:
            kl = kl * ratio
        loss = loss + beta * kl
    return loss, ratio, kl


def aggregate(loss_type: str, per_token: jax.Array, mask: jax.Array, max_completion_length: int,
              num_items: jax.Array | float | None = None) -> jax.Array:
    """Per-token loss [B, C] -> the micro-batch loss (the step averages micro-batches).

    grpo: each sequence's token mean, then the mean over sequences; bnpo: token mean over the
    micro-batch; dr_grpo: token sum / (B * max_completion_length); dapo: token sum / `num_items`,
    the active tokens of the whole optimizer step divided by its number of micro-batches (TRL:
    num_items_in_batch / num_processes * gradient_accumulation_steps / steps_per_generation), so
    that the step's loss is the token mean over the global batch."""
    s = per_token * mask
    if loss_type == "grpo":
        return jnp.mean(jnp.sum(s, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0))
    if loss_type == "bnpo":
        return jnp.sum(s) / jnp.maximum(jnp.sum(mask), 1.0)
    if loss_type == "dr_grpo":
        return jnp.sum(s) / (per_token.shape[0] * max_completion_length)
    if loss_type == "dapo":
        n = jnp.sum(mask) if num_items is None else num_items
        return jnp.sum(s) / jnp.maximum(n, 1.0)
    raise ValueError(f"loss_type {loss_type!r}; one of {LOSS_TYPES}")


def _masked_mean(x, mask) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _seq_mean(x, mask) -> jax.Array:
    """Per-sequence masked mean [B]; NaN for a sequence without tokens (nanmin/nanmax skip it)."""
    n = jnp.sum(mask, axis=-1)
    return jnp.where(n > 0, jnp.sum(x * mask, axis=-1) / jnp.maximum(n, 1.0), jnp.nan)


def clip_metrics(ratio, advantages, mask, eps_low: float, eps_high: float) -> dict:
    """TRL's `clip_ratio/*`: tokens whose ratio left the clip range on the side that stops their
    gradient. *_mean: token means; low_min / high_max: extremes of the per-sequence means."""
    a = advantages[:, None]
    low = ((ratio < 1 - eps_low) & (a < 0)).astype(jnp.float32)
    high = ((ratio > 1 + eps_high) & (a > 0)).astype(jnp.float32)
    region = jnp.maximum(low, high)
    return {
        "clip_ratio/low_mean": _metric(_masked_mean(low, mask)),
        "clip_ratio/low_min": _metric(jnp.nanmin(_seq_mean(low, mask))),
        "clip_ratio/high_mean": _metric(_masked_mean(high, mask)),
        "clip_ratio/high_max": _metric(jnp.nanmax(_seq_mean(high, mask))),
        "clip_ratio/region_mean": _metric(_masked_mean(region, mask)),
    }


def grpo_loss(logp, mask, advantages, entropy, *, loss_type: str, beta: float, epsilon: float,
              epsilon_high: float | None, max_completion_length: int, num_items=None,
              old_logp=None, ref_logp=None, bias_correction_kl: bool = True) -> tuple[jax.Array, dict]:
    """GRPO on one micro-batch. logp, entropy, mask, old_logp, ref_logp: [B, C]; advantages [B].
    -> (loss, metrics: kl (beta != 0), entropy, clip_ratio/*)."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    per_token, ratio, kl = grpo_token_loss(logp, advantages, old_logp, ref_logp, beta, epsilon, eps_high,
                                           bias_correction_kl)
    loss = aggregate(loss_type, per_token, mask, max_completion_length, num_items)
    sg = jax.lax.stop_gradient
    m = {"entropy": _metric(_masked_mean(sg(entropy), mask))}
    if kl is not None:
        m["kl"] = _metric(_masked_mean(sg(kl), mask))
    m.update(clip_metrics(sg(ratio), advantages, mask, epsilon, eps_high))
    return loss, m


# ---------------------------------------------------------------------------------------------
# RLOO: clipped surrogate on sequence log-probs (TRL 1.16's RLOOTrainer)


def rloo_loss(logp, mask, advantages, entropy, *, epsilon: float, epsilon_high: float | None,
              old_logps=None) -> tuple[jax.Array, dict]:
    """RLOO on one micro-batch: ratio = exp(sum logp - old sum logp) per sequence, loss the mean of
    -min(ratio * A, clip(ratio) * A). old_logps [B]: the rollout policy's summed log-probs (None:
    the current ones without gradient). The KL is in the rewards (`rloo_rewards`), not here."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    logps = jnp.sum(logp * mask, axis=-1)
    old = jax.lax.stop_gradient(logps) if old_logps is None else old_logps
    ratio = jnp.exp(logps - old)
    per_seq = -jnp.minimum(ratio * advantages, jnp.clip(ratio, 1 - epsilon, 1 + eps_high) * advantages)
    r = jax.lax.stop_gradient(ratio)
    low = ((r < 1 - epsilon) & (advantages < 0)).astype(jnp.float32)
    high = ((r > 1 + eps_high) & (advantages > 0)).astype(jnp.float32)
    m = {
        "entropy": _metric(_masked_mean(jax.lax.stop_gradient(entropy), mask)),
        "clip_ratio/low_mean": _metric(jnp.mean(low)),
        "clip_ratio/low_min": _metric(jnp.min(low)),
        "clip_ratio/high_mean": _metric(jnp.mean(high)),
        "clip_ratio/high_max": _metric(jnp.max(high)),
        "clip_ratio/region_mean": _metric(jnp.mean(jnp.maximum(low, high))),
    }
    return jnp.mean(per_seq), m


# ---------------------------------------------------------------------------------------------
# Online DPO: two completions per prompt ranked by the reward, then the DPO loss


def online_dpo_rewards(per_func, weights, contains_eos, missing_eos_penalty: float | None) -> jax.Array:
    """[2B] rewards of the two samples (first samples of every prompt, then the second ones):
    weighted sums ignoring None (an unscored completion gets 0, as TRL), minus
    `missing_eos_penalty` where the completion holds no EOS token."""
    r = combine_rewards(per_func, weights, unscorable_nan=False)
    if missing_eos_penalty is not None:
        r = r - jnp.where(jnp.asarray(contains_eos, bool), 0.0, missing_eos_penalty)
    return r


def online_dpo_pairs(rewards: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[2B] rewards -> (chosen [B], rejected [B]) row indices: the first sample wins ties."""
    b = rewards.shape[0] // 2
    first_wins = rewards[:b] >= rewards[b:]
    idx = jnp.arange(b)
    return idx + jnp.where(first_wins, 0, b), idx + jnp.where(first_wins, b, 0)


def online_dpo_loss(logp, ref_logp, mask, scores, contains_eos, *, beta: float,
                    loss_type: str = "sigmoid") -> tuple[jax.Array, dict]:
    """Online DPO on B pairs, rows ordered chosen then rejected (`online_dpo_pairs`): logp, ref_logp,
    mask [2B, C]; scores [2B] and contains_eos [2B] in that row order. sigmoid:
    -logsig(beta * D); ipo: (D - 1 / (2 beta))^2, with D the difference of the log-ratios of
    the summed log-probs (IPO here is not length-normalised, unlike the offline `ipo`).

    `objective/kl` and `objective/entropy` sum over the mask; TRL sums over every completion slot,
    padding included, and so differs by the log-probs of the padding tokens."""
    b = logp.shape[0] // 2
    lp = jnp.sum(logp * mask, axis=-1)
    ref = jnp.sum(ref_logp * mask, axis=-1)
    d = (lp[:b] - lp[b:]) - (ref[:b] - ref[b:])
    if loss_type == "sigmoid":
        per = -log_sigmoid(beta * d)
    elif loss_type == "ipo":
        per = (d - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"online DPO loss_type {loss_type!r}; sigmoid or ipo")
    sg = jax.lax.stop_gradient
    lp, kl_seq = sg(lp), sg(jnp.sum((logp - ref_logp) * mask, axis=-1))
    rc, rr = beta * (lp[:b] - ref[:b]), beta * (lp[b:] - ref[b:])
    non_score = -beta * kl_seq
    m = {
        "objective/scores_margin": jnp.mean(scores[:b] - scores[b:]),
        "objective/scores": jnp.mean(scores),
        "val/contain_eos_token": jnp.mean(jnp.asarray(contains_eos, jnp.float32)),
        "logps/chosen": jnp.mean(lp[:b]), "logps/rejected": jnp.mean(lp[b:]),
        "objective/kl": jnp.mean(kl_seq),
        "objective/non_score_reward": jnp.mean(non_score),
        "objective/rlhf_reward": jnp.mean(scores + non_score),
        "objective/entropy": -jnp.mean(jnp.sum(sg(logp) * mask, axis=-1)),
        "rewards/chosen": jnp.mean(rc), "rewards/rejected": jnp.mean(rr),
        "rewards/margins": jnp.mean(rc - rr), "rewards/accuracies": jnp.mean((rc - rr > 0).astype(jnp.float32)),
        "beta": jnp.asarray(beta, jnp.float32),
    }
    return jnp.mean(per), {k: _metric(v) for k, v in m.items()}

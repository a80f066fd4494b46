"""PPO on rollouts: the KL penalty folded into per-token rewards, GAE, whitened advantages, and the
clipped policy and value losses. Pure functions of arrays; no model, no generation.

The formulas and metric names are those of TRL's `PPOTrainer.train` (`trl/experimental/ppo/
ppo_trainer.py`; TRL 1.16's wheel no longer ships it), kept to the letter so that the same rollout
gives the same numbers (tests/test_online_trl.py), quirks included: the score is added one slot
past the last response token (or on it when the response fills every slot), the values keep that
extra slot, padded log-probs hold `INVALID_LOGPROB` (1.0), and `objective/entropy` sums -logprob
over every slot, padding included.

Shapes: B responses, T response slots (right-padded); `seq_lengths` [B] int32 is the index of each
response's last token (TRL: first pad index - 1; T - 1 when there is no pad). Log-probs are those of
logits / (temperature + 1e-7), as TRL computes them.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

INVALID_LOGPROB = 1.0


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    return jnp.sum(x * mask, axis=axis) / jnp.sum(mask, axis=axis)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
    """Variance over the mask, Bessel-corrected by the mask's count (NaN for one element)."""
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if unbiased:
        n = jnp.sum(mask)
        var = var * n / (n - 1)
    return var


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """(x - mean) / sqrt(var + 1e-8) over the mask; `shift_mean=False` adds the mean back."""
    mean = masked_mean(x, mask)
    out = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + 1e-8)
    return out if shift_mean else out + mean


def truncate_after_stop(responses: jax.Array, stop_token_id: int, pad_token_id: int) -> jax.Array:
    """[B, T] int token ids with every token after the first `stop_token_id` replaced by the pad."""
    is_stop = responses == stop_token_id
    seen = jnp.cumsum(is_stop, axis=1) - is_stop
    return jnp.where(seen > 0, pad_token_id, responses)


def sequence_lengths(responses: jax.Array, pad_token_id: int) -> jax.Array:
    """[B] index of the last token before the first pad (T - 1 without pad)."""
    t = responses.shape[1]
    first_pad = jnp.min(jnp.where(responses == pad_token_id, jnp.arange(t)[None, :], t), axis=1)
    return first_pad - 1


def gae(rewards: jax.Array, values: jax.Array, gamma: float, lam: float) -> jax.Array:
    """Generalised advantage estimates [B, T]: delta_t = r_t + gamma v_{t+1} - v_t (v_T = 0),
    A_t = delta_t + gamma lam A_{t+1}, over every slot (the masks are applied by the caller)."""
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def back(carry, delta):
        a = delta + gamma * lam * carry
        return a, a

    _, adv = jax.lax.scan(back, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
    return adv.T


@jax.tree_util.register_dataclass
@dataclass
class PpoRollout:
    """One scored rollout batch, every field [B, T] float32 unless said: `logprobs` / `values` with
    the padding filled (INVALID_LOGPROB / 0); `rewards` (KL penalty + score); `advantages`
    (whitened over the response tokens, 0 on padding) and `returns` (raw advantages + values);
    `kl` and `non_score_reward` per token; `scores` [B]; `padding_mask` (past the last token) and
    `padding_mask_p1` (past the slot after it) bool."""
    logprobs: jax.Array
    values: jax.Array
    rewards: jax.Array
    advantages: jax.Array
    returns: jax.Array
    kl: jax.Array
    non_score_reward: jax.Array
    scores: jax.Array
    padding_mask: jax.Array
    padding_mask_p1: jax.Array


def ppo_rollout(logprobs, ref_logprobs, values, scores, seq_lengths, *, kl_coef: float,
                kl_estimator: str = "k1", whiten_rewards: bool = False, gamma: float = 1.0,
                lam: float = 0.95) -> PpoRollout:
    """Rollout log-probs, reference log-probs and values [B, T], scores [B] (after
    `missing_eos_penalty`) and last-token indices [B] -> rewards, GAE advantages and returns.

    Per-token reward: -kl_coef * KL (k1: logp - ref; k3: exp(r) - 1 - r with r = ref - logp),
    plus the score on slot seq_length + 1 (seq_length when that is past the end)."""
    t = logprobs.shape[1]
    idx = jnp.arange(t)[None, :]
    pad = idx > seq_lengths[:, None]
    pad_p1 = idx > (seq_lengths + 1)[:, None]
    logprobs = jnp.where(pad, INVALID_LOGPROB, logprobs)
    ref_logprobs = jnp.where(pad, INVALID_LOGPROB, ref_logprobs)
    values = jnp.where(pad_p1, 0.0, values)
    logr = ref_logprobs - logprobs
    if kl_estimator == "k1":
        kl = -logr
    elif kl_estimator == "k3":
        kl = (jnp.exp(logr) - 1) - logr
    else:
        raise ValueError(f"kl_estimator {kl_estimator!r}; k1 or k3")
    non_score = -kl_coef * kl
    end = jnp.where(seq_lengths + 1 < t, seq_lengths + 1, seq_lengths)
    rewards = non_score + jnp.where(idx == end[:, None], scores[:, None], 0.0)
    if whiten_rewards:
        rewards = jnp.where(pad_p1, 0.0, masked_whiten(rewards, ~pad_p1, shift_mean=False))
    adv = gae(rewards, values, gamma, lam)
    returns = adv + values
    adv = jnp.where(pad, 0.0, masked_whiten(adv, ~pad))
    return PpoRollout(logprobs, values, rewards, adv, returns, kl, non_score, scores, pad, pad_p1)


def ppo_loss(new_logprobs, vpred, entropy, old_logprobs, old_values, returns, advantages,
             padding_mask, padding_mask_p1, *, cliprange: float, cliprange_value: float,
             vf_coef: float) -> tuple[jax.Array, dict]:
    """PPO on one micro-batch (the rollout's rows): new log-probs and value predictions [B, T] of
    the policy being trained, per-token entropies [B, T], and the rollout's `old_logprobs`,
    `old_values`, `returns`, `advantages` and masks (`PpoRollout`).

    loss = masked mean of max(-A r, -A clip(r, 1 +- cliprange)) over the response tokens
         + vf_coef * 0.5 * masked mean of max((v - R)^2, (clip(v, v_old +- cliprange_value) - R)^2)
    over the response tokens and the slot after them."""
    new_logprobs = jnp.where(padding_mask, INVALID_LOGPROB, new_logprobs)
    vpred = jnp.where(padding_mask_p1, 0.0, vpred)
    keep, keep_p1 = (~padding_mask).astype(jnp.float32), (~padding_mask_p1).astype(jnp.float32)
    v_clipped = jnp.clip(vpred, old_values - cliprange_value, old_values + cliprange_value)
    vf1, vf2 = (vpred - returns) ** 2, (v_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(jnp.maximum(vf1, vf2), keep_p1)
    diff = new_logprobs - old_logprobs
    ratio = jnp.exp(diff)
    pg1 = -advantages * ratio
    pg2 = -advantages * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(jnp.maximum(pg1, pg2), keep)
    sg = jax.lax.stop_gradient
    m = {
        "policy/approxkl_avg": 0.5 * jnp.mean(sg(diff) ** 2),
        "policy/clipfrac_avg": masked_mean((sg(pg2) > sg(pg1)).astype(jnp.float32), keep),
        "loss/policy_avg": sg(pg_loss),
        "loss/value_avg": sg(vf_loss),
        "val/clipfrac_avg": masked_mean((sg(vf2) > sg(vf1)).astype(jnp.float32), keep_p1),
        "policy/entropy_avg": jnp.mean(sg(entropy)),
        "val/ratio": jnp.mean(sg(ratio)),
    }
    return pg_loss + vf_coef * vf_loss, {k: jnp.reshape(v, (1,)) for k, v in m.items()}


def ppo_rollout_metrics(r: PpoRollout, num_eos_tokens) -> dict:
    """TRL's `objective/*` of a rollout batch (`objective/entropy` sums -logprob over every slot,
    the padding's INVALID_LOGPROB included, as TRL does) and `val/num_eos_tokens`."""
    non_score = jnp.mean(jnp.sum(r.non_score_reward, axis=1))
    return {
        "objective/kl": jnp.mean(jnp.sum(r.kl, axis=1)),
        "objective/entropy": jnp.mean(jnp.sum(-r.logprobs, axis=1)),
        "objective/non_score_reward": non_score,
        "objective/rlhf_reward": non_score + jnp.mean(r.scores),
        "objective/scores": jnp.mean(r.scores),
        "val/num_eos_tokens": jnp.asarray(num_eos_tokens, jnp.float32),
    }


def ratio_var(ratios: jax.Array) -> jax.Array:
    """`val/ratio_var`: the unbiased variance of the per-micro-batch `val/ratio` values of one
    rollout's updates (every PPO epoch, mini-batch and accumulation step)."""
    return jnp.var(ratios, ddof=1)

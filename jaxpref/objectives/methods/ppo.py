"""PPO (TRL's PPOTrainer): one completion per prompt, a value head on the policy's body, the KL to
the base (adapter off) folded into per-token rewards with the score at the end, GAE, and the
clipped policy and value losses, `num_ppo_epochs` passes over `num_mini_batches` mini-batches of
each rollout batch. The math is `jaxpref.objectives.ppo`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax.numpy as jnp

from jaxpref.errors import ConfigError, check_choice
from jaxpref.objectives import online
from jaxpref.objectives import ppo as ppo_math
from jaxpref.objectives.losses import LossSpec
from jaxpref.objectives.methods.base import Method, RolloutInputs, ScoringInputs
from jaxpref.objectives.methods.rollout import RolloutKeys, check_rollout


@dataclass
class PpoKeys(RolloutKeys):
    response_length: int = 53                  # completion length limit
    num_ppo_epochs: int = 4                    # passes over each rollout batch
    num_mini_batches: int = 1                  # optimizer steps per pass
    whiten_rewards: bool = False               # rewards scaled to unit variance over the batch
    kl_coef: float = 0.05                      # weight of the KL in the per-token rewards
    kl_estimator: str = "k1"                   # k1: logp - ref; k3: exp(r) - 1 - r
    cliprange: float = 0.2                     # policy ratio clip
    vf_coef: float = 0.1                       # weight of the value loss
    cliprange_value: float = 0.2               # value prediction clip around the rollout's values
    gamma: float = 1.0                         # discount
    lam: float = 0.95                          # GAE lambda
    missing_eos_penalty: float | None = None   # subtracted from the score of a response without EOS
    stop_token: str | None = None              # "eos": responses end at the tokenizer's EOS
    stop_token_id: int | None = None           # responses end at this token id


def score(x: ScoringInputs, spec: LossSpec):
    """-> (the `PpoRollout` fields, rollout metrics). The rollout's own log-probs (`old_logp`),
    reference log-probs and value predictions are [N, C]; the score is the weighted reward sum."""
    scores = online.combine_rewards(x.per_func, x.weights, unscorable_nan=False)
    penalty = spec.option("missing_eos_penalty")
    if penalty is not None:
        scores = scores - jnp.where(jnp.asarray(x.contains_eos, bool), 0.0, penalty)
    r = ppo_math.ppo_rollout(x.old_logp, x.ref_logp, x.values, scores, x.seq_lengths,
                             kl_coef=spec.option("kl_coef"), kl_estimator=spec.option("kl_estimator"),
                             whiten_rewards=spec.option("whiten_rewards"), gamma=spec.option("gamma"),
                             lam=spec.option("lam"))
    metrics = ppo_math.ppo_rollout_metrics(r, jnp.sum(jnp.asarray(x.contains_eos)))
    return {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}, metrics


def loss(x: RolloutInputs, spec: LossSpec):
    r = x.rollout
    return ppo_math.ppo_loss(x.logp, x.values, x.entropy, r["logprobs"], r["values"], r["returns"],
                             r["advantages"], r["padding_mask"], r["padding_mask_p1"],
                             cliprange=spec.option("cliprange"), cliprange_value=spec.option("cliprange_value"),
                             vf_coef=spec.option("vf_coef"))


def check(pt, loss_types: tuple[str, ...], src: str) -> None:
    check_rollout(pt, loss_types, src, "ppo")
    if pt.beta is not None:
        raise ConfigError(f"{src}: `post_training.beta` does not apply to ppo; its KL weight is `kl_coef`")
    check_choice(pt.kl_estimator, ("k1", "k3"), "post_training.kl_estimator", src)
    for key in ("response_length", "num_ppo_epochs", "num_mini_batches"):
        if getattr(pt, key) < 1:
            raise ConfigError(f"{src}: `post_training.{key}` must be >= 1, got {getattr(pt, key)}")
    for key in ("gamma", "lam"):
        if not 0 <= getattr(pt, key) <= 1:
            raise ConfigError(f"{src}: `post_training.{key}` must be in [0, 1], got {getattr(pt, key)}")
    for key in ("kl_coef", "cliprange", "cliprange_value", "vf_coef"):
        if getattr(pt, key) < 0:
            raise ConfigError(f"{src}: `post_training.{key}` must be >= 0, got {getattr(pt, key)}")
    if pt.stop_token is not None:
        check_choice(pt.stop_token, ("eos",), "post_training.stop_token", src)
        if pt.stop_token_id is not None:
            raise ConfigError(f"{src}: set `post_training.stop_token` or `stop_token_id`, not both")


PPO = Method("ppo", PpoKeys, data="prompts", loss_types=("ppo",), default_loss_type="ppo", reference=True,
             tokenization="prompt", loss=loss, score=score, check=check, kl_key="kl_coef",
             defaults=(("temperature", 0.7), ("disable_dropout", True)),
             metrics=("policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
                      "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "objective/kl",
                      "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                      "objective/scores", "val/num_eos_tokens"))

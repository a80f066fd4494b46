"""GRPO (TRL 1.16's GRPOTrainer) with its loss types grpo, bnpo, dr_grpo and dapo (the default),
and RLOO (RLOOTrainer): G completions per prompt scored by the reward functions; group-relative
(GRPO) or leave-one-out (RLOO) advantages; a clipped ratio. GRPO adds beta times a per-token KL to
the base (adapter off) in the loss, RLOO subtracts beta times the sequence KL from the rewards.
The math is `jaxpref.objectives.online`."""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from jaxpref.errors import check_choice
from jaxpref.objectives import online
from jaxpref.objectives.losses import LossSpec
from jaxpref.objectives.methods.base import Method, RolloutInputs, ScoringInputs
from jaxpref.objectives.methods.rollout import (CLIP_METRICS, ROLLOUT_METRICS, GroupKeys, check_group,
                                                check_rollout, scalars)


@dataclass
class GrpoKeys(GroupKeys):
    scale_rewards: str | bool = "group"       # group | batch | none (true: group, false: none)
    use_bias_correction_kl: bool = True       # the KL term times the ratio (TRL 1.16's default)


@dataclass
class RlooKeys(GroupKeys):
    normalize_advantages: bool = False        # advantages to mean 0, std 1 over the rollout batch
    reward_clip_range: list[float] | None = None   # [min, max] of the summed rewards


def _mask(x: ScoringInputs, spec: LossSpec):
    return online.loss_mask(x.mask, x.truncated, spec.option("mask_truncated_completions"))


def grpo_score(x: ScoringInputs, spec: LossSpec):
    """-> ({advantages [N], mask [N, C]}, rollout metrics)."""
    rewards = online.combine_rewards(x.per_func, x.weights)
    adv, std = online.grpo_advantages(rewards, spec.option("num_generations"), spec.option("scale_rewards"))
    metrics = scalars(online.reward_metrics(x.per_func, x.weights, list(x.names), std),
                      online.completion_metrics(x.lengths, x.truncated))
    return {"advantages": adv, "mask": _mask(x, spec)}, metrics


def grpo_loss(x: RolloutInputs, spec: LossSpec):
    return online.grpo_loss(
        x.logp, x.mask, x.rollout["advantages"], x.entropy, loss_type=spec.loss_types[0], beta=spec.beta,
        epsilon=spec.option("epsilon"), epsilon_high=spec.option("epsilon_high"),
        max_completion_length=spec.option("max_completion_length"), num_items=x.num_items,
        old_logp=x.old_logp, ref_logp=x.ref_logp, bias_correction_kl=spec.option("use_bias_correction_kl"))


def rloo_score(x: ScoringInputs, spec: LossSpec):
    """-> ({advantages [N], old_logps [N] summed rollout log-probs, mask}, rollout metrics)."""
    mask = _mask(x, spec)
    clip = spec.option("reward_clip_range")
    rewards, kl = online.rloo_rewards(online.combine_rewards(x.per_func, x.weights), spec.beta, x.old_logp,
                                      x.ref_logp, mask, tuple(clip) if clip else None)
    adv, std = online.rloo_advantages(rewards, spec.option("num_generations"), spec.option("normalize_advantages"))
    metrics = scalars(kl, online.reward_metrics(x.per_func, x.weights, list(x.names), std),
                      online.completion_metrics(x.lengths, x.truncated))
    return {"advantages": adv, "old_logps": jnp.sum(x.old_logp * mask, axis=-1), "mask": mask}, metrics


def rloo_loss(x: RolloutInputs, spec: LossSpec):
    return online.rloo_loss(x.logp, x.mask, x.rollout["advantages"], x.entropy, epsilon=spec.option("epsilon"),
                            epsilon_high=spec.option("epsilon_high"), old_logps=x.rollout["old_logps"])


def check_grpo(pt, loss_types: tuple[str, ...], src: str) -> None:
    check_rollout(pt, loss_types, src, "grpo")
    check_group(pt, src, "grpo")
    if isinstance(pt.scale_rewards, bool):   # TRL accepts true / false for group / none
        pt.scale_rewards = "group" if pt.scale_rewards else "none"
    check_choice(pt.scale_rewards, online.SCALE_REWARDS, "post_training.scale_rewards", src)


def check_rloo(pt, loss_types: tuple[str, ...], src: str) -> None:
    from jaxpref.errors import ConfigError

    check_rollout(pt, loss_types, src, "rloo")
    check_group(pt, src, "rloo")
    clip = pt.reward_clip_range
    if clip is not None and (len(clip) != 2 or clip[0] > clip[1]):
        raise ConfigError(f"{src}: `post_training.reward_clip_range` must be [min, max], got {clip}")


GRPO = Method("grpo", GrpoKeys, data="prompts", loss_types=online.LOSS_TYPES, default_loss_type="dapo",
              reference=True, tokenization="prompt", loss=grpo_loss, score=grpo_score, check=check_grpo,
              metrics=("kl", "entropy") + CLIP_METRICS + ROLLOUT_METRICS,
              defaults=(("beta", 0.0), ("num_generations", 8), ("temperature", 1.0), ("disable_dropout", False)))
RLOO = Method("rloo", RlooKeys, data="prompts", loss_types=("rloo",), default_loss_type="rloo",
              reference=True, tokenization="prompt", loss=rloo_loss, score=rloo_score, check=check_rloo,
              metrics=("kl", "entropy") + CLIP_METRICS + ROLLOUT_METRICS,
              defaults=(("beta", 0.05), ("num_generations", 2), ("temperature", 1.0), ("disable_dropout", False)))

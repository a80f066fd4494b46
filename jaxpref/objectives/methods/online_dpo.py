"""Online DPO (TRL's experimental OnlineDPOTrainer): two completions per prompt, the one the reward
ranks higher (the first on ties) is chosen, then the DPO sigmoid or IPO loss on the pair's summed
log-probs against the base (adapter off). The math is `jaxpref.objectives.online`."""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from jaxpref.errors import ConfigError
from jaxpref.objectives import online
from jaxpref.objectives.losses import LossSpec
from jaxpref.objectives.methods.base import Method, RolloutInputs, ScoringInputs
from jaxpref.objectives.methods.rollout import SamplingKeys, check_rollout


@dataclass
class OnlineDpoKeys(SamplingKeys):
    max_new_tokens: int = 64                   # completion length limit
    missing_eos_penalty: float | None = None   # subtracted from the reward of a completion without EOS


def score(x: ScoringInputs, spec: LossSpec):
    """N = 2B completions, the first samples of the B prompts then the second ones -> ({order [2B]:
    the rows chosen then rejected, scores and contains_eos in that order}, no rollout metrics:
    the loss logs TRL's)."""
    rewards = online.online_dpo_rewards(x.per_func, x.weights, x.contains_eos, spec.option("missing_eos_penalty"))
    chosen, rejected = online.online_dpo_pairs(rewards)
    order = jnp.concatenate([chosen, rejected])
    return {"order": order, "scores": rewards[order], "contains_eos": jnp.asarray(x.contains_eos)[order]}, {}


def loss(x: RolloutInputs, spec: LossSpec):
    """x's rows are whole pairs in `order`: B chosen completions, then their B rejected ones."""
    return online.online_dpo_loss(x.logp, x.ref_logp, x.mask, x.rollout["scores"], x.rollout["contains_eos"],
                                  beta=spec.beta, loss_type=spec.loss_types[0])


def check(pt, loss_types: tuple[str, ...], src: str) -> None:
    check_rollout(pt, loss_types, src, "online_dpo")
    if pt.beta is not None and pt.beta <= 0:
        raise ConfigError(f"{src}: `post_training.beta` must be > 0 for online_dpo, got {pt.beta}")
    if pt.max_new_tokens < 1:
        raise ConfigError(f"{src}: `post_training.max_new_tokens` must be >= 1, got {pt.max_new_tokens}")


ONLINE_DPO = Method(
    "online_dpo", OnlineDpoKeys, data="prompts", loss_types=("sigmoid", "ipo"), default_loss_type="sigmoid",
    reference=True, tokenization="prompt_text", loss=loss, score=score, check=check,
    defaults=(("beta", 0.1), ("temperature", 0.9), ("disable_dropout", True)),
    metrics=("objective/scores_margin", "objective/scores", "val/contain_eos_token", "logps/chosen",
             "logps/rejected", "objective/kl", "objective/non_score_reward", "objective/rlhf_reward",
             "objective/entropy", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "beta"))

"""The optimizer and learning-rate schedule of the `training` section (Hugging Face semantics)."""
from __future__ import annotations

import math
from typing import Callable

import jax
import optax

from jaxpref.config.schema import TRAINER_MAX_GRAD_NORM
from jaxpref.training.adafactor import adafactor

# Leaves weight decay leaves alone, as transformers' Trainer (`get_decay_parameter_names`): biases
# and the weights of normalisation layers (every norm of our architectures is a `scale` leaf).
NO_DECAY = ("bias", "scale")


def decay_mask(params):
    """params -> the same tree of bools: True where weight decay applies."""
    def decays(path, _):
        last = path[-1] if path else None
        return getattr(last, "key", getattr(last, "name", last)) not in NO_DECAY
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tcfg, total_steps: int, every: int = 1) -> tuple[optax.GradientTransformation, Callable]:
    """optax optimizer and schedule from the `training` section (HF semantics for the schedule).
    `every`: optimizer updates per schedule step (PPO: the updates of one rollout batch share a
    learning rate, as TRL's PPOTrainer steps its scheduler once per batch); `total_steps` counts
    schedule steps."""
    lr = tcfg.learning_rate
    # transformers 5: warmup_steps below 1 is a fraction of the run (warmup_ratio is the older key).
    ratio = tcfg.warmup_steps if 0 < tcfg.warmup_steps < 1 else tcfg.warmup_ratio
    warm = int(tcfg.warmup_steps) if tcfg.warmup_steps >= 1 else int(math.ceil(ratio * total_steps))
    # A warm-up longer than the run is not cut to it: the rate ramps towards the peak it never
    # reaches (transformers' schedules).
    decay_steps = max(total_steps - warm, 1)
    kind = tcfg.lr_scheduler_type
    if kind in ("constant", "constant_with_warmup"):
        after = optax.constant_schedule(lr)
    elif kind == "linear":
        after = optax.linear_schedule(lr, 0.0, decay_steps)
    else:
        after = optax.cosine_decay_schedule(lr, decay_steps)
    if warm > 0 and kind != "constant":
        schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])
    else:
        schedule = after
    per_update = schedule if every == 1 else (lambda count: schedule(count // every))
    if tcfg.optimizer == "adamw":
        opt = optax.adamw(per_update, b1=tcfg.adam_beta1, b2=tcfg.adam_beta2, eps=tcfg.adam_epsilon,
                          weight_decay=tcfg.weight_decay, mask=decay_mask)
    elif tcfg.optimizer == "sgd":   # torch's SGD: the decay joins the gradient
        opt = optax.chain(optax.add_decayed_weights(tcfg.weight_decay, mask=decay_mask), optax.sgd(per_update))
    else:
        opt = adafactor(per_update, tcfg.weight_decay, decay_mask)
    clip = TRAINER_MAX_GRAD_NORM if tcfg.max_grad_norm is None else tcfg.max_grad_norm   # unvalidated: the Trainer's
    parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    return optax.chain(*parts, opt), schedule

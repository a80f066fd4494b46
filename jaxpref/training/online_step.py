"""The compiled optimizer step of an online method (GRPO, RLOO) on one scored rollout batch: G
micro-batches of B completions, each through the method's loss (`objectives.methods`), gradients
averaged over the micro-batches as TRL's gradient accumulation does (its losses are divided by
the accumulation steps; dapo's token normaliser spans the whole step)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxpref.objectives.methods.base import RolloutInputs
from jaxpref.training.rollouts import completion_logps
from jaxpref.training.step import TrainState


def make_online_step(bundle, method, spec, optimizer, schedule, temperature: float, dropout: bool = False,
                     sum_grads: bool = False):
    """-> step(state, params, batch, P) -> (state, metrics), jit-compiled. batch: dict of [G, B, ...]
    arrays: ids, valid, and the `score` outputs (advantages, mask, ...), with optional old_logp /
    ref_logp [G, B, C] and num_items (dapo's tokens per micro-batch, a scalar). `sum_grads`: the
    micro-batches' gradients summed, not averaged (TRL's OnlineDPOTrainer.training_step does not
    divide its loss by the accumulation steps before the backward pass; the logged loss is the mean)."""

    def micro(lora, params, mb, num_items, P, rng):
        rngs = {"dropout": rng} if dropout else None
        logp, ent = completion_logps(bundle, params, lora, mb["ids"], mb["valid"], P, temperature, rngs)
        rollout = {k: v for k, v in mb.items() if k not in ("ids", "valid", "old_logp", "ref_logp")}
        x = RolloutInputs(logp, ent, mb["mask"], rollout, old_logp=mb.get("old_logp"),
                          ref_logp=mb.get("ref_logp"), num_items=num_items)
        return method.loss(x, spec)

    def step(state: TrainState, params, batch, num_items, P):
        G = batch["ids"].shape[0]
        rng = jax.random.fold_in(state.rng, state.step)

        def body(gsum, xs):
            mb, i = xs
            (loss, m), g = jax.value_and_grad(micro, has_aux=True)(state.lora, params, mb, num_items, P,
                                                                   jax.random.fold_in(rng, i))
            m = dict(m, loss=jnp.reshape(loss, (1,)))
            return jax.tree_util.tree_map(jnp.add, gsum, g), m

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.lora)
        gsum, ms = jax.lax.scan(body, zeros, (batch, jnp.arange(G)))
        grads = gsum if sum_grads else jax.tree_util.tree_map(lambda g: g / G, gsum)
        metrics = {k: jnp.mean(v) for k, v in ms.items()}   # TRL logs the mean of its per-micro-batch values
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["learning_rate"] = schedule(state.step)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
        lora = optax.apply_updates(state.lora, updates)
        return TrainState(lora, opt_state, state.step + 1, state.rng), metrics

    return jax.jit(step, static_argnames=("P",), donate_argnums=(0,))


def micro_batches(arrays: dict, G: int) -> dict:
    """[N, ...] arrays -> [G, N / G, ...] (micro-batch g holds rows g*B .. g*B+B-1)."""
    return {k: v.reshape((G, v.shape[0] // G) + v.shape[1:]) for k, v in arrays.items()}

"""PPO's value head and compiled passes (TRL's PPOTrainer with the value model on the policy's
body): the head is a full linear map [hidden -> 1] without bias (TRL's value model is a
sequence-classification model, whose `score` is `nn.Linear(hidden, 1, bias=False)`) on the final
normed hidden state, trained together with the LoRA adapter. It starts at zeros (TRL reads its
value model from a reward model checkpoint; here every value starts at 0 and the head learns from
the first update).

Positions (TRL's): for completion slot t the log-prob of token t and the value are read from the
hidden state before it, position P - 1 + t (`full_value[:, context_length - 1 : -1]`), so the slot
after the last token holds the value of the state the last token ends in. Log-probs and entropies
are those of logits / (temperature + 1e-7), as TRL computes them.

The trainable tree is {"lora": adapter, "value_head": [D] float32}; one optimizer step per
mini-batch, its micro-batches' gradients averaged (TRL's gradient accumulation), dropout off (TRL
disables it in every model of a PPO run).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxpref.models.attention import MaskInfo
from jaxpref.models.layers import matmul
from jaxpref.objectives.head import completion_stats
from jaxpref.objectives.methods.base import RolloutInputs
from jaxpref.training.step import TrainState

VALUE_HEAD_FILE = "value_head.safetensors"   # beside adapter/ in the run folder
TEMPERATURE_EPS = 1e-7                       # TRL divides the logits by temperature + 1e-7
LOSS_KEYS = ("logprobs", "values", "returns", "advantages", "padding_mask", "padding_mask_p1")


def init_value_head(hidden_size: int) -> jax.Array:
    return jnp.zeros((hidden_size,), jnp.float32)


def logps_values(bundle, params, lora, head, ids, valid, P: int, temperature: float):
    """Rows [B, P + C] -> (log-prob [B, C], entropy [B, C], value [B, C]) of the completion slots,
    float32; `lora=None`: the base model (adapter off). Positions as TRL's `forward` gives them
    (the real tokens before each slot). The padding slots' values are not TRL's (its pad queries
    attend to the real tokens; here to nothing real): every loss masks them, but TRL's
    `policy/entropy_avg` averages them in, so that metric equals TRL's on unpadded batches only."""
    valid = jnp.asarray(valid, jnp.int32)
    pos = jnp.cumsum(valid, axis=1) - valid
    hidden = bundle.hidden(params, lora, ids, pos, MaskInfo.rows(valid, pos))
    a = bundle.args
    h = hidden[:, P - 1:-1]
    logp, entropy = completion_stats(h, bundle.head(params), ids[:, P:], temperature + TEMPERATURE_EPS,
                                     a.vocab_chunk, a.matmul_precision, a.spec().final_logit_softcap)
    values = matmul("btd,d->bt", h, head, a.dtype, jnp.float32, a.matmul_precision)
    return logp, entropy, values


def make_rollout_pass(bundle, temperature: float):
    """Jitted no-gradient pass of the rollout: (params, trainable, ids, valid, P) -> (log-probs
    with the adapter on, log-probs with it off (the reference), values), each [N, C]."""
    def f(params, trainable, ids, valid, P):
        logp, _, values = logps_values(bundle, params, trainable["lora"], trainable["value_head"], ids, valid,
                                       P, temperature)
        ref, _, _ = logps_values(bundle, params, None, trainable["value_head"], ids, valid, P, temperature)
        return logp, ref, values
    return jax.jit(f, static_argnames=("P",))


def make_ppo_step(bundle, method, spec, optimizer, temperature: float):
    """-> step(state, params, batch, P) -> (state, metrics), jit-compiled: one optimizer step on
    one mini-batch. batch: dict of [M, B, ...] arrays (M micro-batches of B rows): ids, valid and
    the rollout's `LOSS_KEYS`. metrics: name -> [M] (one value per micro-batch, as TRL's stats
    tensors hold them), plus `grad_norm` (a scalar)."""

    def micro(trainable, params, mb, P):
        logp, ent, values = logps_values(bundle, params, trainable["lora"], trainable["value_head"], mb["ids"],
                                         mb["valid"], P, temperature)
        rollout = {k: mb[k] for k in LOSS_KEYS}
        mask = (~mb["padding_mask"]).astype(jnp.float32)
        return method.loss(RolloutInputs(logp, ent, mask, rollout, values=values), spec)

    def step(state: TrainState, params, batch, P):
        M = batch["ids"].shape[0]

        def body(gsum, mb):
            (loss, m), g = jax.value_and_grad(micro, has_aux=True)(state.lora, params, mb, P)
            return jax.tree_util.tree_map(jnp.add, gsum, g), dict(m, loss=jnp.reshape(loss, (1,)))

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.lora)
        gsum, ms = jax.lax.scan(body, zeros, batch)
        grads = jax.tree_util.tree_map(lambda g: g / M, gsum)
        metrics = {k: v.reshape(M) for k, v in ms.items()}
        metrics["grad_norm"] = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
        trainable = optax.apply_updates(state.lora, updates)
        return TrainState(trainable, opt_state, state.step + 1, state.rng), metrics

    return jax.jit(step, static_argnames=("P",), donate_argnums=(0,))


def mini_batch(arrays: dict, inds, B: int) -> dict:
    """Rows `inds` of [N, ...] arrays -> [len(inds) / B, B, ...] micro-batches (TRL: consecutive
    slices of the mini-batch's shuffled indices)."""
    inds = jnp.asarray(inds)
    return {k: jnp.take(v, inds, axis=0).reshape((len(inds) // B, B) + v.shape[1:]) for k, v in arrays.items()}

"""Adafactor as transformers' Trainer runs it for `optim: adafactor` (its `Adafactor` with
`scale_parameter=False, relative_step=False`: the schedule's learning rate, no parameter scale, no
momentum), on our trees.

Per Hugging Face parameter, at step t (from 1): beta2 = 1 - t^-0.8; the second moment of
grad^2 + 1e-30 is kept factored over the last two axes (row and column means) for a matrix, whole
for a vector; the update grad / sqrt(v) is divided by max(1, RMS(update)) and scaled by the
learning rate; weight decay takes lr x weight_decay x p off the parameter (where `decay` says).

Our stacked leaves hold several Hugging Face parameters: a leaf under `layers` has one per layer
(leading axis), a LoRA factor (`a`, `b`) one per matrix of its last two axes. The factoring and the
RMS are per such parameter, as transformers computes them. (A matrix stored transposed factors the
same: the estimate row x col / mean(row) is symmetric.)"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

EPS1 = 1e-30          # added to grad^2 (transformers' eps[0])
CLIP_THRESHOLD = 1.0  # the update's RMS is clipped to this
DECAY_RATE = -0.8     # beta2_t = 1 - t ** DECAY_RATE


def lead_axes(path: tuple, leaf) -> int:
    """Leading axes of a trainable leaf that index separate Hugging Face parameters."""
    names = [getattr(k, "key", getattr(k, "name", k)) for k in path]
    if names and names[-1] in ("a", "b"):   # a LoRA factor: one matrix per lead index
        return leaf.ndim - 2
    return 1 if names and names[0] == "layers" else 0


class AdafactorState(NamedTuple):
    count: jax.Array
    row: optax.Params    # factored leaves: the row means of the second moment (else a 0-d placeholder)
    col: optax.Params    # factored leaves: the column means
    v: optax.Params      # vector leaves: the whole second moment


def _factored(leaf, lead: int) -> bool:
    return leaf.ndim - lead >= 2


def adafactor(learning_rate: Callable, weight_decay: float = 0.0,
              decay: Callable | None = None) -> optax.GradientTransformationExtraArgs:
    """`learning_rate`: the schedule (step -> rate); `decay`: params -> tree of bools (which
    leaves weight decay applies to; default all)."""

    def init(params):
        leads = jax.tree_util.tree_map_with_path(lead_axes, params)
        empty = lambda: jnp.zeros((), jnp.float32)   # one buffer per leaf (the step donates the state)
        row = jax.tree_util.tree_map(
            lambda p, n: jnp.zeros(p.shape[:-1], jnp.float32) if _factored(p, n) else empty(), params, leads)
        col = jax.tree_util.tree_map(
            lambda p, n: jnp.zeros(p.shape[:-2] + p.shape[-1:], jnp.float32) if _factored(p, n) else empty(),
            params, leads)
        v = jax.tree_util.tree_map(lambda p, n: empty() if _factored(p, n) else jnp.zeros(p.shape, jnp.float32),
                                   params, leads)
        return AdafactorState(jnp.zeros((), jnp.int32), row, col, v)

    def update(grads, state, params=None):
        t = (state.count + 1).astype(jnp.float32)
        beta2 = 1.0 - t ** DECAY_RATE
        lr = learning_rate(state.count)
        leads = jax.tree_util.tree_map_with_path(lead_axes, grads)

        def one(g, row, col, v, n):
            g = g.astype(jnp.float32)
            sq = g * g + EPS1
            if _factored(g, n):
                row = beta2 * row + (1 - beta2) * jnp.mean(sq, axis=-1)
                col = beta2 * col + (1 - beta2) * jnp.mean(sq, axis=-2)
                r = jax.lax.rsqrt(row / jnp.mean(row, axis=-1, keepdims=True))[..., None]
                u = r * jax.lax.rsqrt(col)[..., None, :] * g
            else:
                v = beta2 * v + (1 - beta2) * sq
                u = jax.lax.rsqrt(v) * g
            axes = tuple(range(n, g.ndim))
            rms = jnp.sqrt(jnp.mean(u * u, axis=axes, keepdims=True)) if axes else jnp.abs(u)
            u = u / jnp.maximum(rms / CLIP_THRESHOLD, 1.0)
            return u, row, col, v

        out = jax.tree_util.tree_map(one, grads, state.row, state.col, state.v, leads)
        pick = lambda i: jax.tree_util.tree_map(lambda _, o: o[i], grads, out)
        u, row, col, v = pick(0), pick(1), pick(2), pick(3)
        if weight_decay:
            if params is None:
                raise ValueError("adafactor with weight decay needs the params")
            mask = decay(params) if decay is not None else jax.tree_util.tree_map(lambda _: True, params)
            u = jax.tree_util.tree_map(lambda x, p, m: x + weight_decay * p if m else x, u, params, mask)
        updates = jax.tree_util.tree_map(lambda x, p: (-lr * x).astype(p.dtype), u, grads)
        return updates, AdafactorState(state.count + 1, row, col, v)

    return optax.GradientTransformationExtraArgs(init, lambda g, s, p=None, **_: update(g, s, p))

"""The LM head on the scored positions only: target log-probs, the mean logit and WPO's term.

`h` holds the hidden states that predict the K target tokens of each row ([N, K, D]); the head
weight is [D, V]. With `chunk` < V the vocabulary is visited `chunk` columns at a time with an
online log-sum-exp (`lax.scan`, each chunk rematerialised in the backward), so no [N, K, V] array
is ever held: memory O(N K chunk) instead of O(N K V), for the same numbers up to fp32 rounding.
A final-logit soft-cap (Gemma 2) turns each logit z into tanh(z / cap) * cap before anything reads
it, in both paths: the log-probs, the mean logit and WPO's term are those of the capped logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpref.models.layers import matmul

f32 = jnp.float32


def head_logps(h: jax.Array, w: jax.Array, tgt_ids: jax.Array, chunk: int = 0, need_wpo: bool = False,
               precision: str | None = "highest", softcap: float | None = None, need_stats: bool = False):
    """-> (logp, mean_logit, wpo or None), each [N, K] float32. `chunk` <= 0: whole vocabulary;
    `precision`: fp32 products (`layers.matmul`); `softcap`: the final-logit soft-cap (None: none).
    `need_stats`: also (entropy, top1), without gradient: the predicted distribution's entropy
    and 1.0 where the target is its most likely token (TRL's `entropy`, `mean_token_accuracy`)."""
    V = w.shape[1]
    if chunk <= 0 or chunk >= V:
        logits = capped_logits(matmul("nkd,dv->nkv", h, w, h.dtype, f32, precision), softcap)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, tgt_ids[..., None], axis=-1)[..., 0]
        logp = tgt - lse
        wpo = None
        if need_wpo:
            wpo = jax.lax.stop_gradient(logp - (jax.nn.logsumexp(2 * logits, axis=-1) - 2 * lse))
        if not need_stats:
            return logp, jnp.mean(logits, axis=-1), wpo
        z, lz = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(lse)
        ent = lz - jnp.sum(jnp.exp(z - lz[..., None]) * z, axis=-1)
        top1 = (jnp.argmax(z, axis=-1) == tgt_ids).astype(f32)
        return logp, jnp.mean(logits, axis=-1), wpo, ent, top1

    n = -(-V // chunk)
    neg = jnp.asarray(-jnp.inf, f32)

    @jax.checkpoint
    def body(carry, i):
        m, s, m2, s2, tgt, total, u, best, arg = carry
        # The last chunk starts at V - chunk (dynamic_slice would clamp it there anyway); columns
        # an earlier chunk already counted are masked out.
        start = jnp.minimum(i * chunk, V - chunk)
        cols = start + jnp.arange(chunk)
        valid = cols >= i * chunk
        logits = capped_logits(matmul("nkd,dv->nkv", h, jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=1), h.dtype,
                                f32, precision), softcap)
        x = jnp.where(valid, logits, neg)
        m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(x, axis=-1)))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[..., None]), axis=-1)
        tgt = tgt + jnp.sum(jnp.where(valid & (cols == tgt_ids[..., None]), logits, 0.0), axis=-1)
        total = total + jnp.sum(jnp.where(valid, logits, 0.0), axis=-1)
        if need_stats:   # the softmax-weighted logit sum (entropy = lse - u / s) and the running argmax
            z = jax.lax.stop_gradient(jnp.where(valid, logits, 0.0))
            u = u * jnp.exp(m - m_new) + jnp.sum(jnp.exp(jax.lax.stop_gradient(x) - m_new[..., None]) * z, axis=-1)
            cmax = jnp.max(jax.lax.stop_gradient(x), axis=-1)
            arg = jnp.where(cmax > best, start + jnp.argmax(jax.lax.stop_gradient(x), axis=-1), arg)
            best = jnp.maximum(best, cmax)
        if need_wpo:
            x2 = jax.lax.stop_gradient(2 * x)
            m2_new = jnp.maximum(m2, jnp.max(x2, axis=-1))
            s2 = s2 * jnp.exp(m2 - m2_new) + jnp.sum(jnp.exp(x2 - m2_new[..., None]), axis=-1)
            m2 = m2_new
        return (m_new, s, m2, s2, tgt, total, u, best, arg), None

    shape = tgt_ids.shape
    init = (jnp.full(shape, neg), jnp.zeros(shape, f32), jnp.full(shape, neg), jnp.zeros(shape, f32),
            jnp.zeros(shape, f32), jnp.zeros(shape, f32), jnp.zeros(shape, f32), jnp.full(shape, neg),
            jnp.zeros(shape, jnp.int32))
    (m, s, m2, s2, tgt, total, u, _, arg), _ = jax.lax.scan(body, init, jnp.arange(n))
    lse = m + jnp.log(s)
    logp = tgt - lse
    wpo = jax.lax.stop_gradient(logp - (m2 + jnp.log(s2) - 2 * lse)) if need_wpo else None
    if not need_stats:
        return logp, total / V, wpo
    ent = jax.lax.stop_gradient(lse - u / s)
    return logp, total / V, wpo, ent, (arg == tgt_ids).astype(f32)


def completion_stats(h: jax.Array, w: jax.Array, tgt_ids: jax.Array, temperature: float, chunk: int = 0,
                     precision: str | None = "highest", softcap: float | None = None):
    """The online methods' token statistics: -> (log-prob, entropy), each [N, K] float32, of
    softmax(capped logits / `temperature`). `chunk` < V visits the vocabulary `chunk` columns at a
    time as `head_logps` does (the entropy as log-sum-exp minus the softmax-weighted mean logit)."""
    V = w.shape[1]
    logits_of = lambda w_: capped_logits(matmul("nkd,dv->nkv", h, w_, h.dtype, f32, precision), softcap) / temperature
    if chunk <= 0 or chunk >= V:
        logz = jax.nn.log_softmax(logits_of(w), axis=-1)
        logp = jnp.take_along_axis(logz, tgt_ids[..., None], axis=-1)[..., 0]
        return logp, -jnp.sum(jnp.exp(logz) * logz, axis=-1)
    neg = jnp.asarray(-jnp.inf, f32)

    @jax.checkpoint
    def body(carry, i):
        m, s, u, tgt = carry   # running max, sum of exp(z - m), sum of exp(z - m) z, target logit
        start = jnp.minimum(i * chunk, V - chunk)
        cols = start + jnp.arange(chunk)
        valid = cols >= i * chunk
        z = logits_of(jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=1))
        x = jnp.where(valid, z, neg)
        m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(x, axis=-1)))
        scale, e = jnp.exp(m - m_new), jnp.exp(x - m_new[..., None])
        s = s * scale + jnp.sum(e, axis=-1)
        u = u * scale + jnp.sum(e * jnp.where(valid, z, 0.0), axis=-1)
        tgt = tgt + jnp.sum(jnp.where(valid & (cols == tgt_ids[..., None]), z, 0.0), axis=-1)
        return (m_new, s, u, tgt), None

    shape = tgt_ids.shape
    init = (jnp.full(shape, neg), jnp.zeros(shape, f32), jnp.zeros(shape, f32), jnp.zeros(shape, f32))
    (m, s, u, tgt), _ = jax.lax.scan(body, init, jnp.arange(-(-V // chunk)))
    lse = m + jnp.log(s)
    return tgt - lse, lse - u / s


def capped_logits(logits: jax.Array, softcap: float | None) -> jax.Array:
    """tanh(logits / softcap) * softcap (Gemma 2's final-logit soft-cap); the logits themselves when
    `softcap` is None."""
    return logits if softcap is None else jnp.tanh(logits / softcap) * softcap

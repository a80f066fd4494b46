"""The next token from the logits: greedy, or a draw after transformers' logits warpers.

First the repetition penalty (transformers' `RepetitionPenaltyLogitsProcessor`, vLLM's
`repetition_penalty`): the logit of every token already in the row (its prompt and the tokens
generated so far) is divided by the penalty where positive, multiplied where negative; it applies
to greedy decoding too. Padding is not part of a row (transformers would also penalise the pad
id of a left-padded row). For sampling the logits then pass through what `transformers`'
`generate` applies, in its order: temperature, top-k, top-p, min-p (each keeping at least one
token), then a categorical draw.
Pure functions of [B, V] float32 logits; which warpers run is static (`Sampling` is hashable,
a field of the compiled program's options), their values too: a run uses one setting.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxpref.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0   # 0: greedy (argmax); > 0: draw from softmax(logits / temperature)
    top_p: float = 1.0         # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0             # keep the k most likely tokens (0: all)
    min_p: float = 0.0         # drop tokens less likely than min_p x the most likely one
    repetition_penalty: float = 1.0   # > 1: tokens already in the row less likely; 1: off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check(self, flag: str = "--") -> Sampling:
        """Itself, or a ConfigError naming the value out of range."""
        for name, ok, want in (("temperature", self.temperature >= 0, ">= 0"),
                               ("top-p", 0 < self.top_p <= 1, "in (0, 1]"),
                               ("top-k", self.top_k >= 0, ">= 0"),
                               ("min-p", 0 <= self.min_p <= 1, "in [0, 1]"),
                               ("repetition-penalty", self.repetition_penalty > 0, "> 0")):
            if not ok:
                value = getattr(self, name.replace("-", "_"))
                raise ConfigError(f"{flag}{name} must be {want}, got {value}")
        return self


def warp(logits: jax.Array, s: Sampling) -> jax.Array:
    """[B, V] float32 -> the logits to draw from, -inf where a warper removed the token."""
    x = logits / jnp.asarray(s.temperature, logits.dtype)
    neg = jnp.asarray(-jnp.inf, x.dtype)
    if 0 < s.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, s.top_k)[0][:, -1:]
        x = jnp.where(x < kth, neg, x)
    if s.top_p < 1.0:
        # transformers: ascending order, drop the tokens whose cumulative probability stays
        # <= 1 - top_p, never the most likely. The kept ones are a suffix: a threshold.
        srt = jnp.sort(x, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
        drop = (cum <= 1.0 - s.top_p).at[:, -1].set(False)
        first_kept = jnp.argmin(drop, axis=-1)[:, None]   # first False
        x = jnp.where(x < jnp.take_along_axis(srt, first_kept, axis=-1), neg, x)
    if s.min_p > 0.0:
        probs = jax.nn.softmax(x, axis=-1)
        x = jnp.where(probs < s.min_p * jnp.max(probs, axis=-1, keepdims=True), neg, x)
    return x


def penalize(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """[B, V] float32 logits, seen [B, V] bool (tokens already in the row) -> the logits with the
    seen tokens' divided by `penalty` where > 0, multiplied where < 0 (transformers' order)."""
    p = jnp.asarray(penalty, logits.dtype)
    return jnp.where(seen, jnp.where(logits < 0, logits * p, logits / p), logits)


def seen_tokens(ids: jax.Array, valid: jax.Array, vocab: int) -> jax.Array:
    """ids [B, T] int32 with valid [B, T] (real tokens) -> [B, V] bool: which tokens each row holds."""
    rows = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)
    cols = jnp.where(valid.astype(bool), ids, vocab)          # padding: out of range, dropped
    return jnp.zeros((ids.shape[0], vocab), bool).at[rows, cols].set(True, mode="drop")


def next_token(logits: jax.Array, key: jax.Array, s: Sampling,
               seen: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """logits [B, V] float32 -> (tokens [B] int32, their log-probs under the model [B] float32:
    log_softmax of the unwarped logits, what a policy-gradient loss scores). `seen` [B, V] bool:
    the rows' tokens so far, read when `s.repetition_penalty` is not 1."""
    x = logits if seen is None or s.repetition_penalty == 1.0 else penalize(logits, seen, s.repetition_penalty)
    if s.greedy:
        tok = jnp.argmax(x, axis=-1)
    else:
        tok = jax.random.categorical(key, warp(x, s), axis=-1)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
    return tok.astype(jnp.int32), logp

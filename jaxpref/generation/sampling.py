"""The next token from the logits: greedy, or a draw after transformers' logits warpers.

For sampling the logits pass through what `transformers`' `generate` applies, in its order:
temperature, top-k, top-p, min-p (each keeping at least one token), then a categorical draw.
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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check(self, flag: str = "--") -> Sampling:
        """Itself, or a ConfigError naming the value out of range."""
        for name, ok, want in (("temperature", self.temperature >= 0, ">= 0"),
                               ("top-p", 0 < self.top_p <= 1, "in (0, 1]"),
                               ("top-k", self.top_k >= 0, ">= 0"),
                               ("min-p", 0 <= self.min_p <= 1, "in [0, 1]")):
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


def next_token(logits: jax.Array, key: jax.Array, s: Sampling) -> tuple[jax.Array, jax.Array]:
    """logits [B, V] float32 -> (tokens [B] int32, their log-probs under the model [B] float32:
    log_softmax of the unwarped logits, what a policy-gradient loss scores)."""
    if s.greedy:
        tok = jnp.argmax(logits, axis=-1)
    else:
        tok = jax.random.categorical(key, warp(logits, s), axis=-1)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
    return tok.astype(jnp.int32), logp

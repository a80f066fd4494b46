"""The key/value cache of autoregressive decoding: every layer's keys and values by cache slot.

A generation call gives each row S = prompt bucket + new tokens slots. The prompt is left-padded
into slots [0, P) (padding is segment 0 of the cache's `MaskInfo`, so no query sees it), and the
new tokens take slots P, P + 1, ... for every row at once: one write index for the whole batch,
and each row's positions count from its first real token (`generation.engine`).

Why the cache enters the decoder whole rather than layer by layer through the layer scan: a
scanned-over cache comes back out of `nn.scan` as a new stacked array, a copy of the whole cache
per token. Here each layer reads its slice of the broadcast cache and only the T new keys and
values leave the scan; `advance` writes them once for all layers ([L, B, T, K, H], in place
inside a while loop).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "index"], meta_fields=[])
@dataclasses.dataclass
class KVCache:
    """k, v: [L, B, S, K, H] compute dtype (layers, rows, slots, key/value heads, head dim);
    index: int32 scalar, the slot of the first token of the next decoder call."""
    k: jax.Array
    v: jax.Array
    index: jax.Array

    @classmethod
    def zeros(cls, args, batch: int, slots: int) -> KVCache:
        """An empty cache for the architecture `args` (`ArchArgs`): `batch` rows of `slots` slots."""
        shape = (args.num_layers, batch, slots, args.spec().attn.kv_heads, args.head_dim)
        return cls(jnp.zeros(shape, args.dtype), jnp.zeros(shape, args.dtype), jnp.zeros((), jnp.int32))

    def layer(self, layer, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Layer `layer`'s keys and values [B, S, K, H] with this call's k, v [B, T, K, H] written
        at slots [index, index + T)."""
        def one(cache, new):
            mine = jax.lax.dynamic_index_in_dim(cache, layer, 0, keepdims=False)
            return jax.lax.dynamic_update_slice_in_dim(mine, new.astype(mine.dtype), self.index, axis=1)
        return one(self.k, k), one(self.v, v)

    def advance(self, k: jax.Array, v: jax.Array) -> KVCache:
        """The cache with every layer's new k, v [L, B, T, K, H] written at `index`, and `index`
        moved past them."""
        t = k.shape[2]
        put = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype),
                                                                   self.index, axis=2)
        return KVCache(put(self.k, k), put(self.v, v), self.index + t)

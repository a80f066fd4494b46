"""KV-cached autoregressive decoding for every architecture, through the one `blocks.Decoder`.

`decode` is the pure, jittable core: left-padded prompt ids [B, P] -> completion ids [B, N] and
their log-probs. It prefills the prompts into a `KVCache` of S = P + N slots in one decoder call,
then runs one decoder call per new token inside a `lax.while_loop` that stops when every row has
produced an end-of-sequence id (or N tokens). One compiled program per (B, P, N, options).

`Generator` is the host side: token lists of any lengths -> batches of fixed shape (prompt
lengths rounded up to a bucket, the last batch filled with dummy rows), so that a run compiles a
few programs however many prompts it has; optionally data-parallel over a mesh.

Rows are left-padded: every row writes its new token at the same cache slot (one dynamic index
for the batch), and each row's positions count from its own first real token, which is what
`transformers` does with a left-padded batch and an attention mask.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.generation.sampling import Sampling, next_token, seen_tokens
from jaxpref.models.attention import MaskInfo
from jaxpref.models.kv_cache import KVCache
from jaxpref.models.layers import matmul
from jaxpref.objectives.head import capped_logits


@dataclass(frozen=True)
class DecodeOptions:
    """What the compiled program is specialised on (hashable: a static argument)."""
    max_new_tokens: int
    sampling: Sampling = Sampling()
    eos_ids: tuple[int, ...] = ()   # any of them ends a row (it is kept as the row's last token)
    pad_id: int = 0                 # fills the tokens after a row's end


@functools.partial(jax.tree_util.register_dataclass, data_fields=["tokens", "lengths", "logprobs"],
                   meta_fields=[])
@dataclass
class Completions:
    """tokens [B, N] int32 (pad_id after each row's end), lengths [B] int32 (tokens generated, the
    end-of-sequence id included), logprobs [B, N] float32 (each token's log-prob under the model,
    0 after the end)."""
    tokens: jax.Array
    lengths: jax.Array
    logprobs: jax.Array


def cache_layout(lengths: jax.Array, prompt_len: int, slots: int) -> MaskInfo:
    """lengths [B] int32, the real tokens of each left-padded prompt of `prompt_len` -> the cache's
    slots [B, slots]: left padding is segment 0, and position p of a row sits at slot
    prompt_len - length + p (its prompt, then its new tokens)."""
    first = (prompt_len - lengths)[:, None]
    slot = jnp.arange(slots, dtype=jnp.int32)[None]
    valid = (slot >= first).astype(jnp.int32)
    return MaskInfo(valid, jnp.zeros_like(valid), jnp.maximum(slot - first, 0), shared_prompt=False)


def decode(bundle, params, lora, prompt_ids: jax.Array, lengths: jax.Array, key: jax.Array,
           opts: DecodeOptions, batch_sharding=None) -> Completions:
    """prompt_ids [B, P] int32 left-padded, lengths [B] int32 (real prompt tokens, >= 1), key: a
    PRNG key (unused when greedy) -> `Completions` of N = opts.max_new_tokens.

    `params` as `bundle.runtime_params` gives them; `lora` the adapter tree or None (the base
    model: the same weights, no copy). `batch_sharding` (a NamedSharding of the row axis) keeps
    the cache split over data-parallel devices. The bundle's args should have dropout off."""
    b, p = prompt_ids.shape
    n = opts.max_new_tokens
    info = cache_layout(lengths, p, p + n)
    cache = KVCache.zeros(bundle.args, b, p + n)
    if batch_sharding is not None:
        cache = jax.lax.with_sharding_constraint(cache, _cache_sharding(batch_sharding))
    head = bundle.head(params)

    def forward(ids, cache):
        """ids [B, T] at cache slots [cache.index, + T) -> (next-token logits [B, V] f32, cache)."""
        pos = jax.lax.dynamic_slice_in_dim(info.positions, cache.index, ids.shape[1], axis=1)
        hidden, cache = bundle.hidden(params, lora, ids, pos, info, cache=cache)
        a = bundle.args
        logits = matmul("bd,dv->bv", hidden[:, -1], head, a.dtype, jnp.float32, a.matmul_precision)
        return capped_logits(logits, a.spec().final_logit_softcap), cache

    eos = jnp.asarray(opts.eos_ids or (-1,), jnp.int32)
    logits, cache = forward(prompt_ids, cache)
    seen = None                 # [B, V] tokens in each row, for the repetition penalty
    if opts.sampling.repetition_penalty != 1.0:
        seen = seen_tokens(prompt_ids, jnp.arange(p)[None] >= (p - lengths)[:, None], logits.shape[-1])
    tok, lp = next_token(logits, jax.random.fold_in(key, 0), opts.sampling, seen)
    done = jnp.isin(tok, eos)
    tokens = jnp.full((b, n), opts.pad_id, jnp.int32).at[:, 0].set(tok)
    logps = jnp.zeros((b, n), jnp.float32).at[:, 0].set(lp)
    lens = jnp.ones((b,), jnp.int32)

    def cond(state):
        step, _, done, *_ = state
        return (step < n) & ~jnp.all(done)

    def body(state):
        step, tok, done, cache, tokens, logps, lens, seen = state
        logits, cache = forward(tok[:, None], cache)
        if seen is not None:
            seen = seen.at[jnp.arange(b), tok].set(True)
        new, lp = next_token(logits, jax.random.fold_in(key, step), opts.sampling, seen)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, jnp.where(done, opts.pad_id, new)[:, None], step, 1)
        logps = jax.lax.dynamic_update_slice_in_dim(logps, jnp.where(done, 0.0, lp)[:, None], step, 1)
        lens = lens + (~done).astype(jnp.int32)
        return step + 1, new, done | jnp.isin(new, eos), cache, tokens, logps, lens, seen

    state = (jnp.int32(1), tok, done, cache, tokens, logps, lens, seen)
    _, _, _, _, tokens, logps, lens, _ = jax.lax.while_loop(cond, body, state)
    return Completions(tokens, lens, logps)


def _cache_sharding(batch_sharding):
    """The row axis (1) of the cache's [L, B, S, K, H] arrays split as the batch is."""
    from jax.sharding import NamedSharding, PartitionSpec

    rows = batch_sharding.spec[0] if len(batch_sharding.spec) else None
    kv = NamedSharding(batch_sharding.mesh, PartitionSpec(None, rows))
    return KVCache(kv, kv, NamedSharding(batch_sharding.mesh, PartitionSpec()))


def bucket(length: int, smallest: int = 16) -> int:
    """Prompt lengths rounded up to a power of two (at least `smallest`): at most twice the
    tokens, a handful of compiled shapes."""
    return max(smallest, 1 << max(0, length - 1).bit_length())


@dataclass
class Completion:
    """One prompt's result on the host: ids (end-of-sequence id included, if reached) and their
    log-probs."""
    ids: list[int]
    logprobs: list[float]


@dataclass
class Generator:
    """Compiled decoding over token lists of any length: fixed-shape batches, one compiled program
    per (prompt bucket, adapter on/off, options). `compiles` counts them.

    bundle: a `ModelBundle` (its `lora_scale` the adapter's); params: `bundle.runtime_params`;
    mesh: data parallel over the prompts (params and LoRA replicated, rows split over the
    `data` and `fsdp` axes); batch_size: rows per compiled call (rounded up to the mesh's
    data-parallel size)."""
    bundle: object
    params: dict
    mesh: object = None
    batch_size: int = 8
    compiles: int = 0
    _fn: object = field(default=None, repr=False)

    def __post_init__(self):
        self.bundle = self.bundle.with_args(recompute_activations=False, gradient_checkpointing=False,
                                            deterministic=True, lora_dropout=0.0)
        self._rows = None
        if self.mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            from jaxpref.runtime.mesh import replicated

            dp = self._dp()
            self.batch_size = -(-self.batch_size // dp) * dp
            self._rows = NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))
            self.params = jax.device_put(self.params, replicated(self.mesh))
        self._fn = jax.jit(self._traced, static_argnames=("opts",))

    def _traced(self, params, lora, ids, lengths, key, opts):
        self.compiles += 1   # the body runs once per trace, i.e. per compilation
        return decode(self.bundle, params, lora, ids, lengths, key, opts, self._rows)

    def generate(self, prompts: list[list[int]], opts: DecodeOptions, lora=None, seed: int = 0
                 ) -> list[Completion]:
        """Token lists (each non-empty) -> one `Completion` per prompt, in order. Prompts are
        batched by length; batch i draws with key fold_in(PRNGKey(seed), i)."""
        if lora is not None and self.mesh is not None:
            from jaxpref.runtime.mesh import replicated
            lora = jax.device_put(lora, replicated(self.mesh))
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        rows = min(self.batch_size, -(-len(prompts) // self._dp()) * self._dp())
        out: list[Completion | None] = [None] * len(prompts)
        for i, start in enumerate(range(0, len(order), rows)):
            idx = order[start:start + rows]
            ids, lengths = left_pad([prompts[j] for j in idx], rows, opts.pad_id)
            if self._rows is not None:
                ids, lengths = jax.device_put((ids, lengths), self._rows)
            key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
            res = jax.device_get(self._fn(self.params, lora, ids, lengths, key, opts))
            for k, j in enumerate(idx):
                m = int(res.lengths[k])
                out[j] = Completion(res.tokens[k, :m].tolist(), res.logprobs[k, :m].tolist())
        return out

    def _dp(self) -> int:
        if self.mesh is None:
            return 1
        from jaxpref.runtime.mesh import data_parallel_size
        return data_parallel_size(self.mesh)


def left_pad(prompts: list[list[int]], rows: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids [rows, bucket] int32 left-padded, lengths [rows] int32); rows beyond
    the prompts are dummies of one pad token, whose results are dropped."""
    p = bucket(max(len(x) for x in prompts))
    ids = np.full((rows, p), pad_id, np.int32)
    lengths = np.ones((rows,), np.int32)
    for r, x in enumerate(prompts):
        ids[r, p - len(x):] = x
        lengths[r] = len(x)
    return ids, lengths

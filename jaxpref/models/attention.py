"""One attention function, three backends, every layout, and no [T, T] array where it matters.

The model calls `attention(q, k, v, info, backend=training.attention, precision=...)` once per
layer (`blocks.Attention`); the step builds `info` from its batch (`MaskInfo.from_batch`).
On a mesh the flash kernel runs inside `jax.shard_map` over the batch axes (XLA does not
partition custom kernels). `uv sync --extra flash` installs the kernels (tokamax, pinned);
without them `auto` is XLA.

The description (`MaskInfo`) is what the batches already carry, per token: `segment_ids` (0 =
padding), `branch` (0 = seen by the whole segment, 1/2 = chosen/rejected branch of a shared
prompt) and `positions`, plus the sliding window and, for padding-free streams, the block
gather (`blk_idx`, `blk_back`). The window is a number, or under `nn.scan` a traced int32 scalar
(each layer its own: `NO_WINDOW` for a layer without one), so one compiled layer serves
windowed and full layers. Query i sees key j when both are in the same segment, j <= i,
j is shared or on i's branch, and pos_i - pos_j < window; a padding query sees only itself.
That is `step.attention_mask` + `layers.sliding_window`, and `dense_mask` rebuilds it exactly.

Gemma 2's attention-logit soft-cap (`softcap`: tanh(s / cap) * cap of the scaled scores before the
mask) reaches every backend: the XLA paths write the softmax out (jax.nn.dot_product_attention takes
no cap), tokamax takes it as `logits_soft_cap`.

Backends:
- "xla": the dense mask and `jax.nn.dot_product_attention`, today's numbers bit for bit. Holds
  [rows, heads, T, S] fp32 scores: for short rows only.
- "xla_chunked": the same math over blocks of `chunk` queries (`lax.map`, each block
  rematerialised), so neither the forward nor the backward holds more than one block's scores.
- "flash": tokamax's flash kernels through causal calls (`jaxpref.models.flash`, which says how
  the shared prompt's rejected branch is served and why).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jaxpref.models.flash import flash, tokamax
from jaxpref.models.layers import upcast_on_cpu

BACKENDS = ("auto", "xla", "xla_chunked", "flash")
CHUNK = 512                      # queries per block of the chunked path
CHUNK_ABOVE_BYTES = 128 << 20    # auto: chunk when one call's fp32 scores would exceed this
# A window that excludes no key: what a full-attention layer reads under `nn.scan` when other
# layers have a sliding window (the window is then a traced value, not a Python choice).
NO_WINDOW = 2**31 - 1


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["segment_ids", "branch", "positions", "blk_idx", "blk_back", "window"],
                   meta_fields=["shared_prompt"])
@dataclasses.dataclass
class MaskInfo:
    """Who attends to whom, per token. segment_ids, branch, positions: [B, T] int32 (B rows or
    padding-free streams of T tokens). blk_idx: [B, blocks * Tb] int32 (-1: empty slot) and
    blk_back: [B, T] int32 for padding-free streams (see `layers.AttnBlocks`), else None.
    blk_idx's static shape is [B, blocks, Tb]. window: None (no window), an int, or an int32
    scalar array (a per-layer window read under `nn.scan`; NO_WINDOW: none). `shared_prompt`
    False promises that no segment holds branch-2 tokens after branch-1 tokens (it saves flash
    its second call)."""
    segment_ids: jax.Array
    branch: jax.Array
    positions: jax.Array
    blk_idx: jax.Array | None = None
    blk_back: jax.Array | None = None
    window: int | jax.Array | None = None
    shared_prompt: bool = True

    @classmethod
    def from_batch(cls, mb) -> MaskInfo:
        """From a micro-batch (`jaxpref.data.batches`: `Batch`, or `StreamBatch` with its blocks)."""
        return cls(mb.segment_ids, mb.branch, mb.positions, getattr(mb, "blk_idx", None),
                   getattr(mb, "blk_back", None), None, mb.layout.shares_prompt)

    @classmethod
    def rows(cls, valid, positions=None) -> MaskInfo:
        """Plain causal rows, one sequence each: `valid` [B, T] (1 = real token, 0 = padding),
        `positions` [B, T] (default: each real token's index among the real ones)."""
        valid = jnp.asarray(valid, jnp.int32)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        return cls(valid, jnp.zeros_like(valid), jnp.asarray(positions, jnp.int32), shared_prompt=False)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, info: MaskInfo, backend: str = "auto",
              precision: str | None = None, chunk: int = CHUNK, mesh=None,
              batch_axes: tuple[str, ...] = ("data", "fsdp"), flash_impl: tuple[str, ...] | None = None,
              softcap: float | None = None) -> jax.Array:
    """q [B,T,N,H], k/v [B,T,K,H] (grouped-query when K < N, N % K == 0) -> [B,T,N,H] q.dtype.

    `backend`: auto | xla | xla_chunked | flash (`choose_backend`). `precision` for fp32 inputs:
    None (XLA's default, today's path), "highest" (true fp32 products on GPU) or "tf32".
    `flash_impl` overrides the tokamax implementations tried in order (names of
    `tokamax...attention.api.IMPLEMENTATIONS` or op objects; tests: ("xla",), its reference).
    `softcap`: scores s = q.k / sqrt(H) become tanh(s / softcap) * softcap before the mask and
    the softmax (Gemma 2's attention-logit soft-cap), in every backend."""
    if info.blk_idx is not None:
        return _in_blocks(q, k, v, info, backend, precision, chunk, mesh, batch_axes, flash_impl, softcap)
    rows, t, n, _ = q.shape
    if backend == "auto":   # by one device's rows: what its memory holds (and the dry run and memory plan count)
        shards = math.prod(mesh.shape[a] for a in batch_axes if a in mesh.axis_names) if mesh is not None else 1
        backend = choose_backend("auto", jax.default_backend(), q.dtype, max(rows // shards, 1), t, t, n)
    if backend == "xla":
        return _with_precision(precision, q.dtype, _dense, q, k, v, info, softcap)
    if backend == "xla_chunked":
        return _with_precision(precision, q.dtype, _chunked, q, k, v, info, chunk, softcap)
    if backend == "flash":
        return flash(q, k, v, info, precision, mesh, batch_axes, flash_impl, softcap)
    raise ValueError(f"training.attention: unknown backend `{backend}` (one of {', '.join(BACKENDS)})")


def choose_backend(setting: str, platform: str, dtype, rows: int, t: int, s: int, heads: int) -> str:
    """The backend for `training.attention` on `platform` (jax.default_backend()) for one call of
    `rows` x `heads` queries [t] over keys [s]. auto: flash for bf16/f16 on GPUs when tokamax is
    installed; otherwise XLA, chunked once the call's fp32 scores would pass CHUNK_ABOVE_BYTES (so
    short rows keep today's path). fp32 stays on XLA on GPUs too: tokamax's exact-fp32 kernel
    (Triton, no tensor cores) ran 8x slower than XLA's fp32 attention on an H100 (94 vs 12 ms,
    2 rows of 4,096 tokens, fwd+bwd). TPU: tokamax's kernel there takes no per-query intervals."""
    if setting not in BACKENDS:
        raise ValueError(f"training.attention: unknown backend `{setting}` (one of {', '.join(BACKENDS)})")
    if setting == "flash" and platform == "tpu":
        raise ValueError("training.attention: flash is not available on TPU (its kernel takes no "
                         "per-query key intervals); use auto, xla or xla_chunked")
    if setting != "auto":
        return setting
    if platform in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) \
            and tokamax() is not None:
        return "flash"
    scores = 4 * rows * heads * t * s
    return "xla_chunked" if scores > CHUNK_ABOVE_BYTES and t > CHUNK else "xla"


def dense_mask(info: MaskInfo) -> jax.Array:
    """[B, T, T] bool, `step.attention_mask` (with `layers.sliding_window`) of rows without blocks."""
    idx = jnp.broadcast_to(jnp.arange(info.segment_ids.shape[1]), info.segment_ids.shape)
    tok = (info.segment_ids, info.branch, info.positions, idx)
    return _rule(tok, tok, info.window)


def _rule(qt: tuple, kt: tuple, window) -> jax.Array:
    """Queries (seg, branch, pos, index) [B, Tq] x keys [B, S] -> allowed [B, Tq, S] bool."""
    (qs, qb, qp, qi), (ks, kb, kp, ki) = [[a[:, :, None] for a in qt], [a[:, None, :] for a in kt]]
    allowed = (qs == ks) & (ks > 0) & (ki <= qi) & ((kb == 0) | (kb == qb))
    allowed = allowed | (ki == qi)  # padding queries see themselves: a finite softmax
    if window is not None:
        allowed = allowed & ((qp - kp) < window)
    return allowed


def _dense(q, k, v, info: MaskInfo, softcap: float | None = None) -> jax.Array:
    """Today's `layers._attend`: one [B, N, T, S] softmax through jax.nn.dot_product_attention."""
    return _softmax_attention(q, k, v, dense_mask(info)[:, None], softcap)


def _softmax_attention(q, k, v, mask, softcap: float | None) -> jax.Array:
    """q [B, T, N, H], k/v [B, S, K, H], mask [B, 1, T, S] bool -> [B, T, N, H] q.dtype.
    Without a soft-cap, jax.nn.dot_product_attention; with one (which it does not take), the same
    steps written out: fp32 scores scaled by 1/sqrt(H), capped, masked, an fp32 softmax."""
    dtype = q.dtype
    if upcast_on_cpu(dtype):
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    if softcap is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask).astype(dtype)
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)                       # query heads grouped by their K/V head
    s = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    s = s * jnp.asarray(1.0 / math.sqrt(h), jnp.float32)
    s = jnp.tanh(s / softcap) * softcap
    s = jnp.where(mask[:, :, None], s, jnp.finfo(jnp.float32).min)   # [B, 1, 1, T, S] over K, G
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", p, v).reshape(b, t, n, h).astype(dtype)


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, info: MaskInfo, start: jax.Array,
                    precision: str | None = None, softcap: float | None = None) -> jax.Array:
    """Generation (`kv_cache.KVCache`): q [B, T, N, H] are the tokens in cache slots
    [start, start + T) (`start` int32 scalar), k/v [B, S, K, H] the whole cache with them written,
    and `info` describes the S slots (segment 0: left padding; positions). The rule is `dense_mask`'s
    with the queries' slots as their indices, so slots not yet written (after the query) are never
    seen. XLA's dense path: [B, N, T, S] scores, T = 1 per decoding step."""
    t = q.shape[1]
    idx = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), info.segment_ids.shape)
    keys = (info.segment_ids, info.branch, info.positions, idx)
    queries = tuple(jax.lax.dynamic_slice_in_dim(a, start, t, axis=1) for a in keys)
    mask = _rule(queries, keys, info.window)[:, None]
    return _with_precision(precision, q.dtype, _softmax_attention, q, k, v, mask, softcap)


def _chunked(q, k, v, info: MaskInfo, chunk: int, softcap: float | None = None) -> jax.Array:
    """`_dense` over blocks of `chunk` queries: each block's mask [B, c, S] and scores
    [B, N, c, S] exist one block at a time, in the forward and (rematerialised) in the backward.
    Each query's softmax still runs over all its keys at once, as in `_dense`."""
    rows, t = q.shape[:2]
    if t <= chunk:
        return _dense(q, k, v, info, softcap)
    nc = -(-t // chunk)
    pad = nc * chunk - t
    idx = jnp.broadcast_to(jnp.arange(t), (rows, t))
    keys = (info.segment_ids, info.branch, info.positions, idx)
    # Padded queries get segment 0 and an index past the row: they see key 0 only (finite).
    qtok = [jnp.pad(a, ((0, 0), (0, pad))) for a in keys]
    qtok[3] = jnp.where(jnp.arange(nc * chunk) < t, qtok[3], 0)
    split = lambda x: jnp.moveaxis(x.reshape(rows, nc, chunk, *x.shape[2:]), 1, 0)
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))

    @jax.checkpoint
    def block(args):
        qb, *tok = args
        return _softmax_attention(qb, k, v, _rule(tuple(tok), keys, info.window)[:, None], softcap)

    out = jax.lax.map(block, (split(qp), *[split(a) for a in qtok]))
    return jnp.moveaxis(out, 0, 1).reshape(rows, nc * chunk, *q.shape[2:])[:, :t]


def _with_precision(precision, dtype, f, *args):
    if precision is None or jnp.dtype(dtype) != jnp.float32:
        return f(*args)
    name = {"highest": "highest", "tf32": "tensorfloat32"}[precision]
    with jax.default_matmul_precision(name):
        return f(*args)


def _in_blocks(q, k, v, info: MaskInfo, *rest) -> jax.Array:
    """Padding-free streams [R, L]: gather each original row's tokens into its block of Tb slots,
    attend block by block (rows of Tb), put the outputs back in stream order."""
    blocks, inner = block_rows(info)
    out = attention(blocks(q), blocks(k), blocks(v), inner, *rest)
    out = out.reshape(q.shape[0], -1, *out.shape[2:])
    return jnp.take_along_axis(out, info.blk_back[:, :, None, None], axis=1)


def block_rows(info: MaskInfo):
    """A padding-free description -> (gather: stream array [R, L, ...] -> block rows
    [R * blocks, Tb, ...], the blocks' own MaskInfo without blocks)."""
    r, tb = info.blk_idx.shape[0], info.blk_idx.shape[-1]
    flat = info.blk_idx.reshape(r, -1)
    ok = flat >= 0
    at = jnp.maximum(flat, 0)
    take = lambda x: jnp.take_along_axis(x, at.reshape(at.shape + (1,) * (x.ndim - 2)), axis=1)
    blocks = lambda x: take(x).reshape(-1, tb, *x.shape[2:])
    # Empty slots are padding (segment 0); their positions are never read.
    seg = jnp.where(ok, take(info.segment_ids), 0).reshape(-1, tb)
    br = jnp.where(ok, take(info.branch), 0).reshape(-1, tb)
    return blocks, MaskInfo(seg, br, blocks(info.positions), None, None, info.window, info.shared_prompt)

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

Backends:
- "xla": the dense mask and `jax.nn.dot_product_attention`, today's numbers bit for bit. Holds
  [rows, heads, T, S] fp32 scores: for short rows only.
- "xla_chunked": the same math over blocks of `chunk` queries (`lax.map`, each block
  rematerialised), so neither the forward nor the backward holds more than one block's scores.
- "flash": tokamax's flash kernels (Mosaic GPU on Hopper for bf16, Pallas-Triton otherwise and
  for exact fp32, which is slow: `auto` keeps fp32 on XLA). They take one key interval
  [k_start, k_end) per query, nothing else dense.
  Every layout here is one interval per query except the rejected branch of a shared prompt
  (prompt, then a gap where the chosen branch sits, then itself). The keys are therefore read
  through a gather `kv_src` of 2T slots: the row as it is, then the row without its branch-1
  tokens, where [prompt | rejected] is contiguous; rejected queries take their interval there.
  This costs a K/V gather of 2T slots (K/V heads only, cheap under GQA) and its scatter-add in
  the backward; queries and outputs stay in place, and the window still maps to an interval
  because positions increase along every interval. (Reordering the row as [reversed chosen |
  prompt | rejected] would need no gather but breaks windows; two calls merged by their
  log-sum-exp need the kernel's residuals to be differentiable, which tokamax's VJP refuses.)
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

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
    its second K/V copy)."""
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
              batch_axes: tuple[str, ...] = ("data", "fsdp"), flash_impl: tuple[str, ...] | None = None
              ) -> jax.Array:
    """q [B,T,N,H], k/v [B,T,K,H] (grouped-query when K < N, N % K == 0) -> [B,T,N,H] q.dtype.

    `backend`: auto | xla | xla_chunked | flash (`choose_backend`). `precision` for fp32 inputs:
    None (XLA's default, today's path), "highest" (true fp32 products on GPU) or "tf32".
    `flash_impl` overrides the tokamax implementations tried in order (names of
    `tokamax...attention.api.IMPLEMENTATIONS` or op objects; tests: ("xla",), its reference)."""
    if info.blk_idx is not None:
        return _in_blocks(q, k, v, info, backend, precision, chunk, mesh, batch_axes, flash_impl)
    rows, t, n, _ = q.shape
    if backend == "auto":
        backend = choose_backend("auto", jax.default_backend(), q.dtype, rows, t, t, n)
    if backend == "xla":
        return _with_precision(precision, q.dtype, _dense, q, k, v, info)
    if backend == "xla_chunked":
        return _with_precision(precision, q.dtype, _chunked, q, k, v, info, chunk)
    if backend == "flash":
        return _flash(q, k, v, info, precision, mesh, batch_axes, flash_impl)
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
            and _tokamax() is not None:
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


def _dense(q, k, v, info: MaskInfo) -> jax.Array:
    """Today's `layers._attend`: one [B, N, T, S] softmax through jax.nn.dot_product_attention."""
    return _masked(q, k, v, dense_mask(info)[:, None])


def _masked(q, k, v, mask) -> jax.Array:
    """q [B, T, N, H], k/v [B, S, K, H], mask [B, 1, T, S] bool -> [B, T, N, H] q.dtype."""
    if upcast_on_cpu(q.dtype):
        f = jnp.float32
        return jax.nn.dot_product_attention(q.astype(f), k.astype(f), v.astype(f), mask=mask).astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, info: MaskInfo, start: jax.Array,
                    precision: str | None = None) -> jax.Array:
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
    return _with_precision(precision, q.dtype, _masked, q, k, v, mask)


def _chunked(q, k, v, info: MaskInfo, chunk: int) -> jax.Array:
    """`_dense` over blocks of `chunk` queries: each block's mask [B, c, S] and scores
    [B, N, c, S] exist one block at a time, in the forward and (rematerialised) in the backward.
    Each query's softmax still runs over all its keys at once, as in `_dense`."""
    rows, t = q.shape[:2]
    if t <= chunk:
        return _dense(q, k, v, info)
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
        mask = _rule(tuple(tok), keys, info.window)[:, None]
        if upcast_on_cpu(q.dtype):
            f = jnp.float32
            return jax.nn.dot_product_attention(qb.astype(f), k.astype(f), v.astype(f),
                                                mask=mask).astype(q.dtype)
        return jax.nn.dot_product_attention(qb, k, v, mask=mask)

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


def key_intervals(info: MaskInfo) -> tuple[jax.Array | None, jax.Array, jax.Array]:
    """Rows without blocks -> (kv_src [B, S] int32 or None, start [B, T], end [B, T] int32):
    query i of row b attends to key slots [start, end) of the keys gathered by kv_src (slot j
    holds token kv_src[b, j] of the row; None: the row itself, S = T). Exactly `dense_mask`,
    given that each segment is one run of tokens ordered [shared | branch 1 | branch 2] and
    positions increase along each query's keys (what `jaxpref.data.layouts` builds)."""
    seg, br, pos = info.segment_ids, info.branch, info.positions
    rows, t = seg.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (rows, t))
    start = jnp.where(seg > 0, _run_start(seg), idx)
    end = idx + 1
    kv_src, kv_pos = None, pos
    if info.shared_prompt:
        keep = br != 1
        order = jnp.argsort(~keep, axis=1, stable=True).astype(jnp.int32)  # kept tokens first
        rank = jnp.cumsum(keep, axis=1, dtype=jnp.int32) - 1                # slot in the copy
        seg2 = jnp.where(jnp.arange(t) < keep.sum(1, keepdims=True),
                         jnp.take_along_axis(seg, order, axis=1), -1)
        start2 = jnp.take_along_axis(_run_start(seg2), jnp.maximum(rank, 0), axis=1)
        rejected = (br == 2) & (seg > 0)
        start = jnp.where(rejected, t + start2, start)
        end = jnp.where(rejected, t + rank + 1, end)
        kv_src = jnp.concatenate([idx, order], axis=1)
        kv_pos = jnp.take_along_axis(pos, kv_src, axis=1)
    if info.window is not None:
        start = _window_start(kv_pos, start, end, pos, info.window)
    return kv_src, start, end


def _run_start(seg: jax.Array) -> jax.Array:
    """[B, T] -> index where each token's run of equal values starts."""
    t = seg.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    new = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(new, idx, 0), axis=1)


def _window_start(kv_pos, lo, hi, q_pos, window) -> jax.Array:
    """First key slot j in [lo, hi) with q_pos - kv_pos[j] < window (kv_pos increasing there;
    hi - 1, the query itself, always qualifies). Binary search, all queries at once."""
    steps = max(1, math.ceil(math.log2(kv_pos.shape[1] + 1)))

    def step(_, bounds):
        a, b = bounds
        mid = (a + b) // 2
        far = (q_pos - jnp.take_along_axis(kv_pos, mid, axis=1)) >= window
        return jnp.where(far, mid + 1, a), jnp.where(far, b, mid)

    return jax.lax.fori_loop(0, steps, step, (lo, hi - 1))[0]


def _tokamax():
    """tokamax's attention (api, base) modules, or None where it is not installed."""
    try:
        from tokamax._src.ops.attention import api, base
    except ImportError:
        return None
    return api, base


def _flash(q, k, v, info: MaskInfo, precision, mesh, batch_axes, impl) -> jax.Array:
    tk = _tokamax()
    if tk is None:
        raise ValueError("training.attention: flash needs tokamax (uv sync --extra flash)")
    impl = impl or _flash_impl(jax.default_backend(), q.dtype)
    preset = _preset(q.dtype, precision)

    def call(q, k, v, seg, br, pos, window=None):
        kv_src, start, end = key_intervals(MaskInfo(seg, br, pos, None, None, window, info.shared_prompt))
        if kv_src is not None:
            k = jnp.take_along_axis(k, kv_src[:, :, None, None], axis=1)
            v = jnp.take_along_axis(v, kv_src[:, :, None, None], axis=1)
        mask = tk[1].Mask(k_start=start[:, None, :], k_end=end[:, None, :])
        errors = []
        for name in impl:
            op = tk[0].IMPLEMENTATIONS[name] if isinstance(name, str) else name
            try:
                return op(q, k, v, mask=mask, precision=preset)
            except NotImplementedError as e:  # this kernel refuses the shape/dtype: the next one
                errors.append(f"{name}: {e}")
        raise ValueError("training.attention: no flash kernel takes this call (" + "; ".join(errors) + ")")

    args = (q, k, v, info.segment_ids, info.branch, info.positions)
    if mesh is None:
        return call(*args, info.window)
    spec = jax.sharding.PartitionSpec(tuple(a for a in batch_axes if a in mesh.axis_names))
    # A traced (per-layer) window enters the per-shard function as an argument, replicated.
    window = () if info.window is None else (jnp.asarray(info.window, jnp.int32),)
    specs = (spec,) * 6 + (jax.sharding.PartitionSpec(),) * len(window)
    return jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)(*args, *window)


def _flash_impl(platform: str, dtype) -> tuple[str, ...]:
    """tokamax implementations to try in order: Mosaic GPU (Hopper/Blackwell, bf16/f16 products
    only) then Pallas-Triton (any recent GPU, and exact fp32); its XLA reference elsewhere."""
    if platform in ("gpu", "cuda", "rocm"):
        return ("triton",) if jnp.dtype(dtype) == jnp.float32 else ("mosaic_gpu", "triton")
    return ("xla",)


def _preset(dtype, precision):
    p = jax.lax.DotAlgorithmPreset
    if jnp.dtype(dtype) == jnp.float32:
        return p.TF32_TF32_F32 if precision == "tf32" else p.F32_F32_F32
    return p.BF16_BF16_F32 if jnp.dtype(dtype) == jnp.bfloat16 else p.F16_F16_F32

"""The flash backend of `jaxpref.models.attention`: tokamax's kernels through causal calls.

tokamax's flash kernels (Mosaic GPU on Hopper for bf16, Pallas-Triton otherwise and
for exact fp32, which is slow: `auto` keeps fp32 on XLA). They take causal masks (key j <= query
i) with a first key per query, k_start, nothing else dense; causal matters beyond the mask:
tokamax's Mosaic GPU backward skips the key tiles past the diagonal only for a causal mask
(with k_start/k_end intervals alone it visits every key tile of every query tile).
Every layout is causal from one k_start per query except the rejected branch of a shared
prompt (prompt, then a gap where the chosen branch sits, then itself). `causal_runs` therefore
makes two causal calls: the row as it is (its rejected queries see only themselves and are
dropped), and the row permuted to [shared and branch-2 tokens | branch-1 tokens] (`order`),
where [prompt | rejected] is contiguous: its rejected queries' outputs are kept. Queries,
keys and outputs travel through permutations whose backward is a gather by the inverse. The
backward visits T^2/2 query x key slots per call, T^2 in all (one call over the 2T key slots
of a gathered second K/V copy, the layout before this one, visited 2T^2), and the window
still maps to k_start because positions increase along every query's keys. (Reordering the
row as [reversed chosen | prompt | rejected] is not causal; two calls merged by their
log-sum-exp need the kernel's residuals to be differentiable, which tokamax's VJP refuses.)
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["start", "order", "back", "start2", "second"], meta_fields=[])
@dataclasses.dataclass
class CausalRuns:
    """The flash path's causal calls for rows without blocks (`causal_runs`). Call 1: the row,
    query i sees keys [start[i], i]. Call 2 (shared prompts only, else all None): the row
    permuted by `order` (slot s holds token order[s]; `back` is its inverse), query slot s sees
    key slots [start2[s], s]; `second` [B, T] marks the tokens whose output comes from call 2."""
    start: jax.Array
    order: jax.Array | None = None
    back: jax.Array | None = None
    start2: jax.Array | None = None
    second: jax.Array | None = None


def causal_runs(seg, br, pos, window=None, shared_prompt: bool = True) -> CausalRuns:
    """Rows without blocks (segment ids, branches, positions [B, T]; `attention.MaskInfo`) -> their
    causal calls, exactly `attention.dense_mask` (each allowed key once,
    in the call that gives the query its output), given that each segment is one run of tokens
    ordered [shared | branch 1 | branch 2] and positions increase along each query's keys (what
    `jaxpref.data.layouts` builds)."""
    idx = jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape)
    second = (br == 2) & (seg > 0) if shared_prompt else jnp.zeros_like(seg, bool)
    start = _windowed(jnp.where((seg > 0) & ~second, _run_start(seg), idx), pos, window)
    if not shared_prompt:
        return CausalRuns(start)
    keep = br != 1
    order = jnp.argsort(~keep, axis=1, stable=True).astype(jnp.int32)  # kept tokens first, in order
    back = jnp.argsort(order, axis=1).astype(jnp.int32)
    at = lambda x: jnp.take_along_axis(x, order, axis=1)
    seg2 = jnp.where(idx < keep.sum(1, keepdims=True), at(seg), -1)
    start2 = _windowed(jnp.where(at(second), _run_start(seg2), idx), at(pos), window)
    return CausalRuns(start, order, back, start2, second)


def _windowed(start: jax.Array, pos: jax.Array, window) -> jax.Array:
    """Causal rows whose query i sees slots [start[i], i] -> the first of them inside the window,
    pos[i] - pos[j] < window (positions increase along every query's keys; i itself always
    qualifies). Binary search, all queries at once."""
    if window is None:
        return start
    steps = max(1, math.ceil(math.log2(pos.shape[1] + 1)))

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        far = (pos - jnp.take_along_axis(pos, mid, axis=1)) >= window
        return jnp.where(far, mid + 1, lo), jnp.where(far, hi, mid)

    last = jnp.broadcast_to(jnp.arange(pos.shape[1], dtype=jnp.int32), pos.shape)
    return jax.lax.fori_loop(0, steps, step, (start, last))[0]


@jax.custom_vjp
def _permute_rows(x: jax.Array, perm: jax.Array, inverse: jax.Array) -> jax.Array:
    """x [B, T, ...] -> x[b, perm[b, t]], perm a permutation of each row and `inverse` its inverse;
    the backward gathers by the inverse instead of XLA's scatter-add."""
    return jnp.take_along_axis(x, perm[:, :, None, None], axis=1)


def _permute_rows_fwd(x, perm, inverse):
    return _permute_rows(x, perm, inverse), inverse


def _permute_rows_bwd(inverse, g):
    return jnp.take_along_axis(g, inverse[:, :, None, None], axis=1), None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def _run_start(seg: jax.Array) -> jax.Array:
    """[B, T] -> index where each token's run of equal values starts."""
    t = seg.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    new = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(new, idx, 0), axis=1)


def tokamax():
    """tokamax's attention (api, base) modules, or None where it is not installed."""
    try:
        from tokamax._src.ops.attention import api, base
    except ImportError:
        return None
    return api, base


def flash(q, k, v, info, precision, mesh, batch_axes, impl, softcap=None) -> jax.Array:
    """`attention.attention`'s flash backend for rows without blocks (`info`: an `attention.MaskInfo`)."""
    tk = tokamax()
    if tk is None:
        raise ValueError("training.attention: flash needs tokamax (uv sync --extra flash)")
    impl = impl or _flash_impl(jax.default_backend(), q.dtype)
    gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
    preset = _preset(q.dtype, precision, gpu)
    capped = {} if softcap is None else {"logits_soft_cap": softcap}   # after tokamax's 1/sqrt(H)

    def kernel(q, k, v, start):
        mask = tk[1].Mask(k_start=start[:, None, :], is_causal=True)
        errors = []
        for name in impl:
            op = tk[0].IMPLEMENTATIONS[name] if isinstance(name, str) else name
            try:
                return op(q, k, v, mask=mask, precision=preset, **capped)
            except NotImplementedError as e:  # this kernel refuses the shape/dtype: the next one
                errors.append(f"{name}: {e}")
        raise ValueError("training.attention: no flash kernel takes this call (" + "; ".join(errors) + ")")

    # fp32: the products a kernel's backward takes outside its kernels ask for fp32 too.
    run = kernel if jnp.dtype(q.dtype) != jnp.float32 or precision is None else \
        _backward_under(kernel, "tensorfloat32" if precision == "tf32" and gpu else "highest")

    def call(q, k, v, seg, br, pos, window=None):
        runs = causal_runs(seg, br, pos, window, info.shared_prompt)
        out = run(q, k, v, runs.start)
        if runs.order is None:
            return out
        permuted = run(*(_permute_rows(x, runs.order, runs.back) for x in (q, k, v)), runs.start2)
        return jnp.where(runs.second[:, :, None, None], _permute_rows(permuted, runs.back, runs.order), out)

    args = (q, k, v, info.segment_ids, info.branch, info.positions)
    if mesh is None:
        return call(*args, info.window)
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    if q.shape[0] % math.prod(mesh.shape[a] for a in axes):
        axes = ()  # rows that do not split over the batch shards (a model's 1-row init): every device all
    spec = jax.sharding.PartitionSpec(axes)
    # A traced (per-layer) window enters the per-shard function as an argument, replicated.
    window = () if info.window is None else (jnp.asarray(info.window, jnp.int32),)
    specs = (spec,) * 6 + (jax.sharding.PartitionSpec(),) * len(window)
    return jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)(*args, *window)


def _backward_under(kernel, precision: str):
    """kernel(q, k, v, start) whose backward is traced under `jax.default_matmul_precision(precision)`.
    The kernels' own products carry their algorithm (`_preset`), but a kernel's VJP may take
    products around them at XLA's default precision, TF32 on a GPU (tokamax's Triton backward:
    delta = sum(out * dout) per query), and a backward is traced after the forward's context has ended."""

    @jax.custom_vjp
    def run(q, k, v, start):
        return kernel(q, k, v, start)

    def fwd(q, k, v, start):
        return jax.vjp(lambda q, k, v: kernel(q, k, v, start), q, k, v)

    def bwd(back, dout):
        with jax.default_matmul_precision(precision):
            return (*back(dout), None)

    run.defvjp(fwd, bwd)
    return run


def _flash_impl(platform: str, dtype) -> tuple[str, ...]:
    """tokamax implementations to try in order: Mosaic GPU (Hopper/Blackwell, bf16/f16 products
    only) then Pallas-Triton (any recent GPU, and exact fp32); its XLA reference elsewhere."""
    if platform in ("gpu", "cuda", "rocm"):
        return ("triton",) if jnp.dtype(dtype) == jnp.float32 else ("mosaic_gpu", "triton")
    return ("xla",)


def _preset(dtype, precision, gpu: bool = True):
    """The kernels' product algorithm: fp32 is IEEE fp32 unless tf32 is asked on a GPU (other
    backends have no TF32 products: fp32 there, as XLA's HIGH precision gives on a CPU)."""
    p = jax.lax.DotAlgorithmPreset
    if jnp.dtype(dtype) == jnp.float32:
        return p.TF32_TF32_F32 if precision == "tf32" and gpu else p.F32_F32_F32
    return p.BF16_BF16_F32 if jnp.dtype(dtype) == jnp.bfloat16 else p.F16_F16_F32

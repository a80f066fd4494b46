"""Every attention backend computes today's attention, on every layout.

The oracle is the dense path the model ran before the backends existed, written out below
(`_oracle_*`: a [B, T, T] mask from segment ids and branches, padding-free streams gathered into
blocks, and `jax.nn.dot_product_attention`), on micro-batches built by the real batching code (concatenated, shared_prompt with one and with two segments per pair, packed,
packed_shared_prompt, padding-free streams with empty block slots). Against it:
- "xla" gives the same outputs bit for bit;
- "xla_chunked" and "flash" (tokamax's reference implementation on a CPU: the same causal masks
  with a first key per query that a GPU kernel receives) give the same outputs and q/k/v gradients within 1e-5 in fp32,
  with grouped-query heads and with and without a sliding window;
- the causal calls' key ranges alone rebuild the dense mask exactly, each key once;
- the Pallas-Triton kernel's own forward, run by Pallas' interpreter, agrees too (its backward
  cannot be interpreted on a CPU: Pallas' HLO interpreter does not lower `program_id` inside
  `pl.when`; the GPU check covers it), and every fp32 product of its forward and backward,
  traced, asks for fp32;
- the chunked path's compiled backward needs far less temporary memory than the dense one for a
  4,096-token row of SmolLM2's attention, and `auto` keeps short rows on the dense path.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.data.layouts import Layout, compact_targets, make_pair_batch, pack_rows
from jaxpref.data.padfree import to_stream
from jaxpref.data.tokenize import Tokenized
from jaxpref.models.layers import upcast_on_cpu
from jaxpref.models.attention import NO_WINDOW, MaskInfo, attention, block_rows, choose_backend, dense_mask
from jaxpref.models.flash import causal_runs, _permute_rows, _preset

tokamax = pytest.importorskip("tokamax")

VOCAB = 128
N, K, H = 4, 2, 8  # grouped-query: two query heads per key/value head
LAYOUTS = ("concatenated", "shared_prompt", "shared_prompt/keep_end", "packed", "packed_shared_prompt",
           "shared_prompt+pf", "concatenated+pf2")


def _pairs() -> Tokenized:
    """6 pairs: prompts of 0..9 tokens (one empty), completions of 1..11 (one of a single token)."""
    rng = np.random.default_rng(0)
    ids = lambda n: [int(x) for x in rng.integers(3, VOCAB, n)]
    prompts = [ids(n) for n in (5, 0, 9, 3, 7, 1)]
    chosen = [ids(n) for n in (4, 6, 1, 11, 3, 8)]
    rejected = [ids(n) for n in (7, 2, 5, 11, 9, 1)]
    return Tokenized(prompt=prompts, chosen=chosen, rejected=rejected, rows_in=6)


def _batch(name: str) -> dict:
    """One micro-batch of all pairs. `/keep_end` truncates prompt starts differently for chosen and
    rejected (shared_prompt then holds a pair as two segments); `+pf` is a padding-free stream,
    `+pf2` two of them."""
    kind, _, mode = name.partition("/")
    kind, pf, streams = kind.partition("+pf")
    data, s = _pairs(), 12
    layout = Layout(kind, 14 if mode else None, mode or "keep_start", full_span=True)
    b = make_pair_batch(data, np.arange(len(data)), layout, length=40)
    if pf:
        unit = compact_targets(b, s, k=40)
        b = to_stream(unit, s, int(streams or 1), 240, 240, 40,
                      shared_prompt=kind == "shared_prompt")
    elif kind.startswith("packed"):
        b = compact_targets(pack_rows(b, 80, s, min_rows=8), s, k=80)
    return {k: jnp.asarray(v) for k, v in b.items()}


def _oracle_mask(segment_ids, branch):
    """[N, T] -> [N, T, T] bool: same segment, causal, a branch sees shared tokens and itself;
    padding queries see only themselves."""
    t = segment_ids.shape[-1]
    q_seg, k_seg = segment_ids[:, :, None], segment_ids[:, None, :]
    q_br, k_br = branch[:, :, None], branch[:, None, :]
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    allowed = (q_seg == k_seg) & (k_seg > 0) & causal & ((k_br == 0) | (k_br == q_br))
    return allowed | jnp.eye(t, dtype=bool)[None]


def _near(pos, window):
    return (pos[:, :, None] - pos[:, None, :]) < window


def _oracle_attention(q, k, v, mb: dict, window=None, softcap=None):
    """Dense attention over rows, or over each padding-free stream's blocks (gathered, attended
    block by block, put back). `softcap`: scores tanh(s / cap) * cap, as transformers' Gemma 2
    eager attention computes them (K/V heads repeated, additive mask)."""
    def attend(q, k, v, mask):
        f = jnp.float32 if upcast_on_cpu(q.dtype) else q.dtype
        if softcap is not None:
            rep = q.shape[2] // k.shape[2]
            kr, vr = (jnp.repeat(x.astype(f), rep, axis=2) for x in (k, v))
            s = jnp.einsum("bqnh,bknh->bnqk", q.astype(f), kr) / np.sqrt(q.shape[-1])
            s = jnp.tanh(s / softcap) * softcap + jnp.where(mask[:, None], 0.0, jnp.finfo(f).min)
            return jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(s, axis=-1), vr).astype(q.dtype)
        out = jax.nn.dot_product_attention(q.astype(f), k.astype(f), v.astype(f), mask=mask[:, None])
        return out.astype(q.dtype)

    if "blk_idx" not in mb:
        mask = _oracle_mask(mb["segment_ids"], mb["branch"])
        return attend(q, k, v, mask if window is None else mask & _near(mb["positions"], window))
    r, per, tb = mb["blk_idx"].shape
    idx = mb["blk_idx"].reshape(r, per * tb)
    ok, at = idx >= 0, jnp.maximum(idx, 0)
    take = lambda x: jnp.take_along_axis(x, at.reshape(at.shape + (1,) * (x.ndim - 2)), axis=1)
    blocks = lambda x: take(x).reshape(-1, tb, *x.shape[2:])
    mask = _oracle_mask(jnp.where(ok, take(mb["segment_ids"]), 0).reshape(-1, tb),
                        jnp.where(ok, take(mb["branch"]), 0).reshape(-1, tb))
    if window is not None:
        mask = mask & _near(blocks(mb["positions"]), window)
    out = attend(blocks(q), blocks(k), blocks(v), mask).reshape(r, -1, *q.shape[2:])
    return jnp.take_along_axis(out, mb["blk_back"][:, :, None, None], axis=1)


def _oracle_dense_mask(mb: dict, window):
    mask = _oracle_mask(mb["segment_ids"], mb["branch"])
    return mask if window is None else mask & _near(mb["positions"], window)


def _info(mb: dict, window=None) -> MaskInfo:
    return MaskInfo(mb["segment_ids"], mb["branch"], mb["positions"], mb.get("blk_idx"), mb.get("blk_back"),
                    window, True)


def _qkv(rows: int, t: int, kv_heads: int = K, seed: int = 1):
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
    return f(rows, t, N, H), f(rows, t, kv_heads, H), f(rows, t, kv_heads, H)


def _value_and_grads(fn, q, k, v):
    """(outputs, d/dq, d/dk, d/dv of a fixed random projection of the outputs)."""
    w = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape), jnp.float32)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v) * w)
    return (jax.jit(fn)(q, k, v), *jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))


@pytest.fixture(scope="module", params=LAYOUTS)
def layout(request):
    return request.param, _batch(request.param)


@pytest.mark.parametrize("window", [None, 3])
def test_xla_backend_is_todays_attention_bit_for_bit(layout, window):
    _, mb = layout
    q, k, v = _qkv(*mb["segment_ids"].shape)
    info = _info(mb, window)
    want = _oracle_attention(q, k, v, mb, window)
    np.testing.assert_array_equal(attention(q, k, v, info, backend="xla"), want)
    if "blk_idx" not in mb:
        np.testing.assert_array_equal(dense_mask(info), _oracle_dense_mask(mb, window))


@pytest.mark.parametrize("window", [None, 3])
def test_causal_runs_rebuild_the_dense_mask(layout, window):
    """The flash path's causal calls give each query exactly the keys of the dense mask, each once:
    call 1 keys [start, i] of the row; call 2 (shared prompts) key slots [start2, s] of the row
    permuted by `order`, for the queries marked `second`, read at their slot back[i]."""
    _, mb = layout
    info = _info(mb, window)
    if "blk_idx" in mb:
        _, info = block_rows(info)
        want = _oracle_mask(info.segment_ids, info.branch)
        want = want if window is None else want & _near(info.positions, window)
    else:
        want = _oracle_dense_mask(mb, window)
    runs = causal_runs(info.segment_ids, info.branch, info.positions, info.window, info.shared_prompt)
    t = want.shape[-1]
    slots = jnp.arange(t)
    first = (slots[None, None, :] >= runs.start[:, :, None]) & (slots[None, None, :] <= slots[None, :, None])
    seen = first.astype(jnp.int32)
    if info.shared_prompt:
        inside = (slots[None, None, :] >= runs.start2[:, :, None]) & (slots[None, None, :] <= slots[None, :, None])
        by_slot = jax.vmap(lambda ins, order: jnp.zeros((t, t), jnp.int32).at[:, order].add(ins))(
            inside.astype(jnp.int32), runs.order)                          # [B, slot, token]
        by_query = jnp.take_along_axis(by_slot, runs.back[:, :, None], axis=1)
        seen = jnp.where(runs.second[:, :, None], by_query, seen)
        assert bool(runs.second.any()) == bool(((info.branch == 2) & (info.segment_ids > 0)).any())
    else:
        assert runs.order is None
    np.testing.assert_array_equal(seen, want.astype(jnp.int32))


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("backend", ["xla_chunked", "flash"])
def test_backend_matches_dense_forward_and_grads(layout, backend, window):
    name, mb = layout
    q, k, v = _qkv(*mb["segment_ids"].shape)
    info = _info(mb, window)
    want = _value_and_grads(lambda q, k, v: _oracle_attention(q, k, v, mb, window), q, k, v)
    # chunk=16 over rows of 40/80 tokens: several query blocks and a padded last one.
    got = _value_and_grads(lambda q, k, v: attention(q, k, v, info, backend=backend, chunk=16,
                                                     flash_impl=("xla",)), q, k, v)
    for g, w, what in zip(got, want, ("out", "dq", "dk", "dv")):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"{name} {backend} {what}")


@pytest.mark.parametrize("backend", ["xla", "xla_chunked", "flash"])
def test_softcap_reaches_every_backend(layout, backend):
    """Gemma 2's attention-logit soft-cap (scores ~N(0, 1) here, capped at 1: it bites), with a
    window and grouped-query heads: every backend gives the capped oracle's outputs and gradients,
    which differ from the uncapped ones."""
    name, mb = layout
    q, k, v = _qkv(*mb["segment_ids"].shape)
    info = _info(mb, 3)
    want = _value_and_grads(lambda q, k, v: _oracle_attention(q, k, v, mb, 3, softcap=1.0), q, k, v)
    got = _value_and_grads(lambda q, k, v: attention(q, k, v, info, backend=backend, chunk=16,
                                                     flash_impl=("xla",), softcap=1.0), q, k, v)
    for g, w, what in zip(got, want, ("out", "dq", "dk", "dv")):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"{name} {backend} {what}")
    assert np.abs(_oracle_attention(q, k, v, mb, 3) - want[0]).max() > 1e-2


@pytest.mark.parametrize("backend", ["xla", "xla_chunked", "flash", "flash_in_shard_map"])
def test_traced_window_is_the_static_one(layout, backend):
    """A per-layer window is read under `nn.scan` as a traced int32 scalar: 3 gives the static
    window of 3, NO_WINDOW gives no window, outputs and gradients, in every layout."""
    name, mb = layout
    q, k, v = _qkv(*mb["segment_ids"].shape)
    info = _info(mb)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)) if backend.endswith("map") else None
    be = backend.removesuffix("_in_shard_map")

    @jax.jit
    def run(q, k, v, window):  # window: a tracer here
        return attention(q, k, v, dataclasses.replace(info, window=window), backend=be, chunk=16,
                         mesh=mesh, flash_impl=("xla",))

    for traced, static in ((3, 3), (NO_WINDOW, None)):
        want = _value_and_grads(lambda q, k, v: _oracle_attention(q, k, v, mb, static), q, k, v)
        got = _value_and_grads(lambda q, k, v: run(q, k, v, jnp.int32(traced)), q, k, v)
        for g, w, what in zip(got, want, ("out", "dq", "dk", "dv")):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"{name} {backend} {traced} {what}")


@pytest.mark.parametrize("backend", ["xla_chunked", "flash"])
@pytest.mark.parametrize("kv_heads", [K, N])
def test_one_token_rows_and_padding(backend, kv_heads):
    """Rows of one token; rows of one real token then padding; an all-padding row; a row whose
    segments are single tokens. Padding queries see only themselves, as in today's mask."""
    seg = jnp.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 2, 3, 4, 5], [1, 1, 1, 1, 1]], jnp.int32)
    br = jnp.array([[0] * 5, [0] * 5, [0] * 5, [0, 1, 1, 2, 2]], jnp.int32)
    pos = jnp.array([[0, 0, 0, 0, 0], [0] * 5, [0] * 5, [0, 1, 2, 1, 2]], jnp.int32)
    for s, b, p in ((seg, br, pos), (seg[:, :1], br[:, :1], pos[:, :1])):
        q, k, v = _qkv(s.shape[0], s.shape[1], kv_heads)
        info = MaskInfo(s, b, p, window=2)
        mb = {"segment_ids": s, "branch": b, "positions": p}
        want = _value_and_grads(lambda q, k, v: _oracle_attention(q, k, v, mb, 2), q, k, v)
        got = _value_and_grads(lambda q, k, v: attention(q, k, v, info, backend=backend, chunk=2,
                                                         flash_impl=("xla",)), q, k, v)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_triton_kernel_forward_interpreted(monkeypatch):
    """The Pallas-Triton flash kernel itself (forward), run by Pallas' interpreter on the CPU,
    on shared-prompt rows with a window: the causal masks mean to the kernel what they mean here."""
    from jax.experimental import pallas as pl
    from tokamax._src.ops.attention import pallas_triton

    plain = pl.pallas_call
    monkeypatch.setattr(pl, "pallas_call", lambda *a, **kw: plain(*a, **{**kw, "interpret": True}))
    kernel = pallas_triton.PallasTritonFlashAttention(bypass_device_check=True)
    mb = _batch("packed_shared_prompt")
    q, k, v = _qkv(*mb["segment_ids"].shape)
    info = _info(mb, 3)
    got = attention(q, k, v, info, backend="flash", flash_impl=(kernel,))
    want = _oracle_attention(q, k, v, mb, 3)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _f32_dot_precisions(jaxpr) -> list:
    """The `precision` of every fp32 dot_general in a jaxpr, kernels' and sub-jaxprs' included."""
    from jax.extend import core
    found = []
    for e in jaxpr.eqns:
        if e.primitive.name == "dot_general" and e.outvars[0].aval.dtype == jnp.float32:
            found.append(e.params["precision"])
        for p in e.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                if isinstance(sub, (core.ClosedJaxpr, core.Jaxpr)):
                    found += _f32_dot_precisions(getattr(sub, "jaxpr", sub))
    return found


def test_triton_kernel_backward_asks_for_fp32_products():
    """fp32 flash on a GPU runs the Pallas-Triton kernel, whose backward takes one product outside
    its kernels (delta = sum(out * dout) per query) at XLA's default precision: TF32 on a GPU (the
    GPU check's fp32 step test found it). Traced here (not run: see the module docstring), every
    fp32 product of its forward and backward asks for fp32."""
    from tokamax._src.ops.attention import pallas_triton, pallas_triton_vjp
    kernel = pallas_triton.PallasTritonFlashAttention(
        bypass_device_check=True, vjp=pallas_triton_vjp.PallasTritonFlashAttentionVjp(bypass_device_check=True))
    mb = _batch("shared_prompt")
    q, k, v = _qkv(*mb["segment_ids"].shape)
    f = lambda q, k, v: attention(q, k, v, _info(mb), backend="flash", precision="highest",
                                  flash_impl=(kernel,)).sum()
    found = _f32_dot_precisions(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, k, v).jaxpr)
    exact = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    assert len(found) >= 8 and all(p in (exact, jax.lax.DotAlgorithmPreset.F32_F32_F32) for p in found), found


def test_flash_inside_shard_map_over_batch_rows():
    mb = _batch("shared_prompt")
    q, k, v = _qkv(*mb["segment_ids"].shape)
    info = _info(mb)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    got = jax.jit(lambda q, k, v: attention(q, k, v, info, backend="flash", mesh=mesh,
                                            flash_impl=("xla",)))(q, k, v)
    np.testing.assert_allclose(got, attention(q, k, v, info, backend="xla"), atol=1e-5, rtol=1e-5)


def _temp_bytes(backend: str, t: int) -> int:
    """Compiled temporary memory of one layer's attention backward (SmolLM2-135M: 9 query heads,
    3 key/value heads of 64) for one shared-prompt row of t tokens."""
    seg = jnp.ones((1, t), jnp.int32)
    br = jnp.zeros((1, t), jnp.int32).at[:, t // 4:t // 2].set(1).at[:, t // 2:].set(2)
    info = MaskInfo(seg, br, jnp.arange(t, dtype=jnp.int32)[None])
    fn = jax.checkpoint(lambda q, k, v: attention(q, k, v, info, backend=backend))
    loss = lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)
    spec = lambda h: jax.ShapeDtypeStruct((1, t, h, 64), jnp.float32)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec(9), spec(3), spec(3)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_backward_memory_far_below_dense_at_4096_tokens():
    dense, chunked = _temp_bytes("xla", 4096), _temp_bytes("xla_chunked", 4096)
    # Dense: [9, 4096, 4096] fp32 scores (604 MiB) several times; chunked: one block of 512 queries.
    assert dense > 9 * 4096 * 4096 * 4
    assert chunked < dense / 5, (chunked, dense)


def test_auto_keeps_short_rows_on_today_path():
    f32 = jnp.float32
    # The quickstart: blocks of <= 128 tokens, 9 heads.
    assert choose_backend("auto", "cpu", f32, rows=8, t=128, s=128, heads=9) == "xla"
    assert choose_backend("auto", "cpu", f32, rows=4, t=300, s=300, heads=9) == "xla"
    assert choose_backend("auto", "cpu", f32, rows=1, t=4096, s=4096, heads=9) == "xla_chunked"
    assert choose_backend("auto", "gpu", jnp.bfloat16, rows=1, t=4096, s=4096, heads=9) == "flash"
    assert choose_backend("auto", "gpu", f32, rows=1, t=4096, s=4096, heads=9) == "xla_chunked"
    assert choose_backend("auto", "tpu", f32, rows=1, t=4096, s=4096, heads=9) == "xla_chunked"
    assert choose_backend("xla", "gpu", f32, rows=1, t=4096, s=4096, heads=9) == "xla"
    with pytest.raises(ValueError, match="TPU"):
        choose_backend("flash", "tpu", f32, 1, 8, 8, 1)
    with pytest.raises(ValueError, match="unknown backend"):
        choose_backend("cudnn", "gpu", f32, 1, 8, 8, 1)



def test_auto_decides_by_one_devices_rows_on_a_mesh(monkeypatch):
    """Under a mesh the model sees every device's rows; auto decides by one device's, as the dry
    run's attention line and the memory plan do (it used to chunk where the dry run said xla)."""
    import types

    from jaxpref.models import attention as att

    seen = []
    monkeypatch.setattr(att, "_dense", lambda q, *a: seen.append("xla") or q)
    monkeypatch.setattr(att, "_chunked", lambda q, *a: seen.append("xla_chunked") or q)
    q = jax.ShapeDtypeStruct((8, 640, 16, 8), jnp.float32)   # 8 rows: 210 MB of fp32 scores, 26 MB per row of 8 devices
    info = MaskInfo.rows(np.ones((8, 640), np.int32))
    mesh = types.SimpleNamespace(shape={"data": 4, "fsdp": 2, "tensor": 1}, axis_names=("data", "fsdp", "tensor"))
    for m in (None, mesh):
        jax.eval_shape(lambda q: att.attention(q, q, q, info, mesh=m), q)
    assert seen == ["xla_chunked", "xla"]
    assert choose_backend("auto", "cpu", jnp.float32, 8 // 8, 640, 640, 16) == "xla"   # the dry run's count

def test_fp32_is_fp32_unless_tf32_is_asked():
    p = jax.lax.DotAlgorithmPreset
    assert _preset(jnp.float32, None) == _preset(jnp.float32, "highest") == p.F32_F32_F32
    assert _preset(jnp.float32, "tf32") == p.TF32_TF32_F32
    assert _preset(jnp.float32, "tf32", gpu=False) == p.F32_F32_F32  # no TF32 products off GPUs
    assert _preset(jnp.bfloat16, None) == p.BF16_BF16_F32


def test_permuted_rows_backward_is_the_scatter_it_replaces():
    """_permute_rows' backward (a gather by causal_runs' inverse permutation) equals the gradient of the
    plain take_along_axis (a scatter-add), over causal_runs' real permutation of a shared-prompt stream."""
    rng = np.random.default_rng(3)
    seg = jnp.asarray([[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0]], jnp.int32)
    br = jnp.asarray([[0, 0, 1, 1, 2, 2, 0, 1, 1, 2, 0, 0]], jnp.int32)
    pos = jnp.asarray([[0, 1, 2, 3, 2, 3, 0, 1, 2, 1, 0, 0]], jnp.int32)
    runs = causal_runs(seg, br, pos)
    assert np.asarray(runs.order[0]).tolist() == [0, 1, 4, 5, 6, 9, 10, 11, 2, 3, 7, 8]
    x = jnp.asarray(rng.normal(size=(1, 12, 2, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(1, 12, 2, 4)), jnp.float32)
    plain = lambda x, perm: jnp.take_along_axis(x, perm[:, :, None, None], axis=1)
    for perm, inverse in ((runs.order, runs.back), (runs.back, runs.order)):
        np.testing.assert_array_equal(np.asarray(_permute_rows(x, perm, inverse)), np.asarray(plain(x, perm)))
        ours = jax.grad(lambda x: (_permute_rows(x, perm, inverse) * w).sum())(x)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(jax.grad(lambda x: (plain(x, perm) * w).sum())(x)),
                                   rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(_permute_rows(_permute_rows(x, runs.order, runs.back), runs.back,
                                                           runs.order)), np.asarray(x))

"""GPU check of `jaxpref.models.attention`: tokamax's kernels against the dense XLA path.

Two steps. Here (any machine, this branch): `python scripts/attention_gpu_check.py save DIR`
writes DIR/batches.npz (every layout's mask description, from tests/test_attention.py). There (a
GPU with jax, flax and tokamax's wheels on PYTHONPATH; xprof can be a stub module, it is only
imported): `python scripts/attention_gpu_check.py run DIR` prints and writes DIR/gpu_check.json:
1. fp32, every layout: flash (Triton, F32 products) and xla_chunked against the dense path at
   HIGHEST precision, outputs and q/k/v gradients; tf32 and XLA's default for comparison;
2. bf16: Mosaic GPU and Triton kernels against the fp32 dense path;
3. one layer's attention for 2 shared-prompt rows of 4,096 tokens (SmolLM2's 9/3 heads of 64):
   fwd+bwd time and compiled temporary memory per backend.
"""
import json, os, sys, time, traceback
import jax, jax.numpy as jnp, numpy as np
if __name__ == "__main__" and sys.argv[1:2] == ["save"]:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import test_attention as T
    out = {f"{n}|{k}": np.asarray(v) for n in T.LAYOUTS for k, v in T._batch(n).items()
           if k in ("segment_ids", "branch", "positions", "blk_idx", "blk_back")}
    np.savez(os.path.join(sys.argv[2], "batches.npz"), **out)
    sys.exit(0)
HERE = sys.argv[2]
from jaxpref.models import attention as A
import tokamax
R = {"jax": jax.__version__, "tokamax": tokamax.__version__, "device": str(jax.devices()[0].device_kind)}
print(R, flush=True)
OUT = os.environ.get("OUT", HERE)
def save(): json.dump(R, open(os.path.join(OUT, "gpu_check.json"), "w"), indent=1, default=str)
data = np.load(os.path.join(HERE, "batches.npz"))
LAYOUTS = sorted({k.split("|")[0] for k in data.files})
def info_of(name, window):
    g = lambda k: jnp.asarray(data[f"{name}|{k}"]) if f"{name}|{k}" in data.files else None
    return A.MaskInfo(g("segment_ids"), g("branch"), g("positions"), g("blk_idx"), g("blk_back"), window)
def qkv(rows, t, n, kh, h, dtype, seed=1):
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32).astype(dtype)
    return f(rows, t, n, h), f(rows, t, kh, h), f(rows, t, kh, h)
def vg(fn, q, k, v):
    w = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape), jnp.float32)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    return [np.asarray(x, np.float32) for x in (jax.jit(fn)(q, k, v), *jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))]
def err(a, b): return [float(np.abs(x - y).max()) for x, y in zip(a, b)]
def section(name, f):
    t0 = time.time()
    try:
        R[name] = f()
    except Exception as e:
        R[name] = "FAILED: " + "".join(traceback.format_exception_only(e))[-1500:]
        traceback.print_exc()
    print(name, round(time.time() - t0, 1), "s:", R[name], flush=True); save()

def small_fp32():
    res = {}
    for name in LAYOUTS:
        for window in ((None, 3) if name in ("packed_shared_prompt", "shared_prompt+pf") else (3,)):
            info = info_of(name, window)
            q, k, v = qkv(*info.segment_ids.shape, 4, 2, 8, jnp.float32)
            ref = vg(lambda q, k, v: A.attention(q, k, v, info, "xla", "highest"), q, k, v)
            out = {}
            cases = (("flash", "highest"), ("xla_chunked", "highest"))
            if name == "packed_shared_prompt" and window == 3:
                cases += (("flash", "tf32"), ("xla", "tf32"), ("xla", None))
            for be, p in cases:
                try:
                    out[f"{be}/{p}"] = err(vg(lambda q, k, v: A.attention(q, k, v, info, be, p, chunk=16), q, k, v), ref)
                except Exception as e:
                    out[f"{be}/{p}"] = "FAILED: " + str(e)[:300]
            res[f"{name}/w={window}"] = out
    return res
section("small_fp32 [max err out,dq,dk,dv vs dense fp32 HIGHEST]", small_fp32)

def small_bf16():
    res = {}
    for name in ("packed_shared_prompt", "shared_prompt+pf"):
        info = info_of(name, 3)
        q, k, v = qkv(*info.segment_ids.shape, 4, 2, 64, jnp.float32)
        ref = vg(lambda q, k, v: A.attention(q, k, v, info, "xla", "highest"), q, k, v)
        b = [x.astype(jnp.bfloat16) for x in (q, k, v)]
        for impl in (("mosaic_gpu",), ("triton",)):
            try:
                res[f"{name}/{impl[0]}"] = err(vg(lambda q, k, v: A.attention(q, k, v, info, "flash", flash_impl=impl), *b), ref)
            except Exception as e:
                res[f"{name}/{impl[0]}"] = "FAILED: " + str(e)[:400]
        res[f"{name}/xla_bf16"] = err(vg(lambda q, k, v: A.attention(q, k, v, info, "xla"), *b), ref)
    return res
section("small_bf16 [vs fp32 dense; head_dim 64]", small_bf16)

def intervals_2t(q, k, v, t):
    """Before 7cd422c: one Mosaic GPU call, keys [row | row without the chosen branch], one key
    interval per query, no causal flag (its backward visits every key tile). Rows of big()."""
    from tokamax._src.ops.attention import api, base
    p, c = t // 4, t * 3 // 8                       # prompt, chosen (rejected: the rest)
    i = jnp.arange(t)
    rej = i >= p + c
    start = jnp.where(rej, t, 0)
    end = jnp.where(rej, t + i - c + 1, i + 1)      # rejected j: the copy's prompt + rejected up to j
    order = jnp.concatenate([jnp.arange(p), jnp.arange(p + c, t), jnp.arange(p, p + c)])
    kk, vv = (jnp.concatenate([x, x[:, order]], axis=1) for x in (k, v))
    mask = base.Mask(k_start=start[None, None], k_end=end[None, None])
    return api.IMPLEMENTATIONS["mosaic_gpu"](q, kk, vv, mask=mask, precision=jax.lax.DotAlgorithmPreset.BF16_BF16_F32)


def big():
    t, rows, n, kh, h = int(os.environ.get("BIG_T", 4096)), 2, 9, 3, 64
    seg = jnp.ones((rows, t), jnp.int32)
    br = jnp.zeros((rows, t), jnp.int32).at[:, t // 4:t * 5 // 8].set(1).at[:, t * 5 // 8:].set(2)
    pos = jnp.broadcast_to(jnp.concatenate([jnp.arange(t * 5 // 8), jnp.arange(t // 4, t * 5 // 8)]), (rows, t)).astype(jnp.int32)
    info = A.MaskInfo(seg, br, pos)
    res = {}
    ref = None
    for label, be, dtype, impl in (("xla fp32 highest", "xla", jnp.float32, None), ("xla_chunked fp32 highest", "xla_chunked", jnp.float32, None),
                                    ("flash fp32 (triton, F32)", "flash", jnp.float32, None), ("xla bf16", "xla", jnp.bfloat16, None),
                                    ("flash bf16 (mosaic_gpu)", "flash", jnp.bfloat16, ("mosaic_gpu",)), ("flash bf16 (triton)", "flash", jnp.bfloat16, ("triton",)),
                                    ("flash bf16 (mosaic_gpu), one call over 2T gathered keys (before 7cd422c)", "intervals", jnp.bfloat16, None)):
        try:
            q, k, v = qkv(rows, t, n, kh, h, dtype)
            fn = lambda q, k, v: A.attention(q, k, v, info, be, "highest", flash_impl=impl)
            if be == "intervals":   # the layout before 7cd422c, for an A/B in one run
                fn = lambda q, k, v: intervals_2t(q, k, v, t)
            w = jnp.ones(q.shape, jnp.float32)
            g = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w), argnums=(0, 1, 2)))
            c = g.lower(q, k, v).compile()
            mem = c.memory_analysis().temp_size_in_bytes / 2**20
            jax.block_until_ready(g(q, k, v))
            ts = []
            for _ in range(5):
                t0 = time.perf_counter(); jax.block_until_ready(g(q, k, v)); ts.append(time.perf_counter() - t0)
            outs = [np.asarray(x, np.float32) for x in jax.tree.leaves(g(q, k, v))]
            if ref is None: ref = outs
            res[label] = {"fwd+bwd ms (median of 5)": round(1e3 * sorted(ts)[2], 2), "temp MiB": round(mem, 1),
                          "max err loss,dq,dk,dv vs xla fp32": err(outs, ref)}
        except Exception as e:
            res[label] = "FAILED: " + str(e)[:400]
        print(label, res[label], flush=True)
    return res
section("big [2 shared-prompt rows of 4096, 9/3 heads of 64: one layer's attention]", big)

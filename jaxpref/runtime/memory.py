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


def memory_plan(cfg: Config, args, base_params: int, lora_params: int, rows: int, seq_len: int,
                targets_len: int, mesh=None, runtime: int | None = None) -> dict[str, float]:
    """Bytes per device for weights, LoRA + optimizer state, activations and logits (estimate).

    `rows` are the batch rows one device holds. Activations: per layer and token, the forward keeps
    ~ (10 D + 3 I) values for backward plus the attention weights (heads x T); with gradient
    checkpointing only each layer's input survives, plus one layer recomputed. On CPU the runtime
    (this process's resident memory before weights are read) is part of the plan."""
    shard = 1
    if mesh is not None:
        shard = mesh.shape["fsdp"] * mesh.shape["tensor"]
    pbytes = DTYPE_BYTES[cfg.training.param_dtype]
    cbytes = DTYPE_BYTES[cfg.training.compute_dtype]
    D = args.hidden_size
    I = getattr(args, "intermediate_size", 4 * D) or 4 * D
    L = args.num_layers
    H = args.num_heads
    tokens = rows * seq_len
    per_layer = tokens * (10 * D + 3 * I) * cbytes + rows * H * seq_len * seq_len * 4
    if cfg.gradient_checkpointing:
        acts = L * tokens * D * cbytes + per_layer
    else:
        acts = L * per_layer
    V = args.vocab_size
    plan = {
        "base weights": base_params * pbytes / shard,
        "reference copy": (base_params * pbytes / shard
                           if (not cfg.lora.enabled or (cfg.post_training.use_ref_model
                                                        and cfg.models[0].ref_model_id)) else 0),
        "LoRA + grads": lora_params * 4 * 2,
        "optimizer state": lora_params * 4 * 2,
        "activations": acts,
        # logits, softmax and its gradient (one vocabulary chunk at a time with training.vocab_chunk)
        "logits": rows * targets_len * min(cfg.training.vocab_chunk or V, V) * 4 * 3,
    }
    if jax.devices()[0].platform == "cpu":
        plan["runtime"] = runtime_rss() if runtime is None else runtime
    plan["total"] = sum(plan.values())
    return plan


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



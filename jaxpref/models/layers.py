"""Building blocks shared by the architectures: a LoRA-aware linear layer, norms, activations,
rotary embeddings (the attention core is `jaxpref.models.attention`). How they assemble into a decoder:
`jaxpref.models.blocks`.

LoRA is a parameter transform: the base weights live in the `params` collection, the low-rank
factors in a separate `lora` collection with the same module paths. A `Linear` adds the low-rank
update only when its `lora` variables are present, so the reference forward is the same call with
the `lora` collection left out: one base tree, no copy.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class Linear(nn.Module):
    """y = x W (+ b) + scale * dropout(x) A B, with W: [in, out], A: [in, r], B: [r, out].

    `conv1d` only records that the Hugging Face tensor is stored [in, out] (GPT-2); the math is the
    same.
    """
    features: int
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    deterministic: bool = True
    precision: str | None = "highest"   # fp32 products (`matmul`)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features),
                            self.param_dtype)
        y = matmul("...i,io->...o", x, kernel, self.dtype, precision=self.precision)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.has_variable("lora", "a"):
            a = self.get_variable("lora", "a")
            b = self.get_variable("lora", "b")
            h = x
            if self.lora_dropout > 0 and not self.deterministic:
                h = nn.Dropout(self.lora_dropout, deterministic=False)(h)
            low = matmul("...i,ir->...r", h, a, self.dtype, precision=self.precision)
            y = y + self.lora_scale * matmul("...r,ro->...o", low, b, self.dtype, precision=self.precision)
        return y


def upcast_on_cpu(dtype) -> bool:
    """bf16 compute on a CPU: XLA:CPU's bf16 dots run ~20% slower than fp32 ones on machines
    without bf16 arithmetic, so bf16 operands are widened to fp32 for the product (exact: every
    bf16 is an fp32) and the result rounded back. That is what a bf16 matmul with fp32
    accumulation computes on a GPU; GPUs and TPUs keep their native bf16 kernels."""
    return jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu"


PRECISIONS = {"highest": "highest", "tf32": "tensorfloat32", None: None}


def matmul(subscripts: str, x: jax.Array, w: jax.Array, dtype, out_dtype=None,
           precision: str | None = "highest") -> jax.Array:
    """einsum of x and w rounded to the compute `dtype`, fp32 accumulation, result in `out_dtype`
    (default `dtype`). `precision` applies to fp32 products: "highest" keeps them fp32 on GPUs
    too (XLA's default there is TF32), "tf32" asks for tensor cores, None is XLA's default."""
    out_dtype = dtype if out_dtype is None else out_dtype
    x, w = x.astype(dtype), w.astype(dtype)
    if upcast_on_cpu(dtype):
        # Rematerialised: the backward widens x and w again instead of keeping their fp32 copies
        # (for the base weights that would be an fp32 copy of the whole model).
        return _widened_matmul(subscripts, out_dtype)(x, w)
    prec = PRECISIONS[precision] if jnp.dtype(dtype) == jnp.float32 else None
    if jnp.dtype(out_dtype) == jnp.dtype(dtype):
        # GPU and TPU kernels accumulate bf16 products in fp32 and round once, as an fp32 result
        # cast back would; a result typed `dtype` also keeps the backward's products in `dtype`
        # (an fp32 result would send fp32 cotangents into them: fp32/TF32 matmuls plus weight
        # conversions, 14% of an H100 step at ~4,000 tokens).
        return jnp.einsum(subscripts, x, w, preferred_element_type=dtype, precision=prec)
    return jnp.einsum(subscripts, x, w, preferred_element_type=jnp.float32, precision=prec).astype(out_dtype)


@functools.lru_cache(maxsize=None)
def _widened_matmul(subscripts: str, out_dtype):
    f = jnp.float32
    return jax.checkpoint(lambda x, w: jnp.einsum(subscripts, x.astype(f), w.astype(f)).astype(out_dtype))


class Norm(nn.Module):
    """x [..., D] -> [..., D] in the compute `dtype`: RMSNorm (Llama, `centered=False`: a `scale`)
    or LayerNorm (GPT-2, GPT-NeoX, `centered=True`: mean-centred, a `scale` and a `bias`). The
    statistics are taken in fp32 whatever the compute dtype, as transformers does."""
    eps: float = 1e-6
    centered: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    fp32_scale: bool = False   # RMSNorm: scale * x in fp32, then rounded (OLMo 2's RMSNorm)
    # RMSNorm: (1 + scale) * x in fp32, then rounded; the stored scale starts at 0 (Gemma's RMSNorm).
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        scale = self.param("scale", init, (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        if not self.centered:
            # transformers' LlamaRMSNorm rounds to the compute dtype before the scale multiplies.
            x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
            if self.unit_offset:
                return ((1.0 + scale.astype(jnp.float32)) * x32).astype(self.dtype)
            if self.fp32_scale:
                return (scale.astype(jnp.float32) * x32).astype(self.dtype)
            return scale.astype(self.dtype) * x32.astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


# Hugging Face `hidden_act` / `activation_function` names -> JAX. "gelu" is the exact (erf) form;
# the others are tanh forms.
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict | None, positions=None) -> jnp.ndarray:
    """Inverse frequencies [rotary_dim // 2] float32, with Llama 3 / linear / LongRoPE / YaRN scaling
    applied. LongRoPE (Phi-3) divides each frequency by its `short_factor`, or by its
    `long_factor` once the call's largest position passes `original_max_position_embeddings`
    (`positions` [B, T]): transformers decides per forward call, over the whole batch, as here."""
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    inv = 1.0 / (theta ** exponents)
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "longrope":
        short, long = (1.0 / (jnp.asarray(scaling[f], jnp.float32) * theta ** exponents)
                       for f in ("short_factor", "long_factor"))
        if positions is None:
            return short
        return jnp.where(jnp.max(positions) + 1 > scaling["original_max_position_embeddings"], long, short)
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "yarn":
        return _yarn_inv_freq(inv, rotary_dim, theta, scaling)
    if kind == "llama3":
        factor = scaling["factor"]
        low = scaling.get("low_freq_factor", 1.0)
        high = scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling `{kind}`")


def _yarn_inv_freq(inv: jnp.ndarray, rotary_dim: int, theta: float, scaling: dict) -> jnp.ndarray:
    """YaRN (`rope_config.yarn` resolves its settings): each frequency between the original one
    (fast, high-frequency dimensions: kept) and the one divided by `factor` (slow: interpolated),
    by a linear ramp over the dimensions between the `beta_fast` and `beta_slow` rotations."""
    original = scaling["original_max_position_embeddings"]

    def dim_of(rotations: float) -> float:   # the dimension that turns `rotations` times in `original`
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = dim_of(scaling["beta_fast"]), dim_of(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(rotary_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    return (inv / scaling["factor"]) * ramp + inv * (1 - ramp)


def rope_attention_factor(scaling: dict | None) -> float:
    """The factor transformers multiplies cos and sin by: LongRoPE's and YaRN's `attention_factor`
    (which their args resolve from the config), 1 otherwise."""
    kind = scaling and scaling.get("rope_type", scaling.get("type"))
    return float(scaling["attention_factor"]) if kind in ("longrope", "yarn") else 1.0


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array, factor: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] int -> cos, sin [B, T, rotary_dim] float32 (halves repeated, HF layout),
    times `factor` (`rope_attention_factor`)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    if factor != 1.0:
        return jnp.cos(emb) * factor, jnp.sin(emb) * factor
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, H]; rotates the first cos.shape[-1] features (partial rotary for GPT-NeoX)."""
    rd = cos.shape[-1]
    xr, xp = x[..., :rd], x[..., rd:]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
    rot = jnp.concatenate([-x2, x1], axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = (xr.astype(jnp.float32) * c + rot.astype(jnp.float32) * s).astype(x.dtype)
    return jnp.concatenate([out, xp], axis=-1) if xp.shape[-1] else out

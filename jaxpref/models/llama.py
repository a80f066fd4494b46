"""Llama-family decoder (Llama 2/3.x, Mistral, Qwen2/2.5, SmolLM/SmolLM2): RMSNorm, rotary
embeddings, grouped-query attention, SwiGLU MLP. Layers are stacked and run with `nn.scan`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpref.errors import ModelSourceError
from jaxpref.models.layers import (Linear, Norm, apply_rope, attention, rope_cos_sin, rope_inv_freq,
                                   sliding_window)
from jaxpref.models.spec import stacked, ArchArgs, WeightRule


@dataclass(frozen=True)
class LlamaArgs(ArchArgs):
    intermediate_size: int = 0
    num_key_value_heads: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    attention_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None   # Mistral: each token sees the last `sliding_window` positions

    @classmethod
    def from_hf(cls, hf: dict, **common) -> "LlamaArgs":
        heads = hf["num_attention_heads"]
        qkv_bias = hf.get("attention_bias", False) or hf.get("model_type") == "qwen2"
        rope = hf.get("rope_scaling") or hf.get("rope_parameters")
        theta = hf.get("rope_theta")
        if theta is None and isinstance(rope, dict):
            theta = rope.get("rope_theta")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            intermediate_size=hf["intermediate_size"],
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta or 10000.0),
            rope_scaling=_freeze(rope),
            attention_bias=bool(qkv_bias),
            o_proj_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=_window(hf),
            **common,
        )


def _window(hf: dict) -> int | None:
    """The sliding window every layer uses, or None. transformers gives Mistral's on all layers
    (`sliding_window`), and Qwen2's (`use_sliding_window`) on the layers from `max_window_layers`
    on (`layer_types` when written out); a window on only some layers is not supported."""
    window = hf.get("sliding_window")
    if window is None or hf.get("model_type") not in ("mistral", "qwen2"):
        return None
    n = hf["num_hidden_layers"]
    kinds = hf.get("layer_types")
    if kinds is None and hf.get("model_type") == "qwen2":
        if not hf.get("use_sliding_window", False):
            return None
        first = hf.get("max_window_layers", n)
        kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if kinds is not None:
        sliding = sum(k == "sliding_attention" for k in kinds)
        if sliding == 0:
            return None
        if sliding != len(kinds):
            raise ModelSourceError(f"a sliding attention window on {sliding} of {len(kinds)} layers "
                                   "(`layer_types`) is not supported; only all layers or none")
    return int(window)


def _freeze(d):
    return tuple(sorted(d.items())) if isinstance(d, dict) else d


class Block(nn.Module):
    args: LlamaArgs

    @nn.compact
    def __call__(self, x, inputs):
        a = self.args
        cos, sin, mask = inputs
        lin = dict(dtype=a.dtype, param_dtype=a.param_dtype, lora_scale=a.lora_scale,
                   lora_dropout=a.lora_dropout, deterministic=a.deterministic)
        b, t, _ = x.shape
        h = Norm(a.rms_norm_eps, False, a.dtype, a.param_dtype, name="input_layernorm")(x)
        attn = _Attention(a, lin, name="self_attn")
        x = x + attn(h, cos, sin, mask)
        h = Norm(a.rms_norm_eps, False, a.dtype, a.param_dtype, name="post_attention_layernorm")(x)
        x = x + _MLP(a, lin, name="mlp")(h)
        return x, None


class _Attention(nn.Module):
    args: LlamaArgs
    lin: dict

    @nn.compact
    def __call__(self, h, cos, sin, mask):
        a = self.args
        b, t, _ = h.shape
        n, k, d = a.num_heads, a.num_key_value_heads, a.head_dim
        q = Linear(n * d, a.attention_bias, name="q_proj", **self.lin)(h).reshape(b, t, n, d)
        kk = Linear(k * d, a.attention_bias, name="k_proj", **self.lin)(h).reshape(b, t, k, d)
        v = Linear(k * d, a.attention_bias, name="v_proj", **self.lin)(h).reshape(b, t, k, d)
        q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
        attend = jax.checkpoint(attention) if a.recompute_activations else attention
        o = attend(q, kk, v, mask).reshape(b, t, n * d)
        return Linear(a.hidden_size, a.o_proj_bias, name="o_proj", **self.lin)(o)


class _MLP(nn.Module):
    args: LlamaArgs
    lin: dict

    @nn.compact
    def __call__(self, h):
        a = self.args
        g = Linear(a.intermediate_size, a.mlp_bias, name="gate_proj", **self.lin)(h)
        u = Linear(a.intermediate_size, a.mlp_bias, name="up_proj", **self.lin)(h)
        act = jax.checkpoint(_swiglu) if a.recompute_activations else _swiglu
        return Linear(a.hidden_size, a.mlp_bias, name="down_proj", **self.lin)(act(g, u))


def _swiglu(g: jax.Array, u: jax.Array) -> jax.Array:
    return nn.silu(g) * u


class LlamaModel(nn.Module):
    """Decoder returning final hidden states; `head_weight` gives the LM head."""
    args: LlamaArgs

    @nn.compact
    def __call__(self, input_ids, positions, mask):
        """input_ids, positions [B, T] int32; mask [B, T, T] bool -> hidden [B, T, D] compute dtype."""
        a = self.args
        emb = self.param("embed_tokens", nn.initializers.normal(0.02),
                         (a.vocab_size, a.hidden_size), a.param_dtype)
        x = jnp.take(emb, input_ids, axis=0).astype(a.dtype)
        inv = rope_inv_freq(a.head_dim, a.rope_theta, dict(a.rope_scaling) if a.rope_scaling else None)
        cos, sin = rope_cos_sin(positions, inv)
        if a.sliding_window is not None:
            mask = sliding_window(mask, positions, a.sliding_window)
        x, _ = stacked(Block, a)(a, name="layers")(x, (cos, sin, mask))
        if not a.tie_word_embeddings:
            self.param("lm_head", nn.initializers.normal(0.02), (a.hidden_size, a.vocab_size),
                       a.param_dtype)
        return Norm(a.rms_norm_eps, False, a.dtype, a.param_dtype, name="norm")(x)


def head_weight(params: dict, args: LlamaArgs) -> jax.Array:
    """The LM head as [D, V] (the transposed embedding when tied)."""
    return params["embed_tokens"].T if args.tie_word_embeddings else params["lm_head"]


# Hugging Face tensor name -> our parameter path. "{i}" is the layer index; paths under "layers"
# are stacked along a leading layer axis. `transpose` turns HF's [out, in] linear weights into ours.
_LIN = [("self_attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
       [("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")]
WEIGHTS = [
    WeightRule("model.embed_tokens.weight", ("embed_tokens",)),
    WeightRule("model.norm.weight", ("norm", "scale")),
    WeightRule("lm_head.weight", ("lm_head",), transpose=True, optional_if_tied=True),
    WeightRule("model.layers.{i}.input_layernorm.weight", ("layers", "input_layernorm", "scale")),
    WeightRule("model.layers.{i}.post_attention_layernorm.weight",
               ("layers", "post_attention_layernorm", "scale")),
] + [
    WeightRule(f"model.layers.{{i}}.{m}.{p}.weight", ("layers", m, p, "kernel"), transpose=True)
    for m, p in _LIN
] + [
    WeightRule(f"model.layers.{{i}}.{m}.{p}.bias", ("layers", m, p, "bias")) for m, p in _LIN
]

"""GPT-NeoX decoder (Pythia, GPT-NeoX-20B): LayerNorm with bias, one fused `query_key_value`
projection, rotary embeddings on the first `rotary_pct` of each head, a GELU MLP, and optionally
the parallel residual `x + attn(ln1(x)) + mlp(ln2(x))`. Layers are stacked and run with `nn.scan`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpref.errors import ModelSourceError
from jaxpref.models.layers import ACTIVATIONS, Linear, Norm, apply_rope, attention, rope_cos_sin, rope_inv_freq
from jaxpref.models.spec import stacked, ArchArgs, WeightRule


@dataclass(frozen=True)
class NeoXArgs(ArchArgs):
    intermediate_size: int = 0
    rotary_dim: int = 0               # features of each head that are rotated
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    attention_bias: bool = True
    hidden_act: str = "gelu"

    @classmethod
    def from_hf(cls, hf: dict, **common) -> "NeoXArgs":
        heads = hf["num_attention_heads"]
        head_dim = hf["hidden_size"] // heads
        # transformers >= 5 folds `rotary_pct` / `rotary_emb_base` into `rope_parameters`.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        pct = rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
        theta = rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0))
        scaling = {k: v for k, v in rope.items() if k not in ("partial_rotary_factor", "rope_theta")}
        act = hf.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ModelSourceError(f"unsupported hidden_act `{act}`; supported: {', '.join(ACTIVATIONS)}")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            head_dim=head_dim,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            intermediate_size=hf.get("intermediate_size") or 4 * hf["hidden_size"],
            rotary_dim=int(head_dim * pct),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(scaling.items())) or None,
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
            use_parallel_residual=bool(hf.get("use_parallel_residual", True)),
            attention_bias=bool(hf.get("attention_bias", True)),
            hidden_act=act,
            **common,
        )


class Block(nn.Module):
    args: NeoXArgs

    @nn.compact
    def __call__(self, x, inputs):
        a = self.args
        cos, sin, mask = inputs
        lin = dict(dtype=a.dtype, param_dtype=a.param_dtype, lora_scale=a.lora_scale,
                   lora_dropout=a.lora_dropout, deterministic=a.deterministic)
        ln1 = Norm(a.layer_norm_eps, True, a.dtype, a.param_dtype, name="input_layernorm")
        ln2 = Norm(a.layer_norm_eps, True, a.dtype, a.param_dtype, name="post_attention_layernorm")
        attn = _Attention(a, lin, name="attention")(ln1(x), cos, sin, mask)
        mlp = _MLP(a, lin, name="mlp")
        if a.use_parallel_residual:
            return x + attn + mlp(ln2(x)), None
        x = x + attn
        return x + mlp(ln2(x)), None


class _Attention(nn.Module):
    args: NeoXArgs
    lin: dict

    @nn.compact
    def __call__(self, h, cos, sin, mask):
        a = self.args
        b, t, _ = h.shape
        n, d = a.num_heads, a.head_dim
        # HF lays the fused output out per head: [head0: q k v, head1: q k v, ...].
        qkv = Linear(3 * n * d, a.attention_bias, name="query_key_value", **self.lin)(h)
        q, k, v = jnp.split(qkv.reshape(b, t, n, 3 * d), 3, axis=-1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attend = jax.checkpoint(attention) if a.recompute_activations else attention
        o = attend(q, k, v, mask).reshape(b, t, n * d)
        return Linear(a.hidden_size, a.attention_bias, name="dense", **self.lin)(o)


class _MLP(nn.Module):
    args: NeoXArgs
    lin: dict

    @nn.compact
    def __call__(self, h):
        a = self.args
        u = Linear(a.intermediate_size, True, name="dense_h_to_4h", **self.lin)(h)
        act = ACTIVATIONS[a.hidden_act]
        act = jax.checkpoint(act) if a.recompute_activations else act
        return Linear(a.hidden_size, True, name="dense_4h_to_h", **self.lin)(act(u))


class NeoXModel(nn.Module):
    """Decoder returning final hidden states; `head_weight` gives the LM head (`embed_out`)."""
    args: NeoXArgs

    @nn.compact
    def __call__(self, input_ids, positions, mask):
        """input_ids, positions [B, T] int32; mask [B, T, T] bool -> hidden [B, T, D] compute dtype."""
        a = self.args
        emb = self.param("embed_in", nn.initializers.normal(0.02), (a.vocab_size, a.hidden_size),
                         a.param_dtype)
        x = jnp.take(emb, input_ids, axis=0).astype(a.dtype)
        inv = rope_inv_freq(a.rotary_dim, a.rope_theta, dict(a.rope_scaling) if a.rope_scaling else None)
        cos, sin = rope_cos_sin(positions, inv)
        x, _ = stacked(Block, a)(a, name="layers")(x, (cos, sin, mask))
        if not a.tie_word_embeddings:
            self.param("embed_out", nn.initializers.normal(0.02), (a.hidden_size, a.vocab_size),
                       a.param_dtype)
        return Norm(a.layer_norm_eps, True, a.dtype, a.param_dtype, name="final_layer_norm")(x)


def head_weight(params: dict, args: NeoXArgs) -> jax.Array:
    """The LM head as [D, V]."""
    return params["embed_in"].T if args.tie_word_embeddings else params["embed_out"]


_NORMS = ("input_layernorm", "post_attention_layernorm")
_LIN = [("attention", "query_key_value"), ("attention", "dense"),
        ("mlp", "dense_h_to_4h"), ("mlp", "dense_4h_to_h")]
WEIGHTS = [
    WeightRule("gpt_neox.embed_in.weight", ("embed_in",)),
    WeightRule("gpt_neox.final_layer_norm.weight", ("final_layer_norm", "scale")),
    WeightRule("gpt_neox.final_layer_norm.bias", ("final_layer_norm", "bias")),
    WeightRule("embed_out.weight", ("embed_out",), transpose=True, optional_if_tied=True),
    # transformers >= 5 names the head `lm_head` in memory (and saves it back as `embed_out`).
    WeightRule("lm_head.weight", ("embed_out",), transpose=True, optional_if_tied=True),
] + [
    WeightRule(f"gpt_neox.layers.{{i}}.{n}.{w}", ("layers", n, p))
    for n in _NORMS for w, p in (("weight", "scale"), ("bias", "bias"))
] + [
    WeightRule(f"gpt_neox.layers.{{i}}.{m}.{p}.weight", ("layers", m, p, "kernel"), transpose=True)
    for m, p in _LIN
] + [
    WeightRule(f"gpt_neox.layers.{{i}}.{m}.{p}.bias", ("layers", m, p, "bias")) for m, p in _LIN
]
# Buffers that older checkpoints carry: the causal-mask tables and rotary frequencies.
IGNORED = (r".*attention\.bias", r".*attention\.masked_bias", r".*rotary_emb\.inv_freq")

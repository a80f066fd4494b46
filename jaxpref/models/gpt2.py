"""GPT-2 decoder: learned position embeddings, pre-LayerNorm blocks, one fused `c_attn`
projection, a GELU MLP, LM head tied to `wte`. Layers are stacked and run with `nn.scan`.

Hugging Face stores GPT-2's projections as `Conv1D` weights [in, out], which is already our
kernel layout: no transpose when loading, and `fan_in_fan_out: true` for PEFT.
"""
from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpref.errors import ModelSourceError
from jaxpref.models.layers import ACTIVATIONS, Linear, Norm, attention
from jaxpref.models.spec import stacked, ArchArgs, WeightRule


@dataclass(frozen=True)
class GPT2Args(ArchArgs):
    intermediate_size: int = 0
    max_positions: int = 1024
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False

    @classmethod
    def from_hf(cls, hf: dict, **common) -> "GPT2Args":
        d, heads = hf["n_embd"], hf["n_head"]
        act = hf.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ModelSourceError(f"unsupported activation_function `{act}`; supported: {', '.join(ACTIVATIONS)}")
        if hf.get("add_cross_attention"):
            raise ModelSourceError("GPT-2 with add_cross_attention (an encoder-decoder) is not supported")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=d,
            num_layers=hf["n_layer"],
            num_heads=heads,
            head_dim=d // heads,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            intermediate_size=hf.get("n_inner") or 4 * d,
            max_positions=hf.get("n_positions", 1024),
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation=act,
            scale_attn_weights=bool(hf.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
            **common,
        )


class Block(nn.Module):
    args: GPT2Args

    @nn.compact
    def __call__(self, x, mask, layer):
        """`layer` is this block's index (a scalar from the scan), for the optional 1/(layer+1)."""
        a = self.args
        lin = dict(dtype=a.dtype, param_dtype=a.param_dtype, lora_scale=a.lora_scale,
                   lora_dropout=a.lora_dropout, deterministic=a.deterministic)
        h = Norm(a.layer_norm_eps, True, a.dtype, a.param_dtype, name="ln_1")(x)
        x = x + _Attention(a, lin, name="attn")(h, mask, layer)
        h = Norm(a.layer_norm_eps, True, a.dtype, a.param_dtype, name="ln_2")(x)
        return x + _MLP(a, lin, name="mlp")(h), None


class _Attention(nn.Module):
    args: GPT2Args
    lin: dict

    @nn.compact
    def __call__(self, h, mask, layer):
        a = self.args
        b, t, _ = h.shape
        n, d = a.num_heads, a.head_dim
        qkv = Linear(3 * n * d, True, name="c_attn", **self.lin)(h)
        q, k, v = (z.reshape(b, t, n, d) for z in jnp.split(qkv, 3, axis=-1))
        # `attention` scales by 1/sqrt(d); fold any other scale HF asks for into q.
        if not a.scale_attn_weights:
            q = q * jnp.asarray(d ** 0.5, q.dtype)
        if a.scale_attn_by_inverse_layer_idx:
            q = q / (layer + 1).astype(q.dtype)
        attend = jax.checkpoint(attention) if a.recompute_activations else attention
        o = attend(q, k, v, mask).reshape(b, t, n * d)
        return Linear(a.hidden_size, True, name="c_proj", **self.lin)(o)


class _MLP(nn.Module):
    args: GPT2Args
    lin: dict

    @nn.compact
    def __call__(self, h):
        a = self.args
        u = Linear(a.intermediate_size, True, name="c_fc", **self.lin)(h)
        act = ACTIVATIONS[a.activation]
        act = jax.checkpoint(act) if a.recompute_activations else act
        return Linear(a.hidden_size, True, name="c_proj", **self.lin)(act(u))


class GPT2Model(nn.Module):
    """Decoder returning final hidden states; `head_weight` gives the LM head (tied `wte`)."""
    args: GPT2Args

    @nn.compact
    def __call__(self, input_ids, positions, mask):
        """input_ids, positions [B, T] int32; mask [B, T, T] bool -> hidden [B, T, D] compute dtype.

        `positions` index the learned `wpe` table, so left-padded rows keep their real positions.
        """
        a = self.args
        wte = self.param("wte", nn.initializers.normal(0.02), (a.vocab_size, a.hidden_size), a.param_dtype)
        wpe = self.param("wpe", nn.initializers.normal(0.01), (a.max_positions, a.hidden_size), a.param_dtype)
        x = (jnp.take(wte, input_ids, axis=0) + jnp.take(wpe, positions, axis=0)).astype(a.dtype)
        x, _ = stacked(Block, a, in_axes=(nn.broadcast, 0))(a, name="layers")(x, mask, jnp.arange(a.num_layers))
        if not a.tie_word_embeddings:
            self.param("lm_head", nn.initializers.normal(0.02), (a.hidden_size, a.vocab_size),
                       a.param_dtype)
        return Norm(a.layer_norm_eps, True, a.dtype, a.param_dtype, name="ln_f")(x)


def head_weight(params: dict, args: GPT2Args) -> jax.Array:
    """The LM head as [D, V] (the transposed `wte` when tied, as GPT-2 always is on the hub)."""
    return params["wte"].T if args.tie_word_embeddings else params["lm_head"]


_NORMS = ("ln_1", "ln_2")
_LIN = [("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")]


def _rules(prefix: str) -> list[WeightRule]:
    return [
        WeightRule(f"{prefix}wte.weight", ("wte",)),
        WeightRule(f"{prefix}wpe.weight", ("wpe",)),
        WeightRule(f"{prefix}ln_f.weight", ("ln_f", "scale")),
        WeightRule(f"{prefix}ln_f.bias", ("ln_f", "bias")),
    ] + [
        WeightRule(f"{prefix}h.{{i}}.{n}.{w}", ("layers", n, p))
        for n in _NORMS for w, p in (("weight", "scale"), ("bias", "bias"))
    ] + [
        # Conv1D: stored [in, out] already.
        WeightRule(f"{prefix}h.{{i}}.{m}.{p}.{w}", ("layers", m, p, leaf))
        for m, p in _LIN for w, leaf in (("weight", "kernel"), ("bias", "bias"))
    ]


# The `transformer.`-prefixed names (GPT2LMHeadModel) come first: they are the HF module names
# that LoRA targets and PEFT exports use. The original openai-community/gpt2 checkpoint was saved
# from the bare GPT2Model, without the prefix; the second copy of the rules reads it.
WEIGHTS = _rules("transformer.") + [
    WeightRule("lm_head.weight", ("lm_head",), transpose=True, optional_if_tied=True),
] + _rules("")
# Buffers that older checkpoints carry: the causal-mask tables.
IGNORED = (r".*attn\.bias", r".*attn\.masked_bias")

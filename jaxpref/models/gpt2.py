"""GPT-2: learned position embeddings, pre-LayerNorm blocks, one fused `c_attn` projection
laid out [q | k | v], a GELU MLP, LM head tied to `wte`. The decoder itself is
`jaxpref.models.blocks`.

Hugging Face stores GPT-2's projections as `Conv1D` weights [in, out], which is already our
kernel layout: no transpose when loading, and `fan_in_fan_out: true` for PEFT.
"""
from __future__ import annotations

from dataclasses import dataclass

from jaxpref.errors import ModelSourceError
from jaxpref.models.blocks import AttnSpec, DecoderSpec, MLPSpec
from jaxpref.models.layers import ACTIVATIONS
from jaxpref.models.spec import ArchArgs, WeightRule


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

    def spec(self) -> DecoderSpec:
        return DecoderSpec(
            embed="wte", head="lm_head", final_norm="ln_f", norms=("ln_1", "ln_2"),
            layer_norm=True, norm_eps=self.layer_norm_eps, positions="wpe", max_positions=self.max_positions,
            attn=AttnSpec("attn", ("c_attn",), "c_proj", self.num_heads, qkv_bias=True, out_bias=True,
                          q_scale=1.0 if self.scale_attn_weights else self.head_dim ** 0.5,
                          inverse_layer_scale=self.scale_attn_by_inverse_layer_idx),
            mlp=MLPSpec("mlp", ("c_fc",), "c_proj", self.intermediate_size, self.activation, bias=True))


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

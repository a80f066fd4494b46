"""Llama family (Llama 2/3.x, Mistral, Qwen2/2.5, SmolLM/SmolLM2): RMSNorm, rotary embeddings,
grouped-query attention with separate q/k/v projections, SwiGLU MLP, optional sliding window
(on every layer, or on some: Qwen2's `max_window_layers`).
The decoder itself is `jaxpref.models.blocks`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaxpref.errors import ModelSourceError
from jaxpref.models.blocks import AttnSpec, DecoderSpec, MLPSpec, RopeSpec, windows
from jaxpref.models.rope_config import resolve
from jaxpref.models.spec import ArchArgs, WeightRule


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
    sliding_window: int | None = None   # each token sees the last `sliding_window` positions
    sliding_layers: tuple[bool, ...] = ()   # the layers that have the window (() : all)
    hidden_act: str = "silu"              # the gated MLP's activation (transformers' ACT2FN[hidden_act])

    @classmethod
    def from_hf(cls, hf: dict, **common) -> "LlamaArgs":
        hf = {**DEFAULTS.get(hf.get("model_type"), {}), **hf}   # an explicit null stays
        heads = hf["num_attention_heads"]
        kind = hf.get("model_type")
        # transformers reads `attention_bias` / `mlp_bias` only where its modeling code has the
        # option; elsewhere the biases are fixed (Qwen2: q/k/v always, o never; Mistral, Mixtral,
        # Phi-3: none) and a stray key in config.json changes nothing.
        bias = bool(hf.get("attention_bias", False)) and kind in _ATTENTION_BIAS
        qkv_bias = bias or kind == "qwen2"
        rope = hf.get("rope_scaling") or hf.get("rope_parameters")
        theta = hf.get("rope_theta")
        if theta is None and isinstance(rope, dict):
            theta = rope.get("rope_theta")
        window, sliding = hf_windows(hf)
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        rotated = head_dim
        if isinstance(rope, dict):
            rotated = int(head_dim * rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        scaling = resolve(hf, rope, kind, rotated)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            head_dim=head_dim,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            intermediate_size=hf["intermediate_size"],
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta or 10000.0),
            rope_scaling=scaling,
            attention_bias=bool(qkv_bias),
            o_proj_bias=bias,
            mlp_bias=bool(hf.get("mlp_bias", False)) and kind == "llama",
            sliding_window=window,
            sliding_layers=sliding,
            hidden_act=hf.get("hidden_act") or "silu",
            **common,
        )

    def spec(self) -> DecoderSpec:
        return DecoderSpec(
            embed="embed_tokens", head="lm_head", final_norm="norm",
            norms=("input_layernorm", "post_attention_layernorm"), norm_eps=self.rms_norm_eps,
            attn=AttnSpec("self_attn", ("q_proj", "k_proj", "v_proj"), "o_proj", self.num_key_value_heads,
                          qkv_bias=self.attention_bias, out_bias=self.o_proj_bias),
            mlp=MLPSpec("mlp", ("gate_proj", "up_proj"), "down_proj", self.intermediate_size, self.hidden_act,
                        bias=self.mlp_bias),
            rope=RopeSpec(self.head_dim, self.rope_theta, self.rope_scaling),
            **windows(self.sliding_window, self.sliding_layers))


# transformers' config-class defaults that differ from LlamaConfig's (which `from_hf` falls back
# on), for a config.json that leaves the key out (hand-written or trimmed configs).
DEFAULTS = {
    "mistral": dict(num_key_value_heads=8, sliding_window=4096),
    "mixtral": dict(num_key_value_heads=8, sliding_window=None, rms_norm_eps=1e-5),   # RoPE base: mixtral.py
    "qwen2": dict(sliding_window=4096),
    "qwen3": dict(sliding_window=4096),
    "qwen3_moe": dict(num_key_value_heads=4, sliding_window=4096),
    "olmo2": dict(rms_norm_eps=1e-5),
    "phi3": dict(rms_norm_eps=1e-5),
}


_ATTENTION_BIAS = ("llama", "qwen3", "qwen3_moe", "olmo2")   # the configs whose attention_bias counts


def hf_windows(hf: dict) -> tuple[int | None, tuple[bool, ...]]:
    """(window, the layers that have it; () : all) as transformers reads config.json. Mistral and
    Phi-3 window every layer (`sliding_window`); Qwen2 and Qwen3 only with `use_sliding_window`,
    and only the layers `layer_types` calls "sliding_attention" (written out by transformers >= 5;
    else those from `max_window_layers` on, 28 when absent as in transformers' configs)."""
    window = hf.get("sliding_window")
    kind = hf.get("model_type")
    if window is None or kind not in ("mistral", "qwen2", "qwen3", "phi3"):
        return None, ()
    if kind in ("mistral", "phi3"):
        return int(window), ()
    if not hf.get("use_sliding_window", False):
        return None, ()
    n = hf["num_hidden_layers"]
    kinds = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28)
                                      else "full_attention" for i in range(n)]
    if len(kinds) != n:
        raise ModelSourceError(f"`layer_types` has {len(kinds)} entries for {n} layers")
    sliding = tuple(k == "sliding_attention" for k in kinds)
    return (int(window), sliding) if any(sliding) else (None, ())


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

"""GPT-NeoX (Pythia, GPT-NeoX-20B): LayerNorm with bias, one fused `query_key_value` projection
laid out per head, rotary embeddings on the first `rotary_pct` of each head, a GELU MLP, and
optionally the parallel residual `x + attn(ln1(x)) + mlp(ln2(x))`. The decoder itself is
`jaxpref.models.blocks`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaxpref.errors import ModelSourceError
from jaxpref.models.blocks import AttnSpec, DecoderSpec, MLPSpec, RopeSpec
from jaxpref.models.layers import ACTIVATIONS
from jaxpref.models.rope_config import resolve
from jaxpref.models.spec import ArchArgs, WeightRule


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
            rope_scaling=resolve(hf, scaling, "gpt_neox", int(head_dim * pct)) or None,
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
            use_parallel_residual=bool(hf.get("use_parallel_residual", True)),
            attention_bias=bool(hf.get("attention_bias", True)),
            hidden_act=act,
            **common,
        )

    def spec(self) -> DecoderSpec:
        return DecoderSpec(
            embed="embed_in", head="embed_out", final_norm="final_layer_norm",
            norms=("input_layernorm", "post_attention_layernorm"), layer_norm=True, norm_eps=self.layer_norm_eps,
            attn=AttnSpec("attention", ("query_key_value",), "dense", self.num_heads, fused_per_head=True,
                          qkv_bias=self.attention_bias, out_bias=self.attention_bias),
            mlp=MLPSpec("mlp", ("dense_h_to_4h",), "dense_4h_to_h", self.intermediate_size, self.hidden_act,
                        bias=True),
            rope=RopeSpec(self.rotary_dim, self.rope_theta, self.rope_scaling),
            parallel_residual=self.use_parallel_residual)


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

"""Gemma, Gemma 2 and Gemma 3 (text): the Llama decoder with Gemma's choices, one args class for
the three `model_type`s (`gemma`, `gemma2`, `gemma3_text`; a `gemma3` config's `text_config`).

- All three: token embeddings times sqrt(hidden_size) in the compute dtype; RMSNorms that
  multiply by (1 + weight) in fp32; GeGLU (tanh GELU); `head_dim` from the config (256 when
  absent); embeddings tied unless the config says otherwise.
- Gemma 2: norms before and after each sublayer (`input_layernorm` -> attention ->
  `post_attention_layernorm`, `pre_feedforward_layernorm` -> MLP -> `post_feedforward_layernorm`);
  scores scaled by 1/sqrt(`query_pre_attn_scalar`); the attention-logit and final-logit soft-caps;
  a sliding window on the layers `layer_types` calls "sliding_attention" (every other one).
- Gemma 3: Gemma 2's layout with per-head q/k RMSNorms (Qwen3's, unit-offset as every Gemma
  norm), local (sliding) layers and every `sliding_window_pattern`-th layer global, and two RoPEs:
  the local layers' base `rope_local_base_freq` (10k), the global layers' `rope_theta` (1M) with
  the config's scaling (linear x8 on Gemma 3 4B and larger). A final-logit soft-cap if configured;
  an attention-logit one is not applied, as in transformers' Gemma 3 (which reads the key but
  never passes it to attention; no released Gemma 3 sets it).

Defaults for keys a config.json leaves out are transformers' (its Gemma config classes): a Gemma 3
`text_config` on the hub often names only the sizes it changes. The decoder itself is
`jaxpref.models.blocks`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from jaxpref.errors import ModelSourceError
from jaxpref.models import llama
from jaxpref.models.blocks import DecoderSpec, RopeSpec
from jaxpref.models.rope_config import KINDS, resolve
from jaxpref.models.spec import WeightRule

FAMILIES = ("gemma", "gemma2", "gemma3_text")
_COMMON = dict(head_dim=256, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
               hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None, attn_logit_softcapping=None)
# transformers' GemmaConfig, Gemma2Config and Gemma3TextConfig defaults.
_DEFAULTS = {
    "gemma": dict(_COMMON, vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, rope_theta=10000.0),
    "gemma2": dict(_COMMON, vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, rope_theta=10000.0, query_pre_attn_scalar=256,
                   sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(_COMMON, vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, rope_theta=1_000_000.0,
                        rope_local_base_freq=10_000.0, query_pre_attn_scalar=256, sliding_window=4096),
}
_SLIDING_EVERY = {"gemma2": 2, "gemma3_text": 6}   # the default layer_types: each n-th layer is global


@dataclass(frozen=True)
class GemmaArgs(llama.LlamaArgs):
    family: str = "gemma"                  # gemma | gemma2 | gemma3_text
    activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 0.0     # scores times its 1/sqrt (0: head_dim, Gemma 1)
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Gemma 3: the RoPE of the local layers (`sliding_layers` marks them, every layer listed).
    local_rope_theta: float = 10_000.0
    local_rope_scaling: Any = None

    @classmethod
    def from_hf(cls, hf: dict, **common) -> "GemmaArgs":
        if hf.get("model_type") == "gemma3":   # the multimodal config: its text decoder
            hf = {**(hf.get("text_config") or {}), "model_type": "gemma3_text"}
        family = hf["model_type"]
        hf = {**_DEFAULTS[family], **hf}   # an explicit null stays: no soft-cap, no window
        if hf.get("use_bidirectional_attention"):
            raise ModelSourceError(f"{family}: `use_bidirectional_attention` (an encoder) is not supported")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        act = hf.get("hidden_act") if family == "gemma" else hf.get("hidden_activation")
        if act is None or (act == "gelu" and family == "gemma"):  # Gemma 1's legacy "gelu" is the tanh form
            act = "gelu_pytorch_tanh"
        glob, local = _rope_parameters(hf, family)
        sliding = _sliding_layers(hf, family)
        window = hf.get("sliding_window") if any(sliding) else None
        softcap = lambda key: None if hf.get(key) is None else float(hf[key])
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, head_dim=head_dim, tie_word_embeddings=bool(hf["tie_word_embeddings"]),
            intermediate_size=hf["intermediate_size"], num_key_value_heads=hf.get("num_key_value_heads") or heads,
            rms_norm_eps=hf["rms_norm_eps"], rope_theta=float(glob.pop("rope_theta")),
            rope_scaling=_scaling(hf, glob, family, head_dim),
            attention_bias=bool(hf["attention_bias"]), o_proj_bias=bool(hf["attention_bias"]),
            sliding_window=None if window is None else int(window), sliding_layers=sliding,
            family=family, activation=act,
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or head_dim),
            attn_logit_softcap=softcap("attn_logit_softcapping") if family == "gemma2" else None,
            final_logit_softcap=softcap("final_logit_softcapping"),
            local_rope_theta=float(local.pop("rope_theta")),
            local_rope_scaling=_scaling(hf, local, family, head_dim),
            **common)

    def spec(self) -> DecoderSpec:
        s = super().spec()
        attn = dataclasses.replace(s.attn, q_scale=(self.head_dim / self.query_pre_attn_scalar) ** 0.5,
                                   logit_softcap=self.attn_logit_softcap)
        extra = {}
        if self.family != "gemma":   # Gemma 2 and 3: a norm before and after each sublayer
            extra = dict(norms=("input_layernorm", "pre_feedforward_layernorm"),
                         post_norms=("post_attention_layernorm", "post_feedforward_layernorm"))
        if self.family == "gemma3_text":
            attn = dataclasses.replace(attn, qk_norm=("q_norm", "k_norm"))
            if any(self.sliding_layers):
                extra.update(local_rope=RopeSpec(self.head_dim, self.local_rope_theta, self.local_rope_scaling),
                             local_rope_layers=self.sliding_layers)
        # An RMSNorm of 1 + weight whatever it normalises; sqrt(hidden) as transformers computes it.
        return dataclasses.replace(
            s, attn=attn, mlp=dataclasses.replace(s.mlp, activation=self.activation),
            embed_scale=self.hidden_size ** 0.5, norm_unit_offset=True,
            final_logit_softcap=self.final_logit_softcap, **extra)


def _rope_parameters(hf: dict, family: str) -> tuple[dict, dict]:
    """(global, local) RoPE settings, each with its `rope_theta` (local: Gemma 3 only), from
    transformers >= 5's `rope_parameters` (per layer type for Gemma 3) or the older `rope_theta`,
    `rope_local_base_freq` and `rope_scaling` (the global layers' scaling)."""
    rp = hf.get("rope_parameters")
    if family == "gemma3_text" and isinstance(rp, dict) and {"full_attention", "sliding_attention"} & set(rp):
        glob, local = dict(rp.get("full_attention") or {}), dict(rp.get("sliding_attention") or {})
    else:
        glob, local = dict(hf.get("rope_scaling") or rp or {}), {}
    if "rope_theta" not in glob or glob["rope_theta"] is None:
        glob["rope_theta"] = hf.get("rope_theta") or _DEFAULTS[family]["rope_theta"]
    if "rope_theta" not in local or local["rope_theta"] is None:
        local["rope_theta"] = hf.get("rope_local_base_freq") or _DEFAULTS["gemma3_text"]["rope_local_base_freq"]
    for which, r in (("global", glob), ("local", local)):
        kind = _kind(r)
        if kind not in KINDS:
            raise ModelSourceError(f"{family}: {which} rope type `{kind}` is not supported ({', '.join(KINDS)})")
    return glob, local


def _scaling(hf: dict, rope: dict, family: str, rotary_dim: int):
    """A RoPE's scaling as the frozen pairs the decoder reads, its defaults resolved as transformers
    does (`rope_config.resolve`), None for plain RoPE."""
    return None if _kind(rope) == "default" else resolve(hf, rope, family, rotary_dim)


def _kind(rope: dict) -> str:
    return rope.get("rope_type", rope.get("type", "default"))


def _sliding_layers(hf: dict, family: str) -> tuple[bool, ...]:
    """One entry per layer, True where `layer_types` says "sliding_attention"; without it,
    transformers' default: every layer but each `sliding_window_pattern`-th (Gemma 2: 2, Gemma 3:
    6). Gemma 1 has no window."""
    n = hf["num_hidden_layers"]
    if family == "gemma":
        return (False,) * n
    kinds = hf.get("layer_types")
    if kinds is None:
        every = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or _SLIDING_EVERY[family]
        kinds = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    if len(kinds) != n:
        raise ModelSourceError(f"`layer_types` has {len(kinds)} entries for {n} layers")
    return tuple(k == "sliding_attention" for k in kinds)


_NORMS = [("pre_feedforward_layernorm",), ("post_feedforward_layernorm",), ("self_attn", "q_norm"),
          ("self_attn", "k_norm")]
# Llama's names, plus Gemma 2's extra norms and Gemma 3's q/k norms (each read where the
# configuration has it).
WEIGHTS = llama.WEIGHTS + [
    WeightRule(f"model.layers.{{i}}.{'.'.join(path)}.weight", ("layers", *path, "scale")) for path in _NORMS
]

"""OLMo 2: the Llama decoder with its norms after the sublayers instead of before them
(x + norm(attn(x)), then x + norm(mlp(x)): `post_attention_layernorm`,
`post_feedforward_layernorm`), and an RMSNorm over the full q and k widths before RoPE (`q_norm`
[N*H], `k_norm` [K*H]). OLMo 2's RMSNorm multiplies by its weight in fp32 before rounding. The
decoder itself is `jaxpref.models.blocks`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jaxpref.models import llama
from jaxpref.models.blocks import DecoderSpec
from jaxpref.models.spec import WeightRule


@dataclass(frozen=True)
class Olmo2Args(llama.LlamaArgs):
    def spec(self) -> DecoderSpec:
        s = super().spec()
        return dataclasses.replace(
            s, norms=(None, None), post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
            norm_fp32_scale=True,
            attn=dataclasses.replace(s.attn, qk_norm=("q_norm", "k_norm"), qk_norm_full_width=True))


_NORMS = [("post_attention_layernorm",), ("post_feedforward_layernorm",), ("self_attn", "q_norm"),
          ("self_attn", "k_norm")]
WEIGHTS = [r for r in llama.WEIGHTS if "layernorm" not in r.hf_name] + [
    WeightRule(f"model.layers.{{i}}.{'.'.join(path)}.weight", ("layers", *path, "scale")) for path in _NORMS
]

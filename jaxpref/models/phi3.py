"""Phi-3 / Phi-3.5 / Phi-4 (`model_type` phi3): the Llama decoder with one fused `qkv_proj`
([q | k | v], grouped-query widths) and one fused `gate_up_proj` ([gate | up]), rotary embeddings
on the first `partial_rotary_factor` of each head (Phi-4-mini: 0.75), LongRoPE scaling (Phi-3
128k, Phi-3.5) and a sliding window on every layer where configured. LoRA sits on the fused
modules, as PEFT puts it. The decoder itself is `jaxpref.models.blocks`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jaxpref.errors import ModelSourceError
from jaxpref.models import llama
from jaxpref.models.blocks import DecoderSpec, RopeSpec
from jaxpref.models.rope_config import longrope
from jaxpref.models.spec import WeightRule


@dataclass(frozen=True)
class Phi3Args(llama.LlamaArgs):
    rotary_dim: int = 0               # features of each head that are rotated

    @classmethod
    def from_hf(cls, hf: dict, **common) -> "Phi3Args":
        args = super().from_hf(hf, **common)
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rotary_dim = int(args.head_dim * rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        return dataclasses.replace(args, rotary_dim=rotary_dim, rope_scaling=_rope_scaling(hf, rope, rotary_dim))

    def spec(self) -> DecoderSpec:
        s = super().spec()
        return dataclasses.replace(
            s, attn=dataclasses.replace(s.attn, qkv=("qkv_proj",)),
            mlp=dataclasses.replace(s.mlp, up=("gate_up_proj",), fused_up=True),
            rope=RopeSpec(self.rotary_dim, self.rope_theta, self.rope_scaling))


def _rope_scaling(hf: dict, rope: dict, rotary_dim: int) -> tuple | None:
    """None (plain RoPE), or LongRoPE's factors with transformers' defaults resolved
    (`rope_config.longrope`)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("su", "yarn"):    # older names transformers' Phi-3 reads as LongRoPE
        kind = "longrope"
    if kind == "default":
        return None
    if kind != "longrope":
        raise ModelSourceError(f"phi3: rope type `{kind}` is not supported (default or longrope)")
    return longrope(hf, rope, rotary_dim, "phi3")


_LIN = [("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj")]
WEIGHTS = [r for r in llama.WEIGHTS if r.path[-1] != "kernel" and r.path[-1] != "bias"] + [
    WeightRule(f"model.layers.{{i}}.{m}.{p}.weight", ("layers", m, p, "kernel"), transpose=True)
    for m, p in _LIN
]

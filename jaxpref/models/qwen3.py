"""Qwen3 (dense): the Llama decoder with an RMSNorm over each head of q and of k before RoPE
(`q_norm`, `k_norm`, weights [head_dim]), `head_dim` from the config (128 when absent, as in
transformers), bias on all four attention projections or none (`attention_bias`), tied or untied
embeddings, and Qwen2's sliding window on the layers `layer_types` marks. The decoder itself is
`jaxpref.models.blocks`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jaxpref.models import llama
from jaxpref.models.blocks import DecoderSpec
from jaxpref.models.spec import WeightRule


@dataclass(frozen=True)
class Qwen3Args(llama.LlamaArgs):
    @classmethod
    def from_hf(cls, hf: dict, **common) -> "Qwen3Args":
        # Qwen3Config's head_dim defaults to 128, not hidden_size // heads.
        return super().from_hf({**hf, "head_dim": hf.get("head_dim") or 128}, **common)

    def spec(self) -> DecoderSpec:
        s = super().spec()
        return dataclasses.replace(s, attn=dataclasses.replace(s.attn, qk_norm=("q_norm", "k_norm")))


WEIGHTS = llama.WEIGHTS + [
    WeightRule(f"model.layers.{{i}}.self_attn.{n}.weight", ("layers", "self_attn", n, "scale"))
    for n in ("q_norm", "k_norm")
]

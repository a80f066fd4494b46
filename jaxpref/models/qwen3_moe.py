"""Qwen3-MoE (`model_type` qwen3_moe): Qwen3's attention (RMSNorms over each head of q and k, bias
on all four projections or none) with a mixture of `num_experts` SwiGLU experts of width
`moe_intermediate_size` in place of every MLP, `num_experts_per_tok` per token, their routing
weights renormalised only with `norm_topk_prob` (`jaxpref.models.moe`). head_dim is the config's,
else hidden_size / heads (Qwen3MoeConfig has no default of its own, unlike dense Qwen3's 128).
`use_sliding_window` windows every layer (transformers 5 reads no `max_window_layers` here).

Checkpoints store `mlp.gate` and the experts one by one (`mlp.experts.{e}.gate_proj/up_proj/
down_proj`); transformers 5 fuses them into `mlp.experts.gate_up_proj` and `down_proj`, as we
hold them. Dense MLP layers among the expert layers (`mlp_only_layers`, `decoder_sparse_step`
> 1) are refused: the layer scan compiles one layer for all.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jaxpref.errors import ModelSourceError
from jaxpref.models import llama, qwen3
from jaxpref.models.blocks import DecoderSpec
from jaxpref.models.mixtral import moe_weights
from jaxpref.models.moe import MoESpec


@dataclass(frozen=True)
class Qwen3MoeArgs(llama.LlamaArgs):
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    activation: str = "silu"
    # TRL adds this times the router's load-balancing loss to the training loss (transformers'
    # default 0.001; 0 turns it off there and here).
    router_aux_loss_coef: float = 0.001

    @classmethod
    def from_hf(cls, hf: dict, **common) -> "Qwen3MoeArgs":
        hf = {**llama.DEFAULTS["qwen3_moe"], **hf}
        n = hf["num_hidden_layers"]
        experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
        step = int(hf.get("decoder_sparse_step") or 1)
        dense = [i for i in range(n) if i in (hf.get("mlp_only_layers") or []) or experts == 0 or (i + 1) % step]
        if dense:
            raise ModelSourceError(f"qwen3_moe: layers {dense[:4]} have a dense MLP (`mlp_only_layers` / "
                                   "`decoder_sparse_step`); jaxpref supports only models whose every layer is "
                                   "a mixture of experts")
        args = super().from_hf(hf, **common)
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        return dataclasses.replace(
            args, num_experts=experts, experts_per_token=int(hf["num_experts_per_tok"]),
            moe_intermediate_size=int(hf["moe_intermediate_size"]),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)), activation=hf.get("hidden_act", "silu"),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
            sliding_window=None if window is None else int(window), sliding_layers=())

    def spec(self) -> DecoderSpec:
        s = super().spec()
        return dataclasses.replace(
            s, attn=dataclasses.replace(s.attn, qk_norm=("q_norm", "k_norm")),
            mlp=MoESpec("mlp", self.num_experts, self.experts_per_token, self.moe_intermediate_size,
                        self.activation, renormalize=self.norm_topk_prob))


WEIGHTS = [r for r in qwen3.WEIGHTS if r.path[:2] != ("layers", "mlp")] + \
    moe_weights("model.layers.{i}.mlp", ("gate_proj", "up_proj", "down_proj"))

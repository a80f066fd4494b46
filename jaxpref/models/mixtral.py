"""Mixtral (`model_type` mixtral): the Mistral decoder (grouped-query attention, a sliding window
on every layer where `sliding_window` is set) with a mixture of `num_local_experts` SwiGLU experts
in place of the MLP, `num_experts_per_tok` of them per token, their routing weights renormalised
over the chosen ones (`jaxpref.models.moe`).

Checkpoints store the router as `block_sparse_moe.gate` and each expert's matrices one by one
(`block_sparse_moe.experts.{e}.w1` gate, `w3` up, `w2` down); transformers 5 reads them into
`mlp.gate` and the fused `mlp.experts.gate_up_proj` [E, 2I, D] / `down_proj` [E, D, I] (and writes
the per-expert names back on `save_pretrained`), and PEFT adapters use those transformers 5 names.
`router_jitter_noise` (noise on the router input while training; 0 in released configs) is not
applied.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jaxpref.models import llama
from jaxpref.models.blocks import DecoderSpec
from jaxpref.models.moe import MoESpec
from jaxpref.models.spec import WeightRule


@dataclass(frozen=True)
class MixtralArgs(llama.LlamaArgs):
    num_experts: int = 0
    experts_per_token: int = 0
    activation: str = "silu"
    # TRL adds this times the router's load-balancing loss to the training loss (transformers'
    # default 0.001; 0 turns it off there and here).
    router_aux_loss_coef: float = 0.001

    @classmethod
    def from_hf(cls, hf: dict, **common) -> "MixtralArgs":
        # Mistral's attention, its window on every layer.
        rope = hf.get("rope_scaling") or hf.get("rope_parameters")
        if hf.get("rope_theta") is None and not (isinstance(rope, dict) and rope.get("rope_theta")):
            hf = {**hf, "rope_theta": 1e6}   # MixtralConfig's RoPE base when config.json names none
        args = super().from_hf({**llama.DEFAULTS["mixtral"], **hf, "model_type": "mistral"}, **common)
        return dataclasses.replace(args, num_experts=int(hf["num_local_experts"]),
                                   experts_per_token=int(hf["num_experts_per_tok"]),
                                   activation=hf.get("hidden_act", "silu"),
                                   router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))

    def spec(self) -> DecoderSpec:
        return dataclasses.replace(super().spec(), mlp=MoESpec(
            "mlp", self.num_experts, self.experts_per_token, self.intermediate_size, self.activation,
            renormalize=True))


def moe_weights(prefix: str, names: tuple[str, str, str], router: str = "gate") -> list[WeightRule]:
    """Rules for a router and per-expert (gate, up, down) tensors named `{prefix}.experts.{e}.<name>`
    into our `mlp` tree."""
    gate, up, down = names
    experts = ("layers", "mlp", "experts")
    return [
        WeightRule(f"{prefix}.{router}.weight", ("layers", "mlp", "gate", "kernel"), transpose=True),
        WeightRule(f"{prefix}.experts.{{e}}.{gate}.weight", experts + ("gate_up_proj", "kernel"), transpose=True,
                   part=(0, 2)),
        WeightRule(f"{prefix}.experts.{{e}}.{up}.weight", experts + ("gate_up_proj", "kernel"), transpose=True,
                   part=(1, 2)),
        WeightRule(f"{prefix}.experts.{{e}}.{down}.weight", experts + ("down_proj", "kernel"), transpose=True),
    ]


WEIGHTS = [r for r in llama.WEIGHTS if r.path[:2] != ("layers", "mlp")] + \
    moe_weights("model.layers.{i}.block_sparse_moe", ("w1", "w3", "w2"))

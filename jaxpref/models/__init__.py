"""The architecture table: Hugging Face `model_type` -> our Flax module and its weight names.

Every architecture runs the same `blocks.Decoder`, configured by its args' `spec()`. Adding one:
write its module (args with `from_hf` and `spec`, a `WEIGHTS` table; see `jaxpref.models.blocks`)
and add one row here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from jaxpref.errors import ModelSourceError
from jaxpref.models import gemma, gpt2, gpt_neox, llama, mixtral, olmo2, phi3, qwen3, qwen3_moe
from jaxpref.models.blocks import Decoder, head_weight
from jaxpref.models.spec import ArchArgs, WeightRule


@dataclass(frozen=True)
class Architecture:
    args_cls: type
    model_cls: type
    weights: list[WeightRule]
    # (params, args) -> LM head [D, V]; the transposed embedding when tied.
    head_weight: Callable
    # Module names that `all-linear` LoRA targets (never the LM head).
    linear_modules: tuple[str, ...]
    # HF stores these modules' weights [in, out] (GPT-2 Conv1D): PEFT needs fan_in_fan_out.
    fan_in_fan_out: bool = False
    # HF tensors that carry no parameters (buffers some checkpoints include).
    ignored: tuple[str, ...] = ()
    # Sharding roles of the linear modules on a mesh: "col" splits the output features over
    # `tensor` (input over `fsdp`), "row" the reverse. Others are replicated or split by size.
    sharding: tuple[tuple[str, str], ...] = ()
    # Modules with kernels that LoRA may not target (a mixture's router).
    no_lora: tuple[str, ...] = ()
    # Fused 3-D expert kernels that take LoRA as PEFT's `target_parameters` do: our module name ->
    # the transformers parameter, in the order transformers registers them (PEFT nests its
    # wrappers of one module's parameters in that order, `jaxpref.lora.experts`).
    target_parameters: tuple[tuple[str, str], ...] = ()
    # LoRA's targets when `lora.target_modules` is left at its q/k/v/o_proj default and the model
    # names its attention otherwise: PEFT's per-model default (its target-module mapping; Phi-3,
    # which PEFT's mapping leaves out, its fused qkv_proj as PEFT's q/v choice elsewhere).
    default_targets: tuple[str, ...] = ()

    @property
    def roles(self) -> dict[str, str]:
        return dict(self.sharding)


_LLAMA = Architecture(llama.LlamaArgs, Decoder, llama.WEIGHTS, head_weight,
                      ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                      ignored=(r".*rotary_emb\.inv_freq",),
                      sharding=(("q_proj", "col"), ("k_proj", "col"), ("v_proj", "col"), ("o_proj", "row"),
                                ("gate_proj", "col"), ("up_proj", "col"), ("down_proj", "row")))
# Mixtures of experts: the router `gate` [D, E] and the experts' stacked kernels `gate_up_proj`
# [E, D, 2I] / `down_proj` [E, I, D] (split like their dense namesakes, the expert axis whole).
# LoRA goes on the attention (`linear_modules`) and, when targeted, on the experts (one pair of
# factors per expert, PEFT's `target_parameters`). On the router it is refused, and so is
# `all-linear` (PEFT's covers the router too).
_MOE = dataclasses.replace(
    _LLAMA, linear_modules=("q_proj", "k_proj", "v_proj", "o_proj"), no_lora=("gate",),
    target_parameters=(("gate_up_proj", "model.layers.{i}.mlp.experts.gate_up_proj"),
                       ("down_proj", "model.layers.{i}.mlp.experts.down_proj")),
    sharding=(("q_proj", "col"), ("k_proj", "col"), ("v_proj", "col"), ("o_proj", "row"),
              ("gate_up_proj", "col"), ("down_proj", "row")))
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": dataclasses.replace(_LLAMA, args_cls=qwen3.Qwen3Args, weights=qwen3.WEIGHTS),
    "olmo2": dataclasses.replace(_LLAMA, args_cls=olmo2.Olmo2Args, weights=olmo2.WEIGHTS),
    **{family: dataclasses.replace(_LLAMA, args_cls=gemma.GemmaArgs, weights=gemma.WEIGHTS)
       for family in gemma.FAMILIES},
    "mixtral": dataclasses.replace(_MOE, args_cls=mixtral.MixtralArgs, weights=mixtral.WEIGHTS),
    "qwen3_moe": dataclasses.replace(_MOE, args_cls=qwen3_moe.Qwen3MoeArgs, weights=qwen3_moe.WEIGHTS),
    "phi3": Architecture(phi3.Phi3Args, Decoder, phi3.WEIGHTS, head_weight,
                         ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
                         ignored=(r".*rotary_emb\.inv_freq",), default_targets=("qkv_proj",),
                         sharding=(("qkv_proj", "col"), ("o_proj", "row"), ("gate_up_proj", "col"),
                                   ("down_proj", "row"))),
    "gpt_neox": Architecture(gpt_neox.NeoXArgs, Decoder, gpt_neox.WEIGHTS, head_weight,
                             ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
                             ignored=gpt_neox.IGNORED, default_targets=("query_key_value",),
                             sharding=(("query_key_value", "col"), ("dense", "row"),
                                       ("dense_h_to_4h", "col"), ("dense_4h_to_h", "row"))),
    "gpt2": Architecture(gpt2.GPT2Args, Decoder, gpt2.WEIGHTS, head_weight,
                         ("c_attn", "c_proj", "c_fc"), fan_in_fan_out=True, ignored=gpt2.IGNORED,
                         default_targets=("c_attn",),
                         sharding=(("c_attn", "col"), ("c_fc", "col"), ("c_proj", "row"))),
}


def get_architecture(model_type: str, where: str = "") -> Architecture:
    if model_type not in ARCHITECTURES:
        raise ModelSourceError(
            f"{where}unsupported model_type `{model_type}`; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


__all__ = ["ARCHITECTURES", "Architecture", "ArchArgs", "WeightRule", "get_architecture"]

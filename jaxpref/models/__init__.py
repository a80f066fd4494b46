"""The architecture table: Hugging Face `model_type` -> our Flax module and its weight names.

Adding an architecture: write its module (arguments `from_hf`, a Flax model with `__call__` and
`logits`, a `WEIGHTS` table) and add one row here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from jaxpref.errors import ModelSourceError
from jaxpref.models import llama
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


_LLAMA = Architecture(llama.LlamaArgs, llama.LlamaModel, llama.WEIGHTS, llama.head_weight,
                      ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                      ignored=(r".*rotary_emb\.inv_freq",))
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
}


def get_architecture(model_type: str, where: str = "") -> Architecture:
    if model_type not in ARCHITECTURES:
        raise ModelSourceError(
            f"{where}unsupported model_type `{model_type}`; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


__all__ = ["ARCHITECTURES", "Architecture", "ArchArgs", "WeightRule", "get_architecture"]

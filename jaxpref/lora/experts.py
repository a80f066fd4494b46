"""LoRA on a mixture's fused expert kernels <-> PEFT's `target_parameters` tensors.

transformers 5 holds each MoE layer's experts as 3-D parameters of one module
(`model.layers.{i}.mlp.experts.gate_up_proj` [E, 2I, D] and `down_proj` [E, D, I], [out, in] per
expert). PEFT adapts such a parameter with a `lora.ParamWrapper`: `lora_A` is a Linear
in -> r*E (weight [r*E, in], expert-major rows: row e*r + j) and `lora_B` a Linear r*E -> out
(weight [out, r*E], rank-major columns: column j*E + e), and expert e's update is
scale * B_e A_e with A_e = lora_A.weight.reshape(E, r, in)[e] and
B_e = lora_B.weight.reshape(out, r, E)[:, :, e]. Several targeted parameters of one module nest
their wrappers in the order the module registers them, so the first one's tensors sit one
`base_layer.` deeper for every later one targeted (`...mlp.experts.base_layer.lora_A.weight` is
gate_up_proj's when down_proj is targeted too).

Our factors are per expert: a [E, in, r] and b [E, r, out] (`models.moe.GroupedLinear`), i.e.
a[e] = A_e^T and b[e] = B_e^T.
"""
from __future__ import annotations

import re

import numpy as np


def targeted(arch, targets) -> list[tuple[str, str]]:
    """(our module name, HF parameter template with {i}) of the targeted expert kernels, in
    transformers' registration order."""
    return [(name, tmpl) for name, tmpl in arch.target_parameters if name in targets]


def key_prefixes(arch, targets) -> dict[str, str]:
    """Our module name -> the PEFT key prefix of its factors (with {i}), `lora_A.weight` /
    `lora_B.weight` following: `base_model.model.<module>.` + one `base_layer.` per parameter of
    the same module targeted after it."""
    chosen = targeted(arch, targets)
    out = {}
    for k, (name, tmpl) in enumerate(chosen):
        module = tmpl.rpartition(".")[0]
        later = sum(1 for _, t in chosen[k + 1:] if t.rpartition(".")[0] == module)
        out[name] = f"base_model.model.{module}." + "base_layer." * later
    return out


def peft_parameter_names(arch, targets) -> list[str]:
    """`target_parameters` entries for the adapter config: the parameter's name from the layer
    on (`mlp.experts.gate_up_proj`), which PEFT matches against the end of every layer's."""
    return [tmpl.split("{i}.", 1)[1] for _, tmpl in targeted(arch, targets)]


def to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One layer: a [E, in, r], b [E, r, out] -> PEFT's lora_A [r*E, in], lora_B [out, r*E]."""
    e, din, r = a.shape
    dout = b.shape[-1]
    big_a = a.transpose(0, 2, 1).reshape(e * r, din)
    big_b = b.transpose(2, 1, 0).reshape(dout, r * e)
    return np.ascontiguousarray(big_a), np.ascontiguousarray(big_b)


def a_from_peft(big_a: np.ndarray, num_experts: int) -> np.ndarray:
    """lora_A [r*E, in] -> a [E, in, r]."""
    return big_a.reshape(num_experts, -1, big_a.shape[-1]).transpose(0, 2, 1)


def b_from_peft(big_b: np.ndarray, num_experts: int) -> np.ndarray:
    """lora_B [out, r*E] -> b [E, r, out]."""
    return big_b.reshape(big_b.shape[0], -1, num_experts).transpose(2, 1, 0)


def names_from_config(entries) -> tuple[list[str], bool]:
    """PEFT `target_parameters` -> (the module names we give them: an expert kernel's parameter
    name, or for a 2-D `<module>.weight` the module's, e.g. a router `gate`; whether an entry
    names particular layers, so that other layers may lack tensors)."""
    names, partial = [], False
    for entry in entries or []:
        module, _, param = entry.rpartition(".")
        names.append(module.rpartition(".")[2] if param == "weight" and module else param)
        partial = partial or any(part.isdigit() for part in entry.split("."))
    return names, partial


def key_pattern(prefix: str) -> re.Pattern:
    """The PEFT tensor names under a prefix from `key_prefixes` (any layer; an adapter name
    `.default` as some savers leave it): group 1 the layer, group 2 A or B."""
    pat = re.escape(prefix).replace(re.escape("{i}"), r"(\d+)")
    return re.compile(rf"{pat}lora_([AB])(?:\.default)?\.weight$")

"""LoRA as a transform of the parameter tree.

The LoRA tree mirrors the base tree's module paths: for a targeted linear whose base kernel is
`[L?, in, out]` it holds `a: [L?, in, r]` and `b: [L?, r, out]` (the transposes of PEFT's
`lora_A.weight [r, in]` and `lora_B.weight [out, r]`). Only this tree is trained; the base tree is
frozen and doubles as the reference model (the forward without the `lora` collection).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxpref.config.schema import DEFAULT_TARGETS
from jaxpref.errors import ConfigError


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    targets: tuple[str, ...]       # module names (HF), resolved from `all-linear`
    use_rslora: bool = False
    dropout: float = 0.0
    init: str = "b_zero"

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def linear_modules(params: Any) -> dict[tuple, tuple]:
    """Linear kernels in a (possibly abstract) base tree: module path -> kernel shape."""
    flat = traverse_util.flatten_dict(params)
    return {p[:-1]: tuple(v.shape) for p, v in flat.items() if p[-1] == "kernel"}


def resolve_targets(target_modules: str | list[str], arch, params: Any, src: str = "") -> tuple[str, ...]:
    mods = linear_modules(params)
    names = sorted({p[-1] for p in mods})
    if target_modules == "all-linear" and arch.no_lora:
        raise ConfigError(f"{src}: `lora.target_modules: all-linear` on a mixture of experts covers its router too "
                          f"(as in PEFT), which jaxpref cannot put LoRA on; list the modules instead: "
                          f"[{', '.join(_listable(arch))}]")
    if target_modules == "all-linear":
        found = tuple(n for n in arch.linear_modules if n in names)
        if not found:
            raise ConfigError(f"{src}: `lora.target_modules: all-linear` matches no module; "
                              f"this model has: {', '.join(names)}")
        return found
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if list(target_modules) == DEFAULT_TARGETS and arch.default_targets and not set(target_modules) & set(names):
        print(f"jaxpref: note: {src}: `lora.target_modules` left at q/k/v/o_proj, which this model names "
              f"otherwise: LoRA goes on PEFT's default for it, {', '.join(arch.default_targets)}", file=sys.stderr)
        return arch.default_targets
    for t in target_modules:
        if t in arch.no_lora:
            raise ConfigError(f"{src}: `lora.target_modules` entry `{t}` is a mixture of experts' router, "
                              f"which jaxpref cannot put LoRA on; target the attention or the experts "
                              f"({', '.join(_listable(arch))})")
        if t not in names:
            raise ConfigError(f"{src}: `lora.target_modules` entry `{t}` matches no module; "
                              f"this model has: {', '.join(names)}")
    return tuple(dict.fromkeys(target_modules))


def _listable(arch) -> list[str]:
    return list(arch.linear_modules) + [name for name, _ in arch.target_parameters]


def check_expert_dropout(spec: LoraSpec, arch, src: str = "") -> None:
    """LoRA on fused expert kernels takes no dropout (PEFT's ParamWrapper refuses it too: the
    input of every expert's factors is the one dispatched row)."""
    experts = [t for t in spec.targets if t in dict(arch.target_parameters)]
    if experts and spec.dropout > 0:
        raise ConfigError(f"{src}: `lora.lora_dropout` = {spec.dropout} with the experts targeted "
                          f"({', '.join(experts)}): LoRA on experts takes no dropout (as in PEFT); set it to 0")


def target_shapes(params: Any, spec: LoraSpec, src: str = "") -> dict[tuple, tuple]:
    """Module path -> kernel shape for every targeted linear; checks r against its dimensions."""
    out = {}
    for path, shape in linear_modules(params).items():
        if path[-1] in spec.targets:
            if spec.r > min(shape[-2:]):
                raise ConfigError(f"{src}: `lora.r` = {spec.r} is larger than `{path[-1]}`'s smaller "
                                  f"dimension {min(shape[-2:])}")
            out[path] = shape
    return out


def init_lora(params: Any, spec: LoraSpec, rng: jax.Array, src: str = "") -> dict:
    """PEFT's initialisation: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform, a=sqrt(5)), B = 0;
    `a_zero` swaps the roles (A = 0, B ~ U(-1/sqrt(r), 1/sqrt(r))). Either way the policy equals the
    reference at step 0. Float32 leaves."""
    flat = {}
    for i, (path, shape) in enumerate(sorted(target_shapes(params, spec, src).items())):
        lead, (din, dout) = shape[:-2], shape[-2:]
        key = jax.random.fold_in(rng, i)
        if spec.init == "b_zero":
            bound = 1.0 / math.sqrt(din)
            a = jax.random.uniform(key, (*lead, din, spec.r), jnp.float32, -bound, bound)
            b = jnp.zeros((*lead, spec.r, dout), jnp.float32)
        else:
            bound = 1.0 / math.sqrt(spec.r)
            a = jnp.zeros((*lead, din, spec.r), jnp.float32)
            b = jax.random.uniform(key, (*lead, spec.r, dout), jnp.float32, -bound, bound)
        flat[path + ("a",)] = a
        flat[path + ("b",)] = b
    return traverse_util.unflatten_dict(flat)


def count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def merge(params: dict, lora: dict, scale: float) -> dict:
    """Base tree with every targeted kernel replaced by W + scale * A B (same dtype as W)."""
    flat = traverse_util.flatten_dict(params)
    lflat = traverse_util.flatten_dict(lora)
    for path in {p[:-1] for p in lflat}:
        w = flat[path + ("kernel",)]
        a, b = lflat[path + ("a",)], lflat[path + ("b",)]
        delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
        flat[path + ("kernel",)] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)

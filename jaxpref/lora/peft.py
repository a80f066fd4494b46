"""LoRA trees <-> PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`),
named as PEFT names the modules, so that `peft.PeftModel.from_pretrained` loads them next to a
transformers model and jaxpref reads PEFT's own adapters back."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxpref.errors import ConfigError
from jaxpref.lora import experts as experts_mod
from jaxpref.lora.tree import LoraSpec
from jaxpref.runtime.outdir import check_replaceable, write_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def primary_rules(arch) -> list:
    """One weight rule per parameter path: the first listed. Later rules for the same path are
    alternative names the reader accepts (GPT-2's unprefixed checkpoint, NeoX's `lm_head`); the
    writers use the name `transformers` itself saves and PEFT addresses."""
    seen, out = set(), []
    for rule in arch.weights:
        if (rule.path, rule.part) not in seen:   # `part`: each share of a fused leaf (Mixtral's w1, w3)
            seen.add((rule.path, rule.part))
            out.append(rule)
    return out


def _module_names(bundle) -> dict[tuple, tuple[str, bool]]:
    """Our module path -> (HF module name template with {i}, stacked) for every linear kernel."""
    out = {}
    for rule in primary_rules(bundle.arch):
        if rule.path[-1] == "kernel" and rule.hf_name.endswith(".weight"):
            out[rule.path[:-1]] = (rule.hf_name[: -len(".weight")], rule.stacked)
    return out


def peft_state_dict(bundle, lora: dict) -> dict[str, np.ndarray]:
    """LoRA tree -> PEFT keys `base_model.model.<module>.lora_A.weight` [r, in] / `lora_B` [out, r];
    a mixture's expert kernels as PEFT's `target_parameters` hold them (`jaxpref.lora.experts`)."""
    names = _module_names(bundle)
    flat = traverse_util.flatten_dict(lora)
    paths = sorted({p[:-1] for p in flat})
    experts = experts_mod.key_prefixes(bundle.arch, {p[-1] for p in paths})
    out = {}
    for path in paths:
        a = np.asarray(flat[path + ("a",)], np.float32)
        b = np.asarray(flat[path + ("b",)], np.float32)
        if path[-1] in experts:
            for i in range(a.shape[0]):
                big_a, big_b = experts_mod.to_peft(a[i], b[i])
                out[experts[path[-1]].format(i=i) + "lora_A.weight"] = big_a
                out[experts[path[-1]].format(i=i) + "lora_B.weight"] = big_b
            continue
        tmpl, stacked = names[path]
        layers = range(a.shape[0]) if stacked else [None]
        for i in layers:
            mod = tmpl.format(i=i) if stacked else tmpl
            ai, bi = (a[i], b[i]) if stacked else (a, b)
            out[f"base_model.model.{mod}.lora_A.weight"] = np.ascontiguousarray(ai.T)
            out[f"base_model.model.{mod}.lora_B.weight"] = np.ascontiguousarray(bi.T)
    return out


def save_adapter(out_dir: Path, bundle, lora: dict, spec: LoraSpec, base_model: str,
                 tokenizer=None, overwrite: bool = False, card: str | None = None) -> Path:
    """Write the adapter folder whole or not at all (a temporary sibling renamed into place). A
    folder already there is replaced only if it holds a previous export of ours, or `overwrite`.
    `base_model`: what `base_model_name_or_path` names (`jaxpref.lora.card.base_model_name`);
    `card`: the README.md (model card)."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    check_replaceable(out_dir, "adapter folder", overwrite, "--overwrite")
    with write_dir(out_dir, "adapter") as tmp:
        _write_adapter(tmp, bundle, lora, spec, base_model, tokenizer, save_file)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
    return out_dir


def _write_adapter(tmp: Path, bundle, lora, spec, base_model, tokenizer, save_file) -> None:
    params = experts_mod.peft_parameter_names(bundle.arch, spec.targets)
    modules = sorted(t for t in spec.targets if t not in dict(bundle.arch.target_parameters))
    save_file(peft_state_dict(bundle, jax.device_get(lora)), str(tmp / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": modules or None,
        **({"target_parameters": params} if params else {}),
        "bias": "none",
        "use_rslora": spec.use_rslora,
        "fan_in_fan_out": bool(bundle.arch.fan_in_fan_out),
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "revision": bundle.source.revision,   # the base's hub revision: AutoPeftModel loads that one
    }
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def read_adapter_config(path: Path) -> dict:
    try:
        c = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"adapter `{path}`: cannot read {ADAPTER_CONFIG} ({e})")
    if not isinstance(c, dict):
        raise ConfigError(f"adapter `{path}`: {ADAPTER_CONFIG} holds a JSON {type(c).__name__}, not an object "
                          "of PEFT settings")
    return c


# PEFT options that change the adapter's math or contents in ways our LoRA tree cannot express:
# key -> the values that are fine.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "modules_to_save": (None, []),
    "layer_replication": (None,),
    "trainable_token_indices": (None,),
    "bias": ("none", None),                      # PEFT trains (and saves) the base model's biases
    # LoRA variants with their own forward (PEFT's lora/variants.py):
    "alora_invocation_tokens": (None, []), "use_qalora": (False, None), "use_bdlora": (None,),
    "arrow_config": (None,), "kasa_config": (None,), "velora_config": (None,), "monteclora_config": (None,),
}


def _targets_of(path: Path, c: dict) -> tuple[tuple[str, ...], bool]:
    """PEFT `target_modules` -> (module names, whether they may cover only part of the modules
    with those names). PEFT matches an entry against the end of the full module name, and its
    `all-linear` writes full names (`model.layers.0.self_attn.q_proj`); we apply LoRA per module
    name, so narrower entries, `layers_to_transform` and `exclude_modules` leave some modules of
    a targeted name without tensors (they get A = B = 0, which is the same model and stays
    exactly zero under training). `target_parameters` (a mixture's fused experts) add their
    parameter names (`jaxpref.lora.experts.names_from_config`)."""
    targets = c.get("target_modules") or []
    if isinstance(targets, str):
        raise ConfigError(f"adapter `{path}`: target_modules is the regex `{targets}`; "
                          "jaxpref reads adapters whose target_modules list module names")
    for key, names in (("target_modules", targets), ("target_parameters", c.get("target_parameters") or [])):
        if not isinstance(names, list) or not all(isinstance(t, str) for t in names):
            raise ConfigError(f"adapter `{path}`: {ADAPTER_CONFIG}: `{key}` must be a list of names, got "
                              f"{json.dumps(names)}")
    params, params_partial = experts_mod.names_from_config(c.get("target_parameters"))
    names = tuple(sorted({t.split(".")[-1] for t in targets} | set(params)))
    if not names:
        raise ConfigError(f"adapter `{path}`: target_modules is empty")
    partial = (any("." in t for t in targets) or c.get("layers_to_transform") is not None
               or bool(c.get("exclude_modules")) or params_partial)
    return names, partial


def spec_from_adapter(path: Path, dropout: float = 0.0, arch=None) -> LoraSpec:
    """The LoraSpec of a PEFT adapter folder; with the model's `arch`, its targets as PEFT matches
    them on that model (`_module_matched`)."""
    c = read_adapter_config(path)
    if c.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"adapter `{path}`: peft_type {c.get('peft_type')} is not LORA")
    for key, fine in _UNSUPPORTED.items():
        if key in c and c[key] not in fine:
            raise ConfigError(f"adapter `{path}`: `{key}: {json.dumps(c[key])}` is not supported by jaxpref")
    try:
        r, alpha = int(c["r"]), float(c["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"adapter `{path}`: {ADAPTER_CONFIG} lacks a valid `r` / `lora_alpha` ({e})")
    targets, _ = _targets_of(path, c)
    if arch is not None:
        targets = _module_matched(path, c, arch, targets)
    return LoraSpec(r=r, alpha=alpha, targets=targets,
                    use_rslora=bool(c.get("use_rslora", False)), dropout=dropout)


def _read_tensors(file: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as float32 numpy (bf16/fp16 adapters included)."""
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():
                try:
                    out[key] = np.asarray(f.get_tensor(key), np.float32)
                except (TypeError, ValueError):  # bf16 has no numpy dtype in safetensors' numpy backend
                    with safe_open(str(file), framework="flax") as fx:
                        out[key] = np.asarray(fx.get_tensor(key).astype(jnp.float32))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"adapter `{file}` is not a readable safetensors file ({str(e).splitlines()[0]})")
    return out


def _patterns(bundle, shapes: dict, spec: LoraSpec) -> list[tuple]:
    """(PEFT key pattern, our module path, stacked, expert) for every linear kernel of this model;
    a mixture's expert kernels only where targeted (their key depends on which are)."""
    experts = experts_mod.key_prefixes(bundle.arch, spec.targets)
    fused = dict(bundle.arch.target_parameters)
    out = []
    for mod, (tmpl, stacked) in _module_names(bundle).items():
        if mod not in shapes:
            continue
        if mod[-1] in fused:
            if mod[-1] in experts:
                out.append((experts_mod.key_pattern(experts[mod[-1]]), mod, True, True))
            continue
        pat = re.escape(tmpl).replace(re.escape("{i}"), r"(\d+)")
        out.append((re.compile(rf"base_model\.model\.{pat}\.lora_([AB])(?:\.default)?\.weight$"), mod, stacked, False))
    return out


def _peft_shape(which: str, kshape: tuple, r: int, expert: bool) -> tuple[int, int]:
    """PEFT's lora_A [r, in] / lora_B [out, r] of a kernel [.., in, out] (r * E for experts)."""
    n = r * kshape[-3] if expert else r
    return (n, kshape[-2]) if which == "A" else (kshape[-1], n)


def _ours(arr: np.ndarray, which: str, kshape: tuple, expert: bool) -> np.ndarray:
    if not expert:
        return arr.T
    return (experts_mod.a_from_peft if which == "A" else experts_mod.b_from_peft)(arr, kshape[-3])


def _key(bundle, spec: LoraSpec, mod: tuple, i: int | None, w: str) -> str:
    """The PEFT tensor name of factor `w` (a/b) of module `mod` in layer i."""
    experts = experts_mod.key_prefixes(bundle.arch, spec.targets)
    if mod[-1] in experts:
        return experts[mod[-1]].format(i=i) + f"lora_{w.upper()}.weight"
    tmpl, stacked = _module_names(bundle)[mod]
    return f"base_model.model.{tmpl.format(i=i) if stacked else tmpl}.lora_{w.upper()}.weight"


def _module_matched(path: Path, c: dict, arch, targets: tuple[str, ...]) -> tuple[str, ...]:
    """PEFT matches `target_modules` against modules: a fused expert kernel (a parameter) named
    there, and not in `target_parameters`, gets no factors from PEFT, so none here either."""
    fused = {name for name, _ in arch.target_parameters}
    listed, _ = experts_mod.names_from_config(c.get("target_parameters"))
    unmatched = ({t.split(".")[-1] for t in c.get("target_modules") or []} & fused) - set(listed)
    kept = tuple(t for t in targets if t not in unmatched)
    if not kept:
        raise ConfigError(f"adapter `{path}`: its target_modules match no module of this model "
                          f"({', '.join(sorted(unmatched))} are expert parameters: PEFT's target_parameters)")
    return kept


def load_adapter(path: Path, bundle, abstract_params: dict) -> tuple[dict, LoraSpec]:
    """A PEFT adapter folder -> (our LoRA tree float32, its spec).

    The tree has the structure `init_lora` gives for the spec. Every tensor must belong to a
    targeted linear (or expert kernel) of this model with the right shape; errors name the tensor."""
    path = Path(path)
    spec = spec_from_adapter(path, arch=bundle.arch)
    _, partial = _targets_of(path, read_adapter_config(path))
    router = [t for t in spec.targets if t in bundle.arch.no_lora]
    if router:
        raise ConfigError(f"adapter `{path}`: LoRA on `{router[0]}` (a mixture of experts' router, "
                          f"in `target_parameters`) is not supported by jaxpref")
    s = bundle.args.spec()
    tables = {s.embed: "token embedding", s.head: "LM head", s.positions: "position embedding"}
    table = next((t for t in spec.targets if t in tables), None)
    if table is not None:
        raise ConfigError(f"adapter `{path}`: LoRA on `{table}` (the {tables[table]}, in target_modules) is not "
                          "supported by jaxpref; it trains LoRA on the linear layers of the decoder")
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        raise ConfigError(f"adapter `{path}`: no {ADAPTER_WEIGHTS}")
    tensors = _read_tensors(file)
    shapes = {p[:-1]: tuple(v.shape) for p, v in traverse_util.flatten_dict(abstract_params).items()
              if p[-1] == "kernel"}
    patterns = _patterns(bundle, shapes, spec)
    flat: dict[tuple, np.ndarray] = {}
    seen: set[tuple] = set()     # (leaf path, layer or None)
    for key, arr in sorted(tensors.items()):
        for pat, mod, stacked, expert in patterns:
            m = pat.match(key)
            if m:
                break
        else:
            raise ConfigError(f"adapter `{path}`: tensor `{key}` matches no module of this "
                              f"{bundle.source.model_type} model (made for another architecture?)")
        if mod[-1] not in spec.targets:
            raise ConfigError(f"adapter `{path}`: tensor `{key}` is for `{mod[-1]}`, which the "
                              f"adapter's target_modules ({', '.join(spec.targets)}) do not name")
        which = m.group(m.lastindex)
        kshape = shapes[mod]
        want = _peft_shape(which, kshape, spec.r, expert)
        if tuple(arr.shape) != want:
            raise ConfigError(f"adapter `{path}`: tensor `{key}` has shape {tuple(arr.shape)}, "
                              f"this model needs {want} (made for another model?)")
        leaf = mod + ("a" if which == "A" else "b",)
        layer = None
        if stacked:
            layer = int(m.group(1))
            if layer >= kshape[0]:
                raise ConfigError(f"adapter `{path}`: tensor `{key}` is for layer {layer}, this "
                                  f"model has {kshape[0]} layers (made for another model?)")
        ours = _ours(arr, which, kshape, expert)
        buf = flat.setdefault(leaf, np.zeros(kshape[:-2] + ours.shape[-2:], np.float32))
        buf[layer if stacked else ...] = ours
        seen.add((leaf, layer))
    if not flat:
        raise ConfigError(f"adapter `{path}`: holds no LoRA tensors for this model")
    _fill_missing(path, bundle, spec, shapes, flat, seen, partial)
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}), spec


def _fill_missing(path, bundle, spec, shapes, flat, seen, partial) -> None:
    """Every targeted module gets both factors; a module (or layer) the file lacks is A = B = 0
    when the adapter's config says it covers only some of them, an error otherwise."""
    names = _module_names(bundle)
    for mod, kshape in sorted(shapes.items()):
        if mod[-1] not in spec.targets:
            continue
        stacked = names[mod][1]
        din, dout = kshape[-2], kshape[-1]
        for i in (range(kshape[0]) if stacked else [None]):
            have = {w for w in "ab" if (mod + (w,), i) in seen}
            if have == {"a", "b"} or (not have and partial):
                continue
            w = ({"a", "b"} - have).pop()
            raise ConfigError(f"adapter `{path}`: lacks tensor `{_key(bundle, spec, mod, i, w)}`")
        flat.setdefault(mod + ("a",), np.zeros(kshape[:-2] + (din, spec.r), np.float32))
        flat.setdefault(mod + ("b",), np.zeros(kshape[:-2] + (spec.r, dout), np.float32))

"""Base weights with a LoRA merged in -> a Hugging Face checkpoint folder (safetensors,
config.json with `architectures`, generation_config.json, tokenizer, model card), in the tensor
names transformers saves and the dtype asked for (default: the source's)."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from jaxpref.errors import ConfigError
from jaxpref.lora.peft import primary_rules
from jaxpref.lora.tree import LoraSpec, merge
from jaxpref.runtime.outdir import check_replaceable, write_dir

DTYPES = ("bfloat16", "float16", "float32")


def source_dtype(hf_config: dict) -> str:
    """The dtype the source checkpoint declares (`dtype`, or the older `torch_dtype`); float32 when
    it declares none (a GGUF's dequantised weights)."""
    d = hf_config.get("dtype") or hf_config.get("torch_dtype")
    return d if d in DTYPES else "float32"


def _numpy_dtype(name: str):
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name}: expected one of {', '.join(DTYPES)}")
    if name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.dtype(name)


def hf_config_for_export(hf_config: dict, model_type: str, dtype: str) -> dict:
    """The source's config.json with what loaders need: `architectures` (vLLM and TGI pick the
    model class by it; a GGUF's config has none) and the exported dtype."""
    cfg = dict(hf_config)
    if not cfg.get("architectures"):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if cls:
            cfg["architectures"] = [cls]
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = dtype
    return cfg


def generation_config(source) -> dict:
    """The source's generation_config.json (Llama 3's several end tokens, sampling defaults), or
    one made from its config's special tokens, as transformers makes one."""
    path = Path(source.path) / "generation_config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    return {"_from_model_config": True,
            **{k: source.hf_config[k] for k in keys if source.hf_config.get(k) is not None}}


def save_merged(out_dir: Path, bundle, params: dict, lora: dict | None, spec: LoraSpec | None,
                tokenizer=None, overwrite: bool = False, dtype: str | None = None, card: str | None = None) -> Path:
    """Base (+ merged LoRA) -> HF safetensors in `dtype` (default: the source's) + config.json +
    generation_config.json (+ tokenizer, + README.md `card`) in HF's layout, written whole or not
    at all. Never into the base model's own folder; a folder already there is replaced only if it
    holds a previous export of ours, or `overwrite`."""
    from safetensors.numpy import save_file

    dtype = dtype or source_dtype(bundle.source.hf_config)
    np_dtype = _numpy_dtype(dtype)
    check_replaceable(out_dir, "merged model folder", overwrite, "--overwrite",
                      protect={"the base model's folder": bundle.source.path})

    if lora is not None:
        params = merge(params, lora, spec.scale)
    flat = traverse_util.flatten_dict(jax.device_get(params))
    tensors = {}
    for rule in primary_rules(bundle.arch):
        if rule.path not in flat:
            continue
        for name, x in rule.hf_tensors(np.asarray(flat[rule.path], np.float32)):
            tensors[name] = np.ascontiguousarray(x.astype(np_dtype))
    cfg = hf_config_for_export(bundle.source.hf_config, bundle.source.model_type, dtype)
    with write_dir(out_dir, "merged") as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(bundle.source), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
    return Path(out_dir)

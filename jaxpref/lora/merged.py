"""Base weights with a LoRA merged in -> a Hugging Face checkpoint folder (safetensors,
config.json, tokenizer), in the tensor names transformers saves."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from jaxpref.lora.peft import primary_rules
from jaxpref.lora.tree import LoraSpec, merge


def save_merged(out_dir: Path, bundle, params: dict, lora: dict | None, spec: LoraSpec | None,
                tokenizer=None) -> Path:
    """Base (+ merged LoRA) -> HF safetensors + config.json (+ tokenizer) in HF's layout."""
    from safetensors.numpy import save_file

    if lora is not None:
        params = merge(params, lora, spec.scale)
    flat = traverse_util.flatten_dict(jax.device_get(params))
    tensors = {}
    for rule in primary_rules(bundle.arch):
        if rule.path not in flat:
            continue
        arr = np.asarray(flat[rule.path], np.float32)
        if rule.stacked:
            for i in range(arr.shape[0]):
                x = arr[i].T if rule.transpose else arr[i]
                tensors[rule.hf_name.format(i=i)] = np.ascontiguousarray(x)
        else:
            x = arr.T if rule.transpose else arr
            tensors[rule.hf_name] = np.ascontiguousarray(x)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(bundle.source.hf_config)
    cfg["torch_dtype"] = "float32"
    cfg.pop("dtype", None)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir



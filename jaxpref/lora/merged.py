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
from jaxpref.runtime.outdir import check_replaceable, write_dir


def save_merged(out_dir: Path, bundle, params: dict, lora: dict | None, spec: LoraSpec | None,
                tokenizer=None, overwrite: bool = False) -> Path:
    """Base (+ merged LoRA) -> HF safetensors + config.json (+ tokenizer) in HF's layout, written
    whole or not at all. Never into the base model's own folder; a folder already there is replaced
    only if it holds a previous export of ours, or `overwrite`."""
    from safetensors.numpy import save_file

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
            tensors[name] = np.ascontiguousarray(x)
    cfg = dict(bundle.source.hf_config)
    cfg["torch_dtype"] = "float32"
    cfg.pop("dtype", None)
    with write_dir(out_dir, "merged") as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)



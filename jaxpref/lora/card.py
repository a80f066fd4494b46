"""The model card (README.md) written into an exported adapter or merged model, as TRL writes one:
YAML front matter for the Hub (base_model, library_name, tags, datasets), then the base model,
the method and its paper, the data, the key hyper-parameters and the final metrics."""
from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

from jaxpref.config import Config
from jaxpref.objectives.methods import METHODS


def base_model_name(source) -> str:
    """What an adapter's `base_model_name_or_path` says: a hub id as written, else the absolute
    path of the folder the weights were read from (for a GGUF source, its converted folder, which
    transformers loads), so that `AutoPeftModelForCausalLM.from_pretrained(adapter)` finds it."""
    if _is_hub_id(source.spec):
        return source.spec
    return os.path.abspath(source.path)


def _is_hub_id(spec: str) -> bool:
    return (spec.count("/") == 1 and not spec.startswith(("/", ".", "~", "pkg:")) and not spec.endswith(".gguf")
            and not Path(spec).exists())


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def model_card(cfg: Config, index: int, summary: dict, kind: str) -> str:
    """README.md for `cfg.models[index]`'s export; `kind` is "adapter" or "merged"."""
    entry, pt, tr, lo, ds = cfg.models[index], cfg.post_training, cfg.training, cfg.lora, cfg.dataset
    method = METHODS[pt.method]
    hub_base = entry.huggingface_id if _is_hub_id(entry.huggingface_id) else None
    hub_data = ds.name if ds.name and _is_hub_id(ds.name) else None
    front = ["---"] + ([f"base_model: {hub_base}"] if hub_base else []) + [
        f"library_name: {'peft' if kind == 'adapter' else 'transformers'}", f"model_name: {entry.name}",
        "pipeline_tag: text-generation", "tags:", "- generated_from_trainer", "- jaxpref", f"- {pt.method}"]
    front += ["- lora"] if kind == "adapter" else []
    front += (["datasets:", f"- {hub_data}"] if hub_data else []) + ["---", ""]
    base = f"[{hub_base}](https://huggingface.co/{hub_base})" if hub_base else f"`{entry.huggingface_id}`"
    data = f"[{hub_data}](https://huggingface.co/datasets/{hub_data})" if hub_data else f"`{ds.name or 'in-memory data'}`"
    load = ("from peft import AutoPeftModelForCausalLM\n\nmodel = AutoPeftModelForCausalLM.from_pretrained(\"PATH\")"
            if kind == "adapter" else
            "from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained(\"PATH\")")
    title, arxiv = method.paper
    body = [
        f"# Model Card for {entry.name}", "",
        f"This model is a fine-tuned version of {base} on the {data} dataset"
        + (" (a LoRA adapter)." if kind == "adapter" else " (LoRA merged into the weights)." if lo.enabled else "."),
        "It has been trained with jaxpref (JAX/Flax), whose losses and metrics follow "
        "[TRL](https://github.com/huggingface/trl).", "",
        "## Quick start", "", "```python", load.replace("PATH", "path/to/this/folder"), "```", "",
        "## Training procedure", "",
        f"This model was trained with {pt.method.upper()}"
        + (f", a method introduced in [{title}](https://huggingface.co/papers/{arxiv})." if arxiv else "."), "",
        "### Hyper-parameters", "", "| key | value |", "|---|---|",
    ]
    rows = [("method", pt.method), ("loss_type", ", ".join(cfg.loss_types)), ("beta", pt.beta),
            ("learning_rate", tr.learning_rate), ("lr_scheduler_type", tr.lr_scheduler_type),
            ("optimizer", tr.optimizer), ("steps", summary.get("steps")),
            ("per_device_train_batch_size", tr.per_device_train_batch_size),
            ("gradient_accumulation_steps", tr.gradient_accumulation_steps), ("max_length", tr.max_length),
            ("compute_dtype", tr.compute_dtype), ("seed", tr.seed)]
    if lo.enabled:
        rows += [("lora r / alpha", f"{lo.r} / {lo.lora_alpha:g}"),
                 ("lora target_modules", lo.target_modules if isinstance(lo.target_modules, str)
                  else ", ".join(lo.target_modules))]
    body += [f"| {k} | {_fmt(v)} |" for k, v in rows] + [""]
    body += _metrics(summary)
    body += ["### Framework versions", ""] + [f"- {d}: {_version(d)}" for d in ("jaxpref", "jax", "flax", "transformers")]
    return "\n".join(front + body) + "\n"


def _metrics(summary: dict) -> list[str]:
    train, ev = (x if isinstance(x, dict) else {} for x in (summary.get("final_metrics"), summary.get("final_eval")))
    names = [k for k in train if k.startswith(("loss", "rewards/", "kl", "nll_loss"))]
    speed = ("runtime", "samples_per_second", "steps_per_second", "num_tokens")   # not a model's metric
    names += [k[5:] for k in ev if k.startswith("eval_") and k[5:] not in names and k[5:] not in speed]
    if not names:
        return []
    out = ["### Final metrics", "", f"At step {summary.get('steps')}.", "", "| metric | train | eval |", "|---|---|---|"]
    for k in names:
        out.append(f"| {k} | {_fmt(train[k]) if k in train else ''} | {_fmt(ev['eval_' + k]) if 'eval_' + k in ev else ''} |")
    return out + [""]

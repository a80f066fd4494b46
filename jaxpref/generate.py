"""`python -m jaxpref.generate --config FILE (--prompt TEXT ... | --prompts FILE.jsonl) --output FILE.jsonl`:
completions of a config's model, with a trained adapter, without it, or both side by side.

The model is `models[I]` of the config (its dtypes and options); `--run DIR` takes a run's
`adapter/`, `--adapter DIR` any PEFT LoRA folder; with neither, the base model. `--base-too`
also decodes every prompt with the adapter off (the same weights, no second copy).

A `--prompts` row's `prompt` is a string (used as is, TRL's standard format) or a list of messages
(rendered with the chat template and `add_generation_prompt=True`, TRL's conversational format).
`--prompt TEXT` is one user message, rendered with the chat template when the tokenizer has one.
Each output line: `prompt` (as given), `completion` (decoded, special tokens skipped),
`completion_ids`, `model` (`tuned` or `base`). `--temperature 0` (the default) is greedy.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from jaxpref.errors import ConfigError, JaxprefError, check_writable
from jaxpref.runtime.env import load_dotenv


def parse_args(argv, prog: str = "python -m jaxpref.generate"):
    ap = argparse.ArgumentParser(prog=prog,
                                 description="Sample completions from a config's model, with or without its adapter.")
    ap.add_argument("--config", required=True, help="YAML config file (the model and its dtypes)")
    ap.add_argument("--model-index", type=int, default=0, help="use models[I] (default 0)")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--run", default=None, help="a training run folder: its adapter/ is applied")
    where.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", nargs="+", action="extend", metavar="TEXT",
                      help="one or more prompts, each one user message")
    what.add_argument("--prompts", metavar="FILE.jsonl", help="JSON lines with a `prompt` (string or messages)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens per completion at most (128)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    ap.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: off)")
    ap.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top one (0: off)")
    ap.add_argument("--stop", action="append", default=[], metavar="TEXT",
                    help="a stop string: the completion ends with the token that completes it (repeatable)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    ap.add_argument("--base-too", action="store_true", help="also decode with the adapter off")
    ap.add_argument("--output", required=True, type=os.path.expanduser, help="JSON lines file to write")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value by dotted path, e.g. training.compute_dtype=bfloat16")
    return ap.parse_args(argv)


def check_options(args) -> None:
    from jaxpref.generation.sampling import Sampling

    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size)):
        if value <= 0:
            raise ConfigError(f"{flag} must be > 0, got {value}")
    if not 0 <= args.seed <= 2**32 - 1:   # as training.seed (and transformers' set_seed)
        raise ConfigError(f"--seed must be in [0, 2**32 - 1], got {args.seed}")
    s = Sampling(args.temperature, args.top_p, args.top_k, args.min_p).check()
    unused = [f"--{k.replace('_', '-')} {v}" for k, v, off in (("top_p", s.top_p, 1.0), ("top_k", s.top_k, 0),
                                                               ("min_p", s.min_p, 0.0)) if v != off]
    if s.greedy and unused:
        raise ConfigError(f"{', '.join(unused)}: sampling options, but --temperature 0 decodes greedily; "
                          "give --temperature > 0 to sample, or leave them out")
    if any(stop == "" for stop in args.stop):
        raise ConfigError("--stop is an empty string, which every completion contains at once; give the text to stop at")
    if args.base_too and not (args.run or args.adapter):
        raise ConfigError("--base-too compares against an adapter: give --run or --adapter")
    out = Path(args.output)
    check_writable(out, "--output", directory=False)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"--output {out} exists; pass --overwrite to replace it")


def adapter_path(args) -> Path | None:
    if args.run:
        p = Path(args.run) / "adapter"
        if not (p / "adapter_config.json").is_file():
            if (Path(args.run) / "model" / "config.json").is_file():
                raise ConfigError(f"--run {args.run}: a full fine-tune, whose model/ is a whole model: generate "
                                  f"with it as the config's model (--set models.{args.model_index}.huggingface_id="
                                  f"{Path(args.run) / 'model'}) and no --run")
            raise ConfigError(f"--run {args.run}: no adapter/adapter_config.json (a finished run has one)")
        return p
    if args.adapter:
        from jaxpref.evaluate import adapter_dir
        return adapter_dir(args.adapter)
    return None


def generate(cfg, args) -> list[dict]:
    """The output rows, prompt by prompt (tuned, then base with --base-too)."""
    import jax

    from jaxpref.generation import text
    from jaxpref.generation.engine import DecodeOptions, Generator
    from jaxpref.generation.sampling import Sampling
    from jaxpref.lora.peft import load_adapter
    from jaxpref.models import weights
    from jaxpref.runtime.mesh import make_mesh
    from jaxpref.training import setup

    rows_in = text.read_prompts(args.prompts, "--prompts") if args.prompts else None
    # Decoding attends through its KV cache: `training.attention` (a flash kernel) is not used.
    bundle, tok, _, abstract = setup.model_for(cfg, args.model_index, training=False, full_rows=False)
    shown = rows_in or list(args.prompt)   # each output line's `prompt`: as given
    given = rows_in or [text.user_prompt(tok, t) for t in args.prompt]
    where = (lambda i: f"--prompts {args.prompts}: line {i + 1}") if args.prompts else (lambda i: f"--prompt {i + 1}")
    ids = [text.prompt_ids(tok, p, where(i)) for i, p in enumerate(given)]
    check_lengths(bundle, ids, args.max_new_tokens)
    lora, path = None, adapter_path(args)
    if path is not None:
        lora, spec = load_adapter(path, bundle, abstract)
        bundle = bundle.with_args(lora_scale=spec.scale)
    mesh = make_mesh(cfg.gpu, str(cfg.source))
    gen = Generator(bundle, bundle.runtime_params(weights.load_params(bundle)),
                    mesh=mesh if mesh.size > 1 else None, batch_size=args.batch_size)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    opts = DecodeOptions(args.max_new_tokens, Sampling(args.temperature, args.top_p, args.top_k, args.min_p),
                         text.eos_ids(bundle.source.path, tok), pad)
    runs = [("tuned" if lora is not None else "base", lora)] + ([("base", None)] if args.base_too else [])
    t0 = time.perf_counter()
    try:
        results = {name: gen.generate(ids, opts, lo, args.seed) for name, lo in runs}
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise ConfigError(f"out of memory decoding prompts of up to {max(map(len, ids))} tokens + --max-new-tokens "
                          f"{args.max_new_tokens} in batches of {args.batch_size} (the KV cache holds every slot); "
                          "lower --max-new-tokens or --batch-size") from None
    seconds = time.perf_counter() - t0
    rows = []
    for i, prompt in enumerate(shown):
        for name, _ in runs:
            out = text.cut_at_stop(tok, results[name][i].ids, args.stop, ids[i])
            rows.append({"prompt": prompt, "completion": text.completion_text(tok, out),
                         "completion_ids": out, "model": name})
    tokens = sum(len(r["completion_ids"]) for r in rows)
    print(f"{len(rows)} completions, {tokens} tokens in {seconds:.1f} s ({gen.compiles} compilation(s))",
          file=sys.stderr)
    return rows


def check_lengths(bundle, ids: list[list[int]], max_new: int) -> None:
    """Learned position tables (GPT-2) end: prompt + completion must fit in them; positions are
    int32 everywhere."""
    limit = bundle.args.spec().max_positions
    longest = max(map(len, ids))
    if longest + max_new >= 2**31:
        raise ConfigError(f"--max-new-tokens {max_new}: prompt + completion must stay below 2**31 tokens")
    if limit and longest + max_new > limit:
        raise ConfigError(f"a prompt of {longest} tokens + --max-new-tokens {max_new} exceeds the "
                          f"model's {limit} positions")


def preview(rows: list[dict], width: int = 300) -> str:
    """A readable digest: each prompt once, then each model's completion, shortened."""
    short = lambda s: " ".join(str(s).split())[:width] + ("..." if len(" ".join(str(s).split())) > width else "")
    lines, last = [], None
    for r in rows:
        prompt = r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1].get("content", "")
        if r["prompt"] is not last:
            lines.append(f"\n> {short(prompt)}")
            last = r["prompt"]
        lines.append(f"  [{r['model']}] {short(r['completion'])}")
    return "\n".join(lines).lstrip("\n")


def main(argv: list[str] | None = None, prog: str = "python -m jaxpref.generate") -> int:
    from jaxpref.config import load_config

    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        load_dotenv()   # HF_TOKEN for a gated hub model
        check_options(args)
        cfg = load_config(args.config, args.set)
        from jaxpref.runtime.outdir import refuse_protected
        refuse_protected(args.output, "--output", {"the config file": Path(args.config), **(
            {"the --prompts file": Path(args.prompts)} if args.prompts else {})}, "--overwrite")
        if not 0 <= args.model_index < len(cfg.models):
            raise ConfigError(f"--model-index {args.model_index} is out of range: the config has "
                              f"{len(cfg.models)} model(s)")
        rows = generate(cfg, args)
    except JaxprefError as e:
        print(f"jaxpref.generate: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(out)
    print(preview(rows))
    print(f"wrote {len(rows)} lines to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from jaxpref.runtime.host_memory import tune_malloc
    from jaxpref.runtime.no_torch import hide_torch

    hide_torch()  # jaxpref never uses torch; transformers would import it (~490 MB)
    tune_malloc()  # before any XLA computation (opt-in: JAXPREF_MALLOC_TUNING=1)
    sys.exit(main())

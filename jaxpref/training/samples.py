"""Samples during training (`logging.sample_prompts`): greedy completions of a few prompts at every
evaluation and at the end with the adapter being trained, and once with it off (the base model,
written as step 0), so that one can read what the model writes as it learns.

The prompts are the first N prompts of the eval split (the token ids the evaluation scores them
with), or the `prompt`s of a .jsonl file (a string used as is, or messages rendered with the chat
template and `add_generation_prompt=True`, as `python -m jaxpref.generate --prompts` reads them).
Each completion is one row of `<run>/samples.jsonl`: `step`, `model` (`tuned` or `base`), `prompt`
(the file's prompt as given, or the eval prompt's text), `completion` (special tokens skipped) and
`completion_ids`; the same rows go to TensorBoard / W&B as a text table (`MetricSinks.log_samples`).
"""
from __future__ import annotations

import json
from pathlib import Path

from jaxpref.errors import ConfigError
from jaxpref.training.sinks import read_rows

ROWS = 8   # prompts decoded together


class Sampler:
    def __init__(self, run, sinks, append: bool):
        from jaxpref.generation import text
        from jaxpref.generation.engine import DecodeOptions, Generator

        self.run, self.sinks = run, sinks
        lg, tok = run.cfg.logging, run.tok
        self.shown, self.ids = prompts(run, lg.sample_prompts)
        limit = run.bundle.args.spec().max_positions
        longest = max(map(len, self.ids))
        if limit and longest + lg.sample_max_new_tokens > limit:
            raise ConfigError(f"a sample prompt of {longest} tokens + logging.sample_max_new_tokens "
                              f"{lg.sample_max_new_tokens} exceeds the model's {limit} positions")
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.opts = DecodeOptions(lg.sample_max_new_tokens, eos_ids=text.eos_ids(run.bundle.source.path, tok),
                                  pad_id=pad)
        # No mesh: the jitted program takes the weights as the step shards them (no replicated copy).
        self.gen = Generator(run.bundle, run.params, batch_size=min(ROWS, len(self.ids)))
        self.file = Path(run.run_dir) / "samples.jsonl"
        if run.is_main and not append:
            self.file.write_text("")
        self.done: set[tuple[int, str]] = set()
        if append and self.file.is_file():
            self.done |= {(r["step"], r["model"]) for r in read_rows(self.file)}

    def sample(self, step: int, lora, model: str = "tuned") -> list[dict]:
        """Completions with `lora` (the trainable tree: LoRA, or a full fine-tune's weights; None
        with model `base`) at `step`; nothing when this step and model are done already."""
        from jaxpref.generation import text

        if (step, model) in self.done:
            return []
        self.done.add((step, model))
        run = self.run
        params = run.params
        if run.full_finetune:   # the trained weights are the whole tree
            params, lora = (lora if model == "tuned" else run.params), None
        self.gen.params = params
        out = self.gen.generate(self.ids, self.opts, lora)
        rows = [{"step": step, "model": model, "prompt": shown, "completion": text.completion_text(run.tok, o.ids),
                 "completion_ids": o.ids} for shown, o in zip(self.shown, out)]
        if run.is_main:
            with open(self.file, "a") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            self.sinks.log_samples(rows, step)
        return rows


def prompts(run, source) -> tuple[list, list[list[int]]]:
    """(each prompt as shown, its token ids) from a count of eval prompts or a .jsonl file."""
    from jaxpref.generation import text

    tok = run.tok
    if isinstance(source, str):
        given = text.read_prompts(source, "logging.sample_prompts")
        ids = [text.prompt_ids(tok, p, f"logging.sample_prompts {source}: prompt {i + 1}")
               for i, p in enumerate(given)]
        return given, ids
    ev = run.prepared.eval
    if ev is None or not len(ev):
        raise ConfigError("`logging.sample_prompts` is a count of eval prompts, and the run has no eval split")
    ids = [list(p) for p in ev.prompt[:source]]
    return [tok.decode(p, skip_special_tokens=True) for p in ids], ids

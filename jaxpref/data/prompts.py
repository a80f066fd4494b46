"""Prompt-only data for the online methods (GRPO, RLOO, online DPO, PPO): a prompt column, standard
(a string) or conversational (a message list), and any other columns (`answer`, ...), kept per row
and passed to the reward functions (`jaxpref.data.rewards`) as TRL passes them.

Prompts are tokenized as TRL 1.16's GRPOTrainer tokenizes them (`_tokenize_prompts`, the same in
RLOOTrainer): conversational prompts through the chat template with the generation prompt,
standard prompts as text with the tokenizer's special tokens; for online DPO as its trainer does
(text, no special tokens: `tokenize_prompt`). `training.max_prompt_length` keeps a
prompt's last tokens (TRL <= 0.24's left truncation; TRL 1.x no longer truncates prompts).
Rows whose prompt is null, empty, of the other format or not a message list are skipped and
counted. Completions are decoded for the reward functions as those trainers decode them.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxpref.data.rows import is_messages
from jaxpref.errors import DataError

# Keyword arguments a reward function gets besides the row's columns: a column of one of these
# names could not be passed.
RESERVED = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


@dataclass
class Prompts:
    """Tokenized prompts of a split: `prompt_ids` (after max_prompt_length), the raw `prompts` (what
    reward functions get), `columns` (every other column, one value per kept row), `source` (each
    row's index in the split), rows skipped by reason and prompts truncated."""
    prompt_ids: list[list[int]]
    prompts: list
    columns: dict[str, list]
    format: str = "standard"
    source: list[int] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    rows_in: int = 0

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def conversational(self) -> bool:
        return self.format == "conversational"

    def rows(self, idx) -> tuple[list, dict[str, list]]:
        """The raw prompts and columns of rows `idx` (e.g. each prompt repeated num_generations times)."""
        return [self.prompts[i] for i in idx], {k: [v[i] for i in idx] for k, v in self.columns.items()}


def map_prompt_columns(ds, ds_cfg):
    """Rename `dataset.prompt_column` to `prompt`, keep every other column; DataError naming the
    columns present when the prompt column is missing, or a column that a reward function could not
    be given (`RESERVED`)."""
    cols = list(ds.column_names)
    name = ds_cfg.prompt_column
    if name not in cols:
        raise DataError(f"dataset `{ds_cfg.name}`: missing column `{name}` (dataset.prompt_column; the "
                        f"online methods train on prompts); columns present: {', '.join(cols)}")
    clash = [c for c in cols if c in RESERVED or (c == "prompt" and name != "prompt")]
    if clash:
        raise DataError(f"dataset `{ds_cfg.name}`: column `{clash[0]}` has the name of an argument TRL's "
                        f"reward functions get ({', '.join(RESERVED)}); rename it")
    return ds.rename_column(name, "prompt") if name != "prompt" else ds


def tokenize_prompt(tok, prompt, fmt: str, rule: str = "prompt") -> list[int] | str:
    """One prompt -> token ids, or the reason it cannot be tokenized. rule "prompt": TRL's
    GRPOTrainer/RLOOTrainer (`_tokenize_prompts`: the chat template with the generation prompt,
    tokenized; standard text with the tokenizer's special tokens); "prompt_text": OnlineDPOTrainer
    (`_generate`: the chat template rendered to text, the generation prompt after a user or tool
    message, an assistant message continued; then the text without special tokens)."""
    if rule == "prompt":
        if fmt == "conversational":
            out = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
            return list(out["input_ids"])
        return list(tok(text=prompt)["input_ids"])
    if rule != "prompt_text":
        raise ValueError(rule)
    if fmt == "conversational":
        last = prompt[-1]["role"]
        if last not in ("user", "tool", "assistant"):
            return f"prompt ends with a `{last}` message"
        gen = last != "assistant"
        prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=gen, continue_final_message=not gen)
    return list(tok(text=prompt, add_special_tokens=False)["input_ids"])


def _problem(prompt: Any, fmt: str) -> str | None:
    if prompt is None:
        return "prompt is null"
    if fmt == "conversational":
        if isinstance(prompt, str):
            return "mixed formats"
        if not is_messages(prompt):
            return "prompt is not a message list" if prompt != [] else "prompt is an empty conversation"
        return None
    if not isinstance(prompt, str):
        if is_messages(prompt):
            return "mixed formats"
        return ("prompt is not a list of {role, content} messages" if isinstance(prompt, list)
                else "prompt is not a string")
    return "empty prompt" if not prompt.strip() else None


def prepare_prompts(ds, ds_cfg, tok, max_prompt_length: int | None = None, max_rows: int | None = None,
                    rule: str = "prompt") -> Prompts:
    """A `datasets.Dataset` split -> `Prompts` (bad rows skipped and counted); `rule` is the
    method's tokenization (`tokenize_prompt`). `dataset.max_samples` keeps the first rows, as for
    the offline methods."""
    ds = map_prompt_columns(ds, ds_cfg)
    if ds_cfg.max_samples is not None:
        max_rows = min(max_rows or ds_cfg.max_samples, ds_cfg.max_samples)
    if max_rows is not None and len(ds) > max_rows:
        ds = ds.select(range(max_rows))
    rows = ds.to_list()
    if not rows:
        raise DataError(f"dataset `{ds_cfg.name}` is empty")
    votes = Counter("conversational" if is_messages(r.get("prompt")) else "standard" for r in rows[:200])
    fmt = votes.most_common(1)[0][0]
    if fmt == "conversational" and not getattr(tok, "chat_template", None):
        raise DataError(f"dataset `{ds_cfg.name}` is conversational but the tokenizer has no chat template")
    other = [c for c in ds.column_names if c != "prompt"]
    out = Prompts([], [], {c: [] for c in other}, fmt, rows_in=len(rows))
    skipped: Counter = Counter()
    for n, row in enumerate(rows):
        ids = _problem(row["prompt"], fmt) or tokenize_prompt(tok, row["prompt"], fmt, rule)
        if isinstance(ids, str):
            skipped[ids] += 1
            continue
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            ids = ids[-max_prompt_length:]
            out.truncated += 1
        out.prompt_ids.append(ids)
        out.prompts.append(row["prompt"])
        for c in other:
            out.columns[c].append(row[c])
        out.source.append(n)
    out.skipped = dict(skipped)
    if not out.prompt_ids:
        reasons = ", ".join(f"{k}: {v}" for k, v in skipped.most_common())
        raise DataError(f"dataset `{ds_cfg.name}`: no usable prompt ({reasons})")
    return out


def decode_completions(tok, completion_ids: list[list[int]], conversational: bool) -> list:
    """Completion token ids -> what reward functions get: text without special tokens, or one
    assistant message per completion for conversational prompts (TRL's `_generate`)."""
    texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
    if conversational:
        return [[{"role": "assistant", "content": t}] for t in texts]
    return texts


def stop_token_ids(tok, generation_eos: int | list[int] | None = None) -> list[int]:
    """EOS ids that end a completion: the model's generation config's, and the tokenizer's first
    (TRL's `eos_token_ids`)."""
    ids = [] if generation_eos is None else ([generation_eos] if isinstance(generation_eos, int)
                                             else list(generation_eos))
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids = [tok.eos_token_id, *ids]
    return ids


def truncated_mask(completion_ids: list[list[int]], eos_ids: list[int], pad_id: int | None) -> np.ndarray:
    """[N] bool: completions whose last token is neither an EOS nor the pad (cut by
    max_completion_length)."""
    stop = set(eos_ids) | ({pad_id} if pad_id is not None else set())
    return np.array([bool(ids) and ids[-1] not in stop for ids in completion_ids], bool)

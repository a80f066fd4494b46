"""Sequence lengths: the prompt cap (`max_prompt_length`, keeping the prompt's end) and the
truncation of prompt+completion to `max_length` (`keep_start` or `keep_end`), as TRL applies them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxpref.data.tokenize import Tokenized


@dataclass
class LengthReport:
    truncated: int
    dropped: int
    kept: int


def apply_lengths(data: Tokenized, max_length: int | None, max_prompt_length: int | None,
                  truncation_mode: str) -> tuple[Tokenized, LengthReport]:
    """Prompt-length cap (keeps the prompt's end), then per-sequence truncation to max_length;
    rows whose prompt alone fills max_length are dropped (keep_start would leave no completion)."""
    keep, truncated = [], 0
    for i, p in enumerate(data.prompt):
        cut = max_prompt_length is not None and len(p) > max_prompt_length
        if cut:
            data.prompt[i] = p = p[-max_prompt_length:]
        comps = [data.chosen[i], data.rejected[i]] if data.paired else [data.completion[i]]
        if max_length is not None:
            extra = max(data.prompt_extras(i)) if data.paired else 0
            if truncation_mode == "keep_start" and len(p) + extra >= max_length:
                continue
            cut = cut or any(len(p) + len(c) > max_length for c in comps)
        truncated += int(cut)   # a prompt cut by max_prompt_length is a truncated row too
        keep.append(i)
    out = data.subset(np.asarray(keep, dtype=np.int64)) if len(keep) != len(data) else data
    out.rows_in = data.rows_in
    out.skipped = dict(data.skipped)
    dropped = len(data) - len(keep)
    if dropped:
        out.skipped["prompt fills max_length"] = dropped
    return out, LengthReport(truncated, dropped, len(keep))


def truncate(prompt: list[int], comp: list[int], max_length: int | None, mode: str):
    """-> (tokens, number of leading prompt tokens) after truncating prompt+completion."""
    ids = prompt + comp
    n_prompt = len(prompt)
    if max_length is not None and len(ids) > max_length:
        if mode == "keep_start":
            ids = ids[:max_length]
            n_prompt = min(n_prompt, max_length)
        else:
            cut = len(ids) - max_length
            ids = ids[cut:]
            n_prompt = max(n_prompt - cut, 0)
    return ids, n_prompt


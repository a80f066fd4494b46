"""Preference data formats and row checks: standard strings, conversational message lists,
implicit prompts (no prompt column: the longest common prefix of chosen and rejected, TRL's
trailing-space rule) and unpaired (prompt, completion, label) rows. A bad row gets a reason; the
caller skips and counts it."""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from jaxpref.errors import DataError

def is_messages(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in v)


def extract_prompt(chosen, rejected):
    """Implicit prompt: longest common prefix (chars for strings, whole messages for lists); a
    space right before the split goes to the completions (TRL's rule)."""
    n = min(len(chosen), len(rejected))
    idx = max(n - 1, 0)  # TRL keeps the loop variable's last value when one is a prefix of the other
    # Messages compare without Arrow's null keys (TRL compares the dicts: chosen and rejected columns
    # of different message keys then share no message, and TRL fails on the empty prompt).
    same = (lambda a, b: _comparable([a]) == _comparable([b])) if isinstance(chosen, list) else \
        (lambda a, b: a == b)
    for i in range(n):
        if not same(chosen[i], rejected[i]):
            idx = i
            if chosen[i - 1] == " ":
                idx = i - 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def map_columns(ds, ds_cfg, method: str) -> tuple[Any, str]:
    """Rename configured columns to canonical ones; returns (dataset, kind) with kind in
    paired / implicit / unpaired. Raises DataError listing the columns present."""
    cols = list(ds.column_names)
    c = ds_cfg
    if c.chosen_column in cols and c.rejected_column in cols:
        keep = {c.chosen_column: "chosen", c.rejected_column: "rejected"}
        kind = "implicit"
        if c.prompt_column in cols:
            keep[c.prompt_column] = "prompt"
            kind = "paired"
        elif c.prompt_column != "prompt":
            # Only the default name may be absent (implicit-prompt data); a configured one must exist.
            raise DataError(f"dataset `{c.name}`: missing column `{c.prompt_column}` "
                            f"(dataset.prompt_column); columns present: {', '.join(cols)}")
    elif method == "kto" and c.completion_column in cols and c.label_column in cols:
        if c.prompt_column not in cols:
            raise DataError(f"dataset `{c.name}`: missing column `{c.prompt_column}`; columns present: {', '.join(cols)}")
        keep = {c.prompt_column: "prompt", c.completion_column: "completion", c.label_column: "label"}
        kind = "unpaired"
    else:
        missing = [x for x in (c.chosen_column, c.rejected_column) if x not in cols]
        raise DataError(f"dataset `{c.name}`: missing column{'s' if len(missing) > 1 else ''} "
                        f"`{'`, `'.join(missing)}`; columns present: {', '.join(cols)}")
    keep.update({x: x for x in TEMPLATE_COLUMNS if x in cols and x not in keep})
    ds = ds.select_columns(list(keep))
    renames = {k: v for k, v in keep.items() if k != v}
    if renames:
        # Two-step rename so that swapped names (e.g. chosen<->rejected) do not collide.
        ds = ds.rename_columns({k: f"__jp_{v}" for k, v in renames.items()})
        ds = ds.rename_columns({f"__jp_{v}": v for v in renames.values()})
    return ds, kind


# Per-row chat template inputs TRL passes to `apply_chat_template` for conversational rows.
TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")


def template_kwargs(row: dict) -> dict | str:
    """`apply_chat_template` keyword arguments of one row, as TRL builds them (`tools`, JSON text
    allowed, plus the row's `chat_template_kwargs`), or the reason the row cannot be used."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            return "tools is not valid JSON"
    extra = row.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
        return "chat_template_kwargs is not a mapping"
    return {"tools": tools, **extra} if (tools is not None or extra) else {}


def _blank(v: Any) -> bool:
    return not v or (isinstance(v, str) and not v.strip())


def _blank_message(m: dict) -> bool:
    """A message that renders nothing of its own: blank content and no other field (an assistant's
    `tool_calls` or `reasoning_content` is a completion even with empty content, as TRL trains it)."""
    return _blank(m["content"]) and all(v is None or v == "" or v == [] or v == {}
                                        for k, v in m.items() if k not in ("role", "content"))


def _comparable(v: Any) -> Any:
    """A completion without the null fields Arrow adds to messages: chosen and rejected columns
    may carry different message keys (`tool_calls` only in one), so equal messages differ as dicts."""
    if isinstance(v, list):
        return [{k: x for k, x in m.items() if x is not None} if isinstance(m, dict) else m for m in v]
    return v


def row_problem(row: dict, kind: str, fmt: str) -> str | None:
    fields = ("prompt", "completion") if kind == "unpaired" else ("prompt", "chosen", "rejected")
    for f in fields:
        v = row.get(f)
        if v is None:
            return f"{f} is null"
        if fmt == "conversational":
            if f == "prompt" and v == []:
                return "prompt is an empty conversation"  # no chat template renders one
            if not is_messages(v):
                return f"{f} is not a message list" if not isinstance(v, str) else "mixed formats"
        elif not isinstance(v, str):
            return f"{f} is not a string" if not is_messages(v) else "mixed formats"
    comps = ("completion",) if kind == "unpaired" else ("chosen", "rejected")
    for f in comps:
        v = row[f]
        if _blank(v) or (isinstance(v, list) and all(_blank_message(m) for m in v)):
            return f"empty {f}"
    if kind != "unpaired":
        if _comparable(row["chosen"]) == _comparable(row["rejected"]):
            return "chosen equals rejected"
    else:
        if not isinstance(row["label"], (bool, np.bool_)):
            return "label is not a boolean"
    return None


def detect_format(rows: list[dict], kind: str) -> str:
    key = "completion" if kind == "unpaired" else "chosen"
    votes = Counter("conversational" if is_messages(r.get(key)) else "standard" for r in rows[:200])
    return votes.most_common(1)[0][0] if votes else "standard"



"""Prompts in, completions out: the tokens a prompt becomes, the ids that end a completion, stop
strings, and the completion's text.

Prompts follow TRL's two formats: a string is used as it is (standard format: tokenized with the
tokenizer's defaults, as `GRPOTrainer` does); a list of messages is rendered with the tokenizer's
chat template and `add_generation_prompt=True` (conversational format), as transformers'
`apply_chat_template` renders and tokenizes it.
"""
from __future__ import annotations

import json
from pathlib import Path

from jaxpref.errors import ConfigError, read_utf8


def prompt_ids(tok, prompt, where: str = "prompt") -> list[int]:
    """A string or a list of {"role", "content"} messages -> token ids. Errors name `where`."""
    if isinstance(prompt, str):
        if not prompt:
            raise ConfigError(f"{where} is an empty string")
        return list(tok(prompt)["input_ids"])
    check_messages(prompt, where)
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"{where} is a list of messages, but the tokenizer has no chat template")
    out = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = out["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def read_prompts(path: str, flag: str) -> list:
    """The `prompt` of every row of a JSON lines file (blank lines skipped); errors name `flag`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag} {path}: " + ("is a directory, expected a JSON lines file" if p.is_dir() else "no such file"))
    out = []
    text = read_utf8(p, ConfigError, "it", f"save the {flag} file as UTF-8")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{flag} {path}: line {n} is not JSON ({e.msg})")
        if not isinstance(row, dict):
            from jaxpref.data.load import json_kind
            raise ConfigError(f"{flag} {path}: line {n} is {json_kind(row)}, not an object with a `prompt` "
                              "(JSON lines: one object per line)")
        if "prompt" not in row:
            raise ConfigError(f"{flag} {path}: line {n} has no `prompt`")
        if not isinstance(row["prompt"], (str, list)):
            raise ConfigError(f"{flag} {path}: line {n}: `prompt` must be a string or a list of "
                              f"messages, got {type(row['prompt']).__name__}")
        out.append(row["prompt"])
    if not out:
        raise ConfigError(f"{flag} {path}: no prompts")
    return out


def check_messages(prompt, where: str) -> None:
    if not isinstance(prompt, list) or not prompt:
        raise ConfigError(f"{where} must be a string or a non-empty list of messages, "
                          f"got {type(prompt).__name__}")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ConfigError(f"{where}: message {i} must be an object with `role` and `content`")


def user_prompt(tok, text: str):
    """`--prompt TEXT`: one user message when the tokenizer has a chat template, else the text."""
    return [{"role": "user", "content": text}] if getattr(tok, "chat_template", None) else text


def eos_ids(model_dir: Path, tok) -> tuple[int, ...]:
    """The ids that end a completion, those of transformers' `model.generation_config`: the
    `eos_token_id` (an id or a list) of the model's generation_config.json when the file is there,
    else of its config.json (as `GenerationConfig.from_model_config` reads it); the tokenizer's
    eos id when that names none."""
    gen, cfg = Path(model_dir) / "generation_config.json", Path(model_dir) / "config.json"
    ids = _read_json(gen if gen.is_file() else cfg).get("eos_token_id") if gen.is_file() or cfg.is_file() else None
    if ids is None:
        ids = tok.eos_token_id
    if ids is None:
        return ()
    return tuple(dict.fromkeys(int(i) for i in (ids if isinstance(ids, list) else [ids])))


def _read_json(file: Path) -> dict:
    try:
        out = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: unreadable ({e})")
    if not isinstance(out, dict):
        raise ConfigError(f"{file}: a JSON {type(out).__name__}, expected an object")
    return out


def cut_at_stop(tok, ids: list[int], stops: list[str], prompt_ids: list[int] = ()) -> list[int]:
    """`ids` up to and including the token that completes the first stop string, or `ids`
    unchanged: as transformers' `stop_strings` stop, a stop string counts when it ends in the
    completion, and it may begin in the prompt (`prompt_ids`) it follows."""
    head = len(tok.decode(list(prompt_ids))) if prompt_ids else 0

    def stopped(n: int) -> bool:
        seen = tok.decode([*prompt_ids, *ids[:n]])
        return any(seen.find(s, max(0, head - len(s) + 1)) >= 0 for s in stops)

    if not stops or not stopped(len(ids)):
        return ids
    lo, hi = 1, len(ids)   # the shortest prefix whose text holds a stop string
    while lo < hi:
        mid = (lo + hi) // 2
        if stopped(mid):
            hi = mid
        else:
            lo = mid + 1
    return ids[:lo]


def completion_text(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)

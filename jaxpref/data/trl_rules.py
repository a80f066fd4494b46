"""Tokenization of TRL's ORPO and CPO trainers (`trl.experimental.orpo.ORPOTrainer`,
`trl.experimental.cpo.CPOTrainer`, TRL 1.x), which differs from DPOTrainer's (`jaxpref.data`):

- conversational rows are rendered to text first: the prompt with the generation prompt (or, when
  it ends with an assistant message, continuing that message), prompt+chosen and prompt+rejected
  without; the prompt text is cut to the characters all three share, and each completion is the
  rest of its text. A row's `tools` are not passed to the template; its `chat_template_kwargs` are;
- text is tokenized without special tokens; a branch's completion starts at the tokenized prompt's
  length, or one token earlier when the last prompt token merges with the completion's first (the
  prompts of the two branches may then differ by that token);
- BOS is prepended to each branch's prompt unless its first token already is BOS, and EOS appended
  to each completion unless its last token already is EOS (token ids, not text);
- the prompt is never truncated; prompt+completion longer than max_length loses the completion's
  end (jaxpref's keep_start; rows whose prompt alone fills max_length are dropped, as for DPO).

Rows TRL refuses with an error (branch prompts differing beyond the merged token) are skipped and
counted instead. KTO, DPO and IPO keep DPOTrainer's/KTOTrainer's rules (`jaxpref.data`).
"""
from __future__ import annotations

# jaxpref method -> the TRL trainer whose tokenization it follows.
TRAINER_OF_METHOD = {"dpo": "DPOTrainer", "ipo": "DPOTrainer", "kto": "KTOTrainer",
                     "orpo": "ORPOTrainer", "cpo": "CPOTrainer", "simpo": "CPOTrainer"}


def _common_chars(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def render_conversation(tok, prompt: list, completions: list[list], kwargs: dict) -> tuple[str, list[str]] | str:
    """Message lists -> (prompt text, completion texts) as TRL's `apply_chat_template` renders them
    for these trainers, or the reason the row cannot be rendered."""
    last = prompt[-1]["role"]
    if last in ("user", "tool"):
        gen, cont = True, False
    elif last == "assistant":
        gen, cont = False, True
    else:
        return f"prompt ends with a `{last}` message"
    p = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=gen,
                                continue_final_message=cont, **kwargs)
    full = [tok.apply_chat_template(prompt + c, tokenize=False, **kwargs) for c in completions]
    for f in full:
        p = _common_chars(p, f)
    return p, [f[len(p):] for f in full]


def _text_ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def split_answer(tok, prompt: str, prompt_ids: list[int], answer: str) -> tuple[list[int], list[int], bool] | None:
    """prompt+answer -> (its prompt ids, its answer ids, whether the boundary moved back one token),
    or None where prompt+answer has fewer tokens than the prompt (TRL fails there)."""
    full = _text_ids(tok, prompt + answer)
    start = len(prompt_ids)
    if start > len(full):
        return None
    if full[:start] != prompt_ids:
        start -= 1  # only the last prompt token is assumed to merge
    return full[:start], full[start:], start < len(prompt_ids)


def tokenize_pair_row(tok, prompt, chosen, rejected, fmt: str, template: dict | None = None):
    """-> (prompt ids, chosen ids, rejected ids, chosen extra, rejected extra, boundary moved), or
    the reason the row is skipped.

    The two branches may have different prompts (one token apart): the returned prompt is their
    common prefix, and `chosen extra` / `rejected extra` count the leading tokens of chosen /
    rejected that still belong to that branch's prompt (not scored)."""
    if fmt == "conversational":
        r = render_conversation(tok, prompt, [chosen, rejected], template or {})
        if isinstance(r, str):
            return r
        prompt, (chosen, rejected) = r
    prompt_ids = _text_ids(tok, prompt)
    c = split_answer(tok, prompt, prompt_ids, chosen)
    r = split_answer(tok, prompt, prompt_ids, rejected)
    if c is None or r is None:
        return "prompt+completion has fewer tokens than the prompt"
    (pc, ac, moved_c), (pr, ar, moved_r) = c, r
    if abs(len(pc) - len(pr)) > 1 or sum(a != b for a, b in zip(pc, pr)) > 1:
        return "chosen and rejected prompts tokenize differently"
    bos, eos = tok.bos_token_id, tok.eos_token_id
    if bos is not None:
        pc = pc if pc[:1] == [bos] else [bos] + pc
        pr = pr if pr[:1] == [bos] else [bos] + pr
    if eos is not None:
        ac = ac if ac[-1:] == [eos] else ac + [eos]
        ar = ar if ar[-1:] == [eos] else ar + [eos]
    n = 0
    for a, b in zip(pc, pr):
        if a != b:
            break
        n += 1
    return pc[:n], pc[n:] + ac, pr[n:] + ar, len(pc) - n, len(pr) - n, moved_c or moved_r


def row_template_kwargs(row: dict) -> dict | str:
    """The chat template arguments these trainers pass: the row's `chat_template_kwargs` only
    (its `tools` are left out), or the reason the row cannot be used."""
    extra = row.get("chat_template_kwargs") or {}
    return extra if isinstance(extra, dict) else "chat_template_kwargs is not a mapping"

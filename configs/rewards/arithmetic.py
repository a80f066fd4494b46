"""Reward functions for configs/grpo_example.yaml, called as TRL calls reward functions."""
import re


def _text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def correct(prompts, completions, answer, **kwargs):
    """1.0 when the completion's last number is the row's `answer`, else 0.0."""
    out = []
    for c, a in zip(completions, answer):
        numbers = re.findall(r"-?\d+", _text(c))
        out.append(1.0 if numbers and numbers[-1] == a else 0.0)
    return out


def brief(prompts, completions, **kwargs):
    """1.0 for an answer of at most 8 characters, falling to 0 at 40."""
    return [max(0.0, min(1.0, (40 - len(_text(c).strip())) / 32)) for c in completions]

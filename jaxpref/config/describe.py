"""`--print-config`: the resolved config with every key, its default and one line of help.

The help is each field's comment in the dataclasses that define the sections (`schema`, and each
method's keys in `jaxpref.objectives.methods`): the comment at the end of its line, or the comment
lines just above it. The printout is generated from them, so it cannot drift from the code; a key
without a comment is a test failure (tests/test_config_keys.py).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import json
import math
import tokenize
from typing import Any

from jaxpref.config.schema import Config


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """Field name -> its one line of help, for `cls` and the dataclasses it derives from."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and klass.__module__ != "types":
            try:
                out.update(_comments(inspect.getsource(klass)))
            except (OSError, TypeError):  # made by make_dataclass: no source of its own
                pass
    return out


def _comments(source: str) -> dict[str, str]:
    """`name: type = value  # help` lines of a class body, and comment blocks above a field."""
    out: dict[str, str] = {}
    above: list[str] = []
    line_start: dict[int, str] = {}   # line -> the field name it declares
    trailing: dict[int, str] = {}
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.NAME and i + 1 < len(tokens) and tokens[i + 1].string == ":" \
                and tok.start[1] == 4 and tokens[i - 1].type in (tokenize.INDENT, tokenize.NEWLINE, tokenize.NL,
                                                                  tokenize.DEDENT, tokenize.COMMENT):
            line_start[tok.start[0]] = tok.string
        elif tok.type == tokenize.COMMENT:
            trailing[tok.start[0]] = tok.string.lstrip("#").strip()
    field_end: dict[int, int] = {}     # a field's first line -> the line its statement ends on
    for start in line_start:
        end = start
        for tok in tokens:
            if tok.start[0] >= start and tok.type == tokenize.NEWLINE:
                end = tok.start[0]
                break
        field_end[start] = end
    for n, text in enumerate(source.splitlines(), 1):
        if n in line_start:
            own = [trailing[k] for k in range(n, field_end[n] + 1) if k in trailing]
            out[line_start[n]] = (" ".join(own) or " ".join(above)).rstrip(".")
            above = []
        elif text.strip().startswith("#"):
            above.append(text.strip().lstrip("#").strip())
        elif not text.strip() or text.strip().startswith(('"""', "def ", "@")):
            above = []
    return out


def _yaml(value: Any) -> str:
    """A value in YAML flow style (JSON, with floats YAML 1.1 reads as floats)."""
    if isinstance(value, float):
        text = repr(value) if math.isfinite(value) else json.dumps(value)
        return text.replace("e", ".0e", 1) if "e" in text and "." not in text else text
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_yaml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _section(obj: Any, indent: str, lines: list[str], first: str = "") -> None:
    cls = type(obj)
    helps, defaults = field_help(cls), cls()
    for i, f in enumerate(dataclasses.fields(obj)):
        if f.metadata.get("internal"):
            continue
        value, default = getattr(obj, f.name), getattr(defaults, f.name)
        pad = first if i == 0 and first else indent
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:{'':<{max(1, 34 - len(pad) - len(f.name))}}"
                         f"# {helps.get(f.name, '')}. Default: {_yaml(_plain(default))}")
            _section(value, indent + "  ", lines)
            continue
        entry = f"{pad}{f.name}: {_yaml(_plain(value))}"
        lines.append(f"{entry:<35} # {helps.get(f.name, '')}. Default: {_yaml(_plain(default))}")


def _plain(value: Any) -> Any:
    from jaxpref.config.parse import to_dict
    return to_dict(value)


def describe(cfg: Config) -> str:
    """The resolved config as YAML (it loads back as the same config), each key followed by its
    help and default as a comment."""
    lines = [f"# The resolved config of {cfg.source}: every key, then `# its help. Default: ...`"]
    for f in dataclasses.fields(cfg):
        if f.metadata.get("internal"):
            continue
        value = getattr(cfg, f.name)
        lines.append(f"{f.name}:")
        if isinstance(value, list):
            for entry in value:
                _section(entry, "    ", lines, first="  - ")
        else:
            _section(value, "  ", lines)
    return "\n".join(lines) + "\n"

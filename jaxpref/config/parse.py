"""Reading a config: YAML -> the typed sections of `schema`, `--set` overrides, type checks.

Unknown keys and wrong types are errors that name the key, the file and the closest valid key.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from jaxpref.config.schema import Config
from jaxpref.config.validate import validate
from jaxpref.errors import ConfigError, read_utf8

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, where: str, src: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose (1e-5 is a str)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        # Try the plain types before containers so "5" stays str when str is allowed.
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where, src)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # one type or null: that type's own message (e.g. "a finite number")
            raise errors[0]
        raise ConfigError(f"{src}: `{where}` must be {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: `{where}` must be a mapping, got {value!r}")
        return _build(tp, value, where, src)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{src}: `{where}` must be {_type_name(tp)}, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: `{where}` must be a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(v, vt, f"{where}.{k}", src) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{src}: `{where}` must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{src}: `{where}` must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        raise ConfigError(f"{src}: `{where}` must be a finite number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{src}: `{where}` must be a string, got {value!r}")
    raise ConfigError(f"{src}: `{where}` has an unsupported type")


def _build(cls: type, data: dict, where: str, src: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"{src}: unknown key `{path}`{_suggest(where, str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], path, src)
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any, src: str) -> None:
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            try:
                if int(part) < 0:
                    raise IndexError(part)
                node = node[int(part)]
                continue
            except (ValueError, IndexError):
                raise ConfigError(f"--set {dotted}: `{'.'.join(parts[:i + 1])}` is not a valid index")
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: `{'.'.join(parts[:i])}` is a value, not a section")
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        try:
            if int(last) < 0:
                raise IndexError(last)
            node[int(last)] = value
        except (ValueError, IndexError):
            raise ConfigError(f"--set {dotted}: `{last}` is not a valid index")
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {dotted}: `{'.'.join(parts[:-1])}` is a value, not a section")


def _bf16(value, src: str, written: str) -> str:
    if not isinstance(value, bool):
        raise ConfigError(f"{src}: `{written}` must be true or false, got {value!r}")
    return "bfloat16" if value else "float32"


def _fp16(value, src: str, written: str):
    if value is True:
        raise ConfigError(f"{src}: `{written}`: float16 training is not supported; "
                          "set `training.compute_dtype: bfloat16` (TRL's bf16: true)")
    return DROP


def _tf32(value, src: str, written: str) -> str:
    if not isinstance(value, bool):
        raise ConfigError(f"{src}: `{written}` must be true or false, got {value!r}")
    return "tf32" if value else "highest"


def _optim(value, src: str, written: str) -> str:
    """TRL's `optim` names (transformers' OptimizerNames) -> ours."""
    name = str(value).lower()
    if name.startswith("adamw") and "8bit" not in name and "4bit" not in name:
        return "adamw"
    if name in ("sgd", "adafactor"):
        return name
    raise ConfigError(f"{src}: `{written}` `{value}` has no equivalent here; set `training.optimizer` "
                      "to adamw (every adamw_* of transformers), sgd or adafactor")


def _negate(value, src: str, written: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{src}: `{written}` must be true or false, got {value!r}")
    return not value


DROP = object()  # a converter's answer for a key that says nothing here (fp16: false)

# Other names of a key: (section, key) -> its one home (section, key[, converter]). The names TRL
# and transformers users write (DPOConfig / TrainingArguments, under `training` or where they
# belong) are read here; a converter maps the value (bf16: true -> compute_dtype: bfloat16) or
# raises an error that names our key. Errors about an aliased key name it as written.
ALIASES = {
    ("training", "save_steps"): ("finetuning", "save_steps"),
    ("training", "save_total_limit"): ("finetuning", "save_total_limit"),
    ("training", "gradient_checkpointing"): ("finetuning", "gradient_checkpointing"),
    ("training", "num_train_epochs"): ("training", "num_epochs"),
    ("training", "bf16"): ("training", "compute_dtype", _bf16),
    ("training", "fp16"): ("training", "compute_dtype", _fp16),
    ("training", "tf32"): ("training", "matmul_precision", _tf32),
    ("training", "optim"): ("training", "optimizer", _optim),
    ("training", "evaluation_strategy"): ("training", "eval_strategy"),
    ("training", "load_best_model_at_end"): ("finetuning", "load_best_model_at_end"),
    ("training", "metric_for_best_model"): ("finetuning", "metric_for_best_model"),
    ("training", "greater_is_better"): ("finetuning", "greater_is_better"),
    ("training", "precompute_ref_log_probs"): ("post_training", "precompute_ref_logps"),
    ("post_training", "precompute_ref_log_probs"): ("post_training", "precompute_ref_logps"),
    ("training", "report_to"): ("logging", "report_to"),
    ("training", "run_name"): ("logging", "run_name"),
    ("training", "log_level"): ("logging", "log_level"),
    ("training", "disable_tqdm"): ("logging", "progress_bar", _negate),
    ("logging", "logging_steps"): ("training", "logging_steps"),
    ("logging", "output_dir"): ("training", "output_dir"),
    ("logging", "disable_tqdm"): ("logging", "progress_bar", _negate),
    # GRPOConfig's name (TRL <= 0.24); jaxpref keeps the prompt's last tokens, as TRL did.
    ("post_training", "max_prompt_length"): ("training", "max_prompt_length"),
}


def _apply_aliases(data: dict, src: str) -> dict[str, str]:
    """Move aliased keys to their home (in place, converting values where the alias says how);
    the same setting given twice with two values is an error. -> {home key: the key as written}
    for the aliases used."""
    used = {}
    for (sec, key), (home_sec, home_key, *convert) in ALIASES.items():
        section = data.get(sec)
        if not isinstance(section, dict) or key not in section:
            continue
        value = section.pop(key)
        if convert:
            value = convert[0](value, src, f"{sec}.{key}")
            if value is DROP:
                continue
        home = data.get(home_sec)
        if not isinstance(home, dict):
            data[home_sec] = home = {}
        if home_key in home and home[home_key] != value:
            raise ConfigError(f"{src}: `{sec}.{key}` ({value!r}) and `{home_sec}.{home_key}` ({home[home_key]!r}) "
                              f"are the same setting; give it once, as `{home_sec}.{home_key}`")
        home[home_key] = value
        used[f"{home_sec}.{home_key}"] = f"{sec}.{key}"
    return used


def _section_keys() -> dict[str, list[str]]:
    """Each top-level section -> its keys (the models entries' keys under `models`)."""
    hints = typing.get_type_hints(Config)
    out = {}
    for f in dataclasses.fields(Config):
        tp = hints[f.name]
        tp = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        if dataclasses.is_dataclass(tp) and not f.metadata.get("internal"):
            out[f.name] = [x.name for x in dataclasses.fields(tp) if not x.metadata.get("internal")]
    return out


def _suggest(where: str, key: str, own: list[str]) -> str:
    """' (did you mean `section.key`?)' for an unknown key, looking in every section: the same
    name in another section (or a TRL name's home) first, then a close name in its own section,
    then a close name in another. A nested mapping (early_stopping) looks in itself only."""
    sections = _section_keys()
    here = where.split("[")[0]
    close = lambda pool, cutoff: difflib.get_close_matches(key, pool, n=1, cutoff=cutoff)
    if where and here not in sections:
        found = close(own, 0.5)
        return f" (did you mean `{found[0]}`?)" if found else f" (valid keys: {', '.join(own)})"
    homes = {(sec, k): f"{sec}.{k}" for sec, ks in sections.items() for k in ks}
    homes.update({alias: ".".join(home[:2]) for alias, home in ALIASES.items()})
    exact = [home for (sec, k), home in homes.items() if k == key and sec != here]
    if exact:
        return f" (did you mean `{exact[0]}`?)"
    found = close(own, 0.5)
    if found:
        return f" (did you mean `{found[0]}`?)"
    ratio = lambda k: difflib.SequenceMatcher(None, key, k).ratio()
    best = max(homes.items(), key=lambda kv: ratio(kv[0][1]))
    if ratio(best[0][1]) >= 0.75:
        return f" (did you mean `{best[1]}`?)"
    return f" ({'sections' if not where else 'valid keys'}: {', '.join(own)})"


def _from_data(data: dict, src: str) -> Config:
    """Aliases moved home, typed sections built, values checked; an error about a key the user
    wrote under another name names it as written."""
    used = _apply_aliases(data, src)
    try:
        cfg = _build(Config, data, "", src)
        cfg.source = src
        validate(cfg)
    except ConfigError as e:
        msg = str(e)
        for home, written in used.items():
            msg = msg.replace(f"`{home}`", f"`{written}`")
        raise ConfigError(msg) from None
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override (`section.key=value`, typed like YAML) and validate a config file."""
    return _from_data(read_config_data(path, overrides), str(path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: PyYAML keeps
    the last silently, so a second `training:` section would drop every key of the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue   # `<<: *anchor`: the merged keys may be overridden here
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"`{key}` is given twice in the same mapping (keep one)", key_node.start_mark)
            seen.add(key) if isinstance(key, typing.Hashable) else None
        return super().construct_mapping(node, deep)


def read_config_data(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A config file's YAML with `--set` overrides applied, not yet typed or checked."""
    path = Path(path)
    src = str(path)
    if path.is_dir():
        raise ConfigError(f"config file {src}: is a folder, expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {src}")
    text = read_utf8(path, ConfigError, "the config file", "save the file as UTF-8")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        line = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{src}:{line}: YAML syntax error: {e.problem}")
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: YAML syntax error: {str(e).splitlines()[0]}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: the top level must be a mapping of sections")
    apply_overrides(data, overrides, src)
    return data


def apply_overrides(data: dict, overrides: list[str] | None, src: str) -> None:
    """`section.key=value` overrides (values typed like YAML) into a config's data, in place."""
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"--set {ov}: expected KEY=VALUE with a dotted key")
        key, raw = ov.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key.strip(), value, src)


def config_from_dict(data: dict, src: str = "<dict>") -> Config:
    return _from_data(copy.deepcopy(data), src)



def to_dict(cfg: Any) -> Any:
    """A config (or a section) as plain data, without internal fields (its source, in-memory
    datasets)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                if not f.metadata.get("internal")}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def with_config_paths_resolved(cfg: Config) -> Config:
    """A copy whose paths relative to the config file's folder (`post_training.reward_funcs`'
    `file.py:function` entries and reward model folders) are absolute, so that the config, written
    anywhere else (--print-config, a run folder's config.yaml), still names the same files."""
    from jaxpref.data.rewards import parse_entry, resolve_file

    entries = getattr(cfg.post_training, "reward_funcs", None)
    if not entries:
        return cfg
    entries = [entries] if isinstance(entries, str) else list(entries)
    base = Path(cfg.source).parent
    out = []
    for entry in entries:
        kind, where, func = parse_entry(entry)
        if kind in ("file", "model") and not Path(where).expanduser().is_absolute() \
                and resolve_file(where, base).exists():
            where = str(Path(os.path.abspath(resolve_file(where, base))))
            entry = f"{where}:{func}" if kind == "file" else where
        out.append(entry)
    cfg = copy.deepcopy(cfg)
    cfg.post_training.reward_funcs = out[0] if isinstance(cfg.post_training.reward_funcs, str) else out
    return cfg


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(with_config_paths_resolved(cfg)), sort_keys=False))

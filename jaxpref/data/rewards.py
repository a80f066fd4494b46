"""Reward functions named in the config (`post_training.reward_funcs`), loaded and called as TRL's
GRPO/RLOO/online DPO trainers call theirs.

An entry is `package.module:function` (imported from the Python path) or `path/to/file.py:function`
(a path relative to the config file's folder, or absolute). Any other entry names a reward model: a
folder with a one-label sequence-classification checkpoint (relative to the config file's folder,
or absolute), read into our model and called like a function (`jaxpref.training.reward_model`).

A function is called once per rollout batch with keyword arguments only, as TRL 1.16 calls it
(`GRPOTrainer._calculate_rewards`): `prompts` (the raw prompts, strings or message lists, one per
completion), `completions` (decoded text, or `[{"role": "assistant", "content": text}]` for
conversational prompts), `completion_ids` (token id lists), every other dataset column of the row
(one value per completion), `trainer_state` (`global_step`, `epoch`, `max_steps`), and `log_extra` /
`log_metric` (extra sample columns and metrics). It returns one float or None per completion; None
is "not scored" (NaN here, left out of means, as TRL does). Coroutine functions are awaited.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxpref.errors import ConfigError, JaxprefError


class RewardError(JaxprefError):
    """A reward function failed or returned something other than one float or None per completion."""


_FUNC = r"[A-Za-z_]\w*"
_MODULE = re.compile(rf"^{_FUNC}(\.{_FUNC})*$")


def parse_entry(entry: str) -> tuple[str, str, str]:
    """-> (kind, where, function): kind "file" (where: the .py path as written), "module" (where:
    the dotted module) or "model" (where: the whole entry, a reward model source)."""
    where, sep, func = entry.rpartition(":")
    if sep and re.fullmatch(_FUNC, func):
        if where.endswith(".py"):
            return "file", where, func
        if _MODULE.match(where):
            return "module", where, func
    return "model", entry, ""


def resolve_file(where: str, config_dir: Path) -> Path:
    path = Path(where).expanduser()
    return path if path.is_absolute() else (config_dir / path)


def check_entries(entries: list[str], config_dir: Path, src: str) -> None:
    """Config-time checks that import nothing: each entry's form, and that a `file.py` exists."""
    for i, entry in enumerate(entries):
        key = f"post_training.reward_funcs[{i}]"
        if not entry.strip():
            raise ConfigError(f"{src}: `{key}` is empty")
        kind, where, _ = parse_entry(entry)
        if kind == "file" and not resolve_file(where, config_dir).is_file():
            raise ConfigError(f"{src}: `{key}` `{entry}`: file {where} not found "
                              f"(a path relative to the config's folder {config_dir})")
        if kind == "model" and not resolve_file(where, config_dir).is_dir():
            raise ConfigError(f"{src}: `{key}` `{entry}`: no reward model folder {where} (a path relative to "
                              f"the config's folder {config_dir}); a reward function is written "
                              "`path/to/file.py:function` or `package.module:function`")


@dataclass(frozen=True)
class RewardFunc:
    """A loaded reward function: `name` is TRL's (the function's `__name__`, a partial
    unwrapped; a callable object's class name; a reward model's folder name), used in
    `rewards/<name>/mean`."""
    name: str
    entry: str
    fn: Callable


def _callable_name(fn) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def _load_file(path: Path, entry: str):
    # A name of its own per file, so two configs' `rewards.py` do not share one module.
    name = "jaxpref_reward_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"reward function `{entry}`: {path}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:
        raise ConfigError(f"reward function `{entry}`: importing {path} failed: {type(e).__name__}: "
                          f"{_first_line(e)}") from None
    sys.modules[name] = module
    return module


def _load_module(where: str, entry: str):
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        missing = f"`{e.name}`" if e.name else "it"
        raise ConfigError(f"reward function `{entry}`: no module {missing} on the Python path "
                          f"(for a file write `path/to/file.py:function`)") from None
    except SyntaxError as e:
        raise ConfigError(f"reward function `{entry}`: {e.filename}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:
        raise ConfigError(f"reward function `{entry}`: importing `{where}` failed: {type(e).__name__}: "
                          f"{_first_line(e)}") from None


def load_reward_func(entry: str, config_dir: Path) -> RewardFunc:
    """One `module:function` or `file.py:function` entry -> its function, a reward model folder ->
    its scorer; ConfigError in one line for a missing file, module, function or folder, a file that
    does not import, a non-callable, or a folder that is not a one-label reward model."""
    kind, where, func = parse_entry(entry)
    if kind == "model":
        from jaxpref.training.reward_model import load_reward_model

        model = load_reward_model(entry, config_dir)
        return RewardFunc(model.__name__, entry, model)
    if kind == "file":
        path = resolve_file(where, config_dir)
        if not path.is_file():
            raise ConfigError(f"reward function `{entry}`: file {path} not found")
        module = _load_file(path, entry)
    else:
        module = _load_module(where, entry)
    fn = getattr(module, func, None)
    if fn is None:
        names = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        have = f" (its functions: {', '.join(names)})" if names else ""
        raise ConfigError(f"reward function `{entry}`: `{where}` has no `{func}`{have}")
    if not callable(fn):
        raise ConfigError(f"reward function `{entry}`: `{func}` is a {type(fn).__name__}, not a function")
    return RewardFunc(_callable_name(fn), entry, fn)


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


@dataclass
class TrainerState:
    """What a reward function gets as `trainer_state` (the fields TRL reward functions read)."""
    global_step: int = 0
    epoch: float = 0.0
    max_steps: int = 0


@dataclass
class Scored:
    """Rewards of one rollout batch: `per_func` [N, F] float32 (NaN: None), plus the columns and
    metrics the functions logged through `log_extra` / `log_metric` (name -> values)."""
    per_func: np.ndarray
    extra_columns: dict[str, list] = field(default_factory=dict)
    extra_metrics: dict[str, list[float]] = field(default_factory=dict)


def _as_rewards(out: Any, rf: RewardFunc, n: int) -> np.ndarray:
    """A function's return -> [n] float32 with NaN for None, or a one-line RewardError."""
    where = f"reward function `{rf.entry}`"
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
        raise RewardError(f"{where} returned a {type(out).__name__}; it must return a list of one float "
                          f"(or None) per completion ({n} here)")
    values = list(out)
    if len(values) != n:
        raise RewardError(f"{where} returned {len(values)} rewards for {n} completions; it must return "
                          "one float (or None) per completion")
    res = np.empty(n, np.float32)
    for i, v in enumerate(values):
        if v is None:
            res[i] = np.nan
            continue
        try:
            res[i] = float(v)
        except (TypeError, ValueError):
            raise RewardError(f"{where} returned {v!r} (a {type(v).__name__}) for completion {i}; "
                              "rewards must be numbers or None") from None
        if math.isinf(res[i]):
            raise RewardError(f"{where} returned {v!r} for completion {i}; rewards must be finite (None or NaN: "
                              "not scored), an infinite one would make every advantage of its group NaN")
    return res


def score(funcs: list[RewardFunc], prompts: list, completions: list, completion_ids: list[list[int]],
          columns: dict[str, list] | None = None, trainer_state: TrainerState | None = None) -> Scored:
    """Call every function on one rollout batch of N completions (TRL's keyword arguments) ->
    `Scored`. `columns`: the rows' other dataset columns, each a list of N values."""
    n = len(completions)
    out = Scored(np.zeros((n, len(funcs)), np.float32))

    def log_extra(column: str, values: list) -> None:
        out.extra_columns[column] = list(values)
        if len(out.extra_columns[column]) != n:
            raise RewardError(f"reward function `{calling[0]}` logged {len(out.extra_columns[column])} values for "
                              f"column `{column}` (log_extra) for {n} completions; it takes one per completion")

    def log_metric(name: str, value: float) -> None:
        out.extra_metrics.setdefault(name, []).append(float(value))

    kwargs = {k: v for k, v in (columns or {}).items() if k not in ("prompt", "completion", "completion_ids")}
    kwargs.update(trainer_state=trainer_state or TrainerState(), log_extra=log_extra, log_metric=log_metric)
    calling = [""]   # the entry whose call is under way (log_extra's errors name it)
    for j, rf in enumerate(funcs):
        calling[0] = rf.entry
        try:
            got = rf.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
            if inspect.isawaitable(got):
                got = asyncio.run(_awaited(got))
        except JaxprefError:
            raise
        except SystemExit as e:
            raise RewardError(f"reward function `{rf.entry}` called sys.exit({e.code!r})") from None
        except Exception as e:
            raise RewardError(f"reward function `{rf.entry}` raised {type(e).__name__}: {_first_line(e)}") from e
        out.per_func[:, j] = _as_rewards(got, rf, n)
    unscored = int(np.sum(np.all(np.isnan(out.per_func), axis=1))) if funcs else 0
    if unscored:   # TRL warns too (GRPOTrainer._calculate_rewards)
        print(f"jaxpref: warning: {unscored} of the {n} completions sampled for step "
              f"{kwargs['trainer_state'].global_step + 1} got no reward (every reward function returned None or NaN "
              "for them)", file=sys.stderr)
    return out


async def _awaited(x):
    return await x

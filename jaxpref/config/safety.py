"""Checks of values that used to pass silently and then lost data, broke far from their cause or
meant nothing (issue #16); each error names the key and the file."""
from __future__ import annotations

import difflib
from pathlib import Path

from jaxpref.config.schema import Config
from jaxpref.errors import ConfigError
from jaxpref.errors import check_choice as _choice
from jaxpref.objectives.methods import METHODS

LOG_LEVELS = ("debug", "info", "warning", "error")


def validate_safety(cfg: Config) -> None:
    """Values that used to pass silently and then lost data, broke far from their cause or meant
    nothing (issue #16). Each error names the key and the file."""
    src = cfg.source
    for i, m in enumerate(cfg.models):
        for key in ("name", "huggingface_id", "revision", "ref_model_id", "tokenizer_id"):
            if "\0" in (getattr(m, key) or ""):
                raise ConfigError(f"{src}: `models[{i}].{key}` contains a NUL byte")
        if not m.name:
            raise ConfigError(f"{src}: `models[{i}].name` is needed: no folder name can be derived from "
                              f"`huggingface_id` `{m.huggingface_id}`")
    ds = cfg.dataset
    files = ds.data_files
    flat = ([files] if isinstance(files, str) else list(files.values()) if isinstance(files, dict)
            else list(files or []))
    flat = [x for v in flat for x in ([v] if isinstance(v, str) else v)]
    for key, value in [("dataset.name", ds.name)] + [("dataset.data_files", f) for f in flat]:
        if "\0" in (value or ""):
            raise ConfigError(f"{src}: `{key}` contains a NUL byte")
    if ds.max_samples is not None and ds.max_samples < 1:
        raise ConfigError(f"{src}: `dataset.max_samples` must be >= 1 (or null: every row), got {ds.max_samples}")
    tr, ft, pt = cfg.training, cfg.finetuning, cfg.post_training
    if not 0 <= tr.seed <= 2**32 - 1:
        raise ConfigError(f"{src}: `training.seed` must be in [0, 2**32 - 1], got {tr.seed}")
    for key, v in (("finetuning.save_steps", ft.save_steps), ("training.eval_steps", tr.eval_steps)):
        if v is not None and v < 1:
            raise ConfigError(f"{src}: `{key}` must be >= 1 (or null: never), got {v}")
    if ft.save_total_limit is not None and ft.save_total_limit < 1:
        raise ConfigError(f"{src}: `finetuning.save_total_limit` must be >= 1 (or null: keep every "
                          f"checkpoint), got {ft.save_total_limit}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(tr, key) < 1:
            raise ConfigError(f"{src}: `training.{key}` must be in [0, 1), got {getattr(tr, key)}")
    if tr.adam_epsilon <= 0:
        raise ConfigError(f"{src}: `training.adam_epsilon` must be > 0, got {tr.adam_epsilon}")
    for j, w in enumerate(pt.loss_weights or []):
        if w < 0:
            raise ConfigError(f"{src}: `post_training.loss_weights[{j}]` must be >= 0, got {w}")
    if pt.loss_weights and not any(pt.loss_weights):
        raise ConfigError(f"{src}: `post_training.loss_weights` are all 0, so the loss is 0 and nothing would be "
                          "trained; give at least one loss a positive weight")
    if pt.label_smoothing > 0.5:
        raise ConfigError(f"{src}: `post_training.label_smoothing` must be in [0, 0.5] (above 0.5 it "
                          f"prefers the rejected answers), got {pt.label_smoothing}")
    for key in ("desirable_weight", "undesirable_weight"):
        if getattr(pt, key) <= 0:
            raise ConfigError(f"{src}: `post_training.{key}` must be > 0, got {getattr(pt, key)}")
    _choice(cfg.logging.log_level.lower(), LOG_LEVELS, "logging.log_level", src)
    _check_samples(cfg.logging, cfg.dataset, src)
    es = ft.early_stopping
    logged = ["eval_loss"] + [f"eval_{k}" for k in METHODS[pt.method].metrics]
    checked = [("finetuning.early_stopping.metric", es.metric)] if es is not None else []
    if ft.load_best_model_at_end or ft.metric_for_best_model is not None:
        checked.append(("finetuning.metric_for_best_model", cfg.best_metric))
    for key, metric in checked:
        if metric not in logged:
            close = difflib.get_close_matches(metric, logged, n=1, cutoff=0.5)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise ConfigError(f"{src}: `{key}` `{metric}` is never logged: "
                              f"{pt.method} evaluations log {', '.join(logged)}{hint}")
    if cfg.training.eval_strategy == "no" and (es is not None or ft.load_best_model_at_end):
        key = "early_stopping" if es is not None else "load_best_model_at_end"
        raise ConfigError(f"{src}: `finetuning.{key}` needs evaluations, but `training.eval_strategy` is no")
    if es is not None:
        if es.patience < 1:
            raise ConfigError(f"{src}: `finetuning.early_stopping.patience` must be >= 1, got {es.patience}")
        if es.min_delta < 0:
            raise ConfigError(f"{src}: `finetuning.early_stopping.min_delta` must be >= 0, got {es.min_delta}")


def _check_samples(lg, ds, src: str) -> None:
    sp = lg.sample_prompts
    if isinstance(sp, int) and sp < 1:
        raise ConfigError(f"{src}: `logging.sample_prompts` must be a count >= 1 or a .jsonl file, got {sp}")
    if isinstance(sp, int) and not (ds.eval_split or ds.eval_fraction > 0):
        raise ConfigError(f"{src}: `logging.sample_prompts: {sp}` takes prompts from the eval split, and there "
                          "is none (set dataset.eval_split or dataset.eval_fraction, or give a prompts .jsonl)")
    if isinstance(sp, str) and not Path(sp).is_file():
        raise ConfigError(f"{src}: `logging.sample_prompts`: no such file {sp}")
    if lg.sample_max_new_tokens < 1:
        raise ConfigError(f"{src}: `logging.sample_max_new_tokens` must be >= 1, got {lg.sample_max_new_tokens}")

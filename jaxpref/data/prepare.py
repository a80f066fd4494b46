"""Config -> tokenized train/eval data and its batch layout: the same tokens for train, dry run
and evaluate."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxpref.config import Config
from jaxpref.data import load, tokenize
from jaxpref.data.layouts import DEFAULT_BUCKETS, Layout, PairLayout
from jaxpref.data.lengths import LengthReport, apply_lengths
from jaxpref.data.tokenize import Tokenized
from jaxpref.errors import ConfigError
from jaxpref.objectives.methods import get_method
from jaxpref.models.source import DEFAULT_CACHE


@dataclass
class PreparedData:
    train: Tokenized
    eval: Tokenized | None
    report: LengthReport
    layout: Layout


def data_for(cfg: Config, tok, max_rows: int | None = None, cache_root: Path | None = None) -> PreparedData:
    ds_cfg = cfg.dataset
    method = cfg.post_training.method
    cache = Path(cache_root or DEFAULT_CACHE) / "tokenized"
    rows = load.load_rows(ds_cfg)
    if ds_cfg.max_samples is not None:
        max_rows = min(max_rows or ds_cfg.max_samples, ds_cfg.max_samples)
    train = tokenize.prepare(rows, ds_cfg, tok, method, cache, max_rows)
    ev = None
    if ds_cfg.eval_split:
        ev = tokenize.prepare(load.load_rows(ds_cfg, ds_cfg.eval_split), ds_cfg, tok, method, cache, max_rows)
    elif ds_cfg.eval_fraction > 0:
        n = len(train)
        perm = np.random.default_rng(cfg.training.seed).permutation(n)
        k = max(1, int(round(n * ds_cfg.eval_fraction)))
        if k >= n:
            raise ConfigError(f"`dataset.eval_fraction` {ds_cfg.eval_fraction} takes all {n} usable rows "
                              "for evaluation; none is left to train on")
        rows_in = train.rows_in   # both keep the split's counts: its rows in, as its skipped rows
        ev, train = train.subset(np.sort(perm[:k])), train.subset(np.sort(perm[k:]))
        train.rows_in = ev.rows_in = rows_in
    tr = cfg.training
    train, report = apply_lengths(train, tr.max_length, tr.max_prompt_length, tr.truncation_mode)
    if ev is not None:
        ev, _ = apply_lengths(ev, tr.max_length, tr.max_prompt_length, tr.truncation_mode)
    if len(train) == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in train.skipped.items())
        raise ConfigError(f"dataset `{ds_cfg.name}` is empty after filtering ({reasons})")
    return PreparedData(train, ev, report, layout_for(cfg, tok))


def resolve_layout(cfg: Config) -> tuple[PairLayout, bool]:
    """`training.pair_layout` and `training.padding_free`, with `auto` resolved: a shared prompt
    (computed once per pair; KTO's unpaired rows: concatenated) laid out padding-free. Both give
    TRL's numbers (tests/test_layouts.py, tests/test_fast_path.py) and were the fastest measured
    on CPU and GPU (docs/performance.md)."""
    tr = cfg.training
    kind = tr.pair_layout
    if kind == "auto":
        unpaired = get_method(cfg.post_training.method).data == "unpaired"
        kind = PairLayout.CONCATENATED if unpaired else PairLayout.SHARED_PROMPT
    kind = PairLayout(kind)
    padding_free = (not kind.packed) if tr.padding_free == "auto" else bool(tr.padding_free)
    return kind, padding_free


def layout_for(cfg: Config, tok) -> Layout:
    """The batch layout of this config (`jaxpref.data.layouts.Layout`)."""
    tr = cfg.training
    kind, padding_free = resolve_layout(cfg)
    buckets = tuple(tr.length_buckets) if tr.length_buckets else DEFAULT_BUCKETS
    if tr.max_length is not None and not kind.shares_prompt:
        buckets = tuple(b for b in buckets if b < tr.max_length) + (tr.max_length,)
    pack = tr.pack_length or (tr.max_length if kind == PairLayout.PACKED else
                              int(1.5 * tr.max_length) if tr.max_length else None)
    return Layout(kind, tr.max_length, tr.truncation_mode, buckets,
                  int(tok.pad_token_id if tok.pad_token_id is not None else 0),
                  cfg.post_training.ld_alpha, pack_length=pack,
                  full_span=(cfg.post_training.method == "orpo"
                             and cfg.post_training.orpo_nll_span == "prompt_and_completion"),
                  padding_free=padding_free, max_tokens=tr.max_tokens_per_batch,
                  kl_group=tr.per_device_train_batch_size if get_method(cfg.post_training.method).data == "unpaired"
                  else None)

"""Rows -> token ids as TRL tokenizes them (cached on disk by dataset and tokenizer fingerprint).

Every format of `rows` (standard, conversational, implicit prompt, unpaired; paired data unpaired
when the method is KTO). Bad rows are skipped and counted by reason; nothing is silently lost.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from itertools import chain
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxpref.data.rows import detect_format, extract_prompt, map_columns, row_problem, template_kwargs
from jaxpref.errors import DataError, ModelSourceError

log = logging.getLogger("jaxpref")


@dataclass
class Tokenized:
    """Token ids per example. Paired: prompt/chosen/rejected; unpaired (KTO): prompt/completion/label.
    `source` is each example's row index in the dataset split it came from (empty if unknown)."""
    prompt: list[list[int]]
    chosen: list[list[int]] = field(default_factory=list)
    rejected: list[list[int]] = field(default_factory=list)
    completion: list[list[int]] = field(default_factory=list)
    label: list[bool] = field(default_factory=list)
    format: str = "standard"
    skipped: dict[str, int] = field(default_factory=dict)
    prompt_boundary_mismatches: int = 0
    rows_in: int = 0
    source: list[int] = field(default_factory=list)
    # Leading tokens of chosen / rejected that belong to that branch's prompt (not scored): TRL's
    # ORPO/CPO tokenization can give the two branches prompts one merged token apart
    # (`jaxpref.data.trl_rules`). Empty: none anywhere.
    chosen_prompt_extra: list[int] = field(default_factory=list)
    rejected_prompt_extra: list[int] = field(default_factory=list)

    @property
    def paired(self) -> bool:
        return bool(self.chosen)

    def __len__(self) -> int:
        return len(self.prompt)

    def subset(self, idx: np.ndarray) -> "Tokenized":
        pick = lambda xs: [xs[i] for i in idx] if xs else []
        return Tokenized(pick(self.prompt), pick(self.chosen), pick(self.rejected),
                         pick(self.completion), pick(self.label), self.format, dict(self.skipped),
                         self.prompt_boundary_mismatches, len(idx), pick(self.source),
                         pick(self.chosen_prompt_extra), pick(self.rejected_prompt_extra))

    def digest(self) -> str:
        """sha256 of the token ids and labels, field by field: what the examples are, for the resume
        fingerprint and the reference log-prob cache."""
        h = hashlib.sha256()
        for name in ("prompt", "chosen", "rejected", "completion", "label", "chosen_prompt_extra",
                     "rejected_prompt_extra"):
            rows = getattr(self, name)
            nested = bool(rows) and not np.isscalar(rows[0])
            lengths = np.fromiter(map(len, rows), np.int64, len(rows)) if nested else np.asarray([len(rows)], np.int64)
            flat = np.fromiter(chain.from_iterable(rows) if nested else rows, np.int64)
            h.update(name.encode() + lengths.tobytes() + flat.tobytes())
        return "sha256:" + h.hexdigest()[:16]

    def prompt_extras(self, i: int) -> tuple[int, int]:
        """Pair i's (chosen, rejected) leading tokens that are branch prompt, not completion."""
        if not self.chosen_prompt_extra:
            return 0, 0
        return self.chosen_prompt_extra[i], self.rejected_prompt_extra[i]


# ---------------------------------------------------------------------------------------------
# Tokenization (TRL 1.x DPOTrainer._prepare_dataset semantics)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode(tok, x, **kw) -> list[int]:
    if isinstance(x, list):
        out = tok.apply_chat_template(x, tokenize=True, return_dict=True, **kw)
        return list(out["input_ids"])
    return list(tok(text=x)["input_ids"])


def tokenize_pair(tok, prompt, chosen, rejected, fmt: str,
                  template: dict | None = None) -> tuple[list[int], list[int], list[int], bool]:
    """-> prompt_ids, chosen_ids, rejected_ids, and whether the prompt boundary moved.
    `template`: the row's chat template arguments (conversational rows only, as TRL)."""
    if fmt == "conversational":
        kw = template or {}
        p = _encode(tok, prompt, add_generation_prompt=True, **kw)
        pc = _encode(tok, prompt + chosen, **kw)
        pr = _encode(tok, prompt + rejected, **kw)
    else:
        eos = tok.eos_token or ""
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        p, pc, pr = _encode(tok, prompt), _encode(tok, prompt + chosen), _encode(tok, prompt + rejected)
    n = min(_common_prefix(p, pc), _common_prefix(p, pr))
    return p[:n], pc[n:], pr[n:], n < len(p)


def tokenize_single(tok, prompt, completion, fmt: str,
                    template: dict | None = None) -> tuple[list[int], list[int], bool]:
    if fmt == "conversational":
        kw = template or {}
        p = _encode(tok, prompt, add_generation_prompt=True, **kw)
        pc = _encode(tok, prompt + completion, **kw)
    else:
        eos = tok.eos_token or ""
        completion = completion if completion.endswith(eos) else completion + eos
        p, pc = _encode(tok, prompt), _encode(tok, prompt + completion)
    n = _common_prefix(p, pc)
    return p[:n], pc[n:], n < len(p)


def tokenizer_fingerprint(tok) -> str:
    """A hash of everything that decides token ids: the fast tokenizer's full definition
    (normalizer, pre-tokenizer, merges, post-processor), special tokens and chat template. Encodes
    nothing, so a cache hit costs no tokenizer call."""
    h = hashlib.sha256()
    h.update(str(type(tok).__name__).encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(tok.get_vocab(), sort_keys=True).encode())
        h.update(repr(sorted(vars(tok).get("init_kwargs", {}).items())).encode())
    h.update(str(getattr(tok, "chat_template", "") or "").encode())
    h.update(f"{tok.bos_token}|{tok.eos_token}|{getattr(tok, 'add_bos_token', None)}|"
             f"{getattr(tok, 'add_eos_token', None)}".encode())
    return h.hexdigest()[:16]


def prepare(ds, ds_cfg, tok, method: str, cache_dir: Path | None = None,
            max_rows: int | None = None) -> Tokenized:
    """Map columns, check rows, extract implicit prompts, tokenize by the method's TRL trainer's
    rules (`Method.tokenization`), cached on disk."""
    from jaxpref.objectives.methods import get_method

    ds, kind = map_columns(ds, ds_cfg, method)
    rule = get_method(method).tokenization  # ORPO/CPO/SimPO: TRL's ORPOTrainer/CPOTrainer rules
    if max_rows is not None and len(ds) > max_rows:
        ds = ds.select(range(max_rows))
    key = None
    if cache_dir is not None and getattr(ds, "_fingerprint", None):
        key = hashlib.sha256(f"{ds._fingerprint}|{tokenizer_fingerprint(tok)}|{method}|{kind}|{rule}|v9".encode()).hexdigest()[:20]
        cached = _load_cache(cache_dir / f"{key}.json")
        if cached is not None:
            _warn_boundary(cached)
            return cached
    try:
        rows = ds.to_list()
    except UnicodeDecodeError as e:  # arrow keeps invalid UTF-8 in string columns until read
        raise DataError(f"dataset `{ds_cfg.name}`: a text value is not UTF-8 ({e.reason}); save the data as UTF-8")
    if not rows:
        raise DataError(f"dataset `{ds_cfg.name}` is empty")
    fmt = detect_format(rows, kind)
    if fmt == "conversational" and not getattr(tok, "chat_template", None):
        raise DataError(f"dataset `{ds_cfg.name}` is conversational but the tokenizer has no chat template")
    out = _tokenize_rows(rows, tok, kind, fmt, rule, unpair=get_method(method).data == "unpaired" and kind != "unpaired")
    _warn_boundary(out)
    if len(out) == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in Counter(out.skipped).most_common()) or "no rows"
        raise DataError(f"dataset `{ds_cfg.name}`: no usable row survives ({reasons})")
    if key is not None:
        _save_cache(cache_dir / f"{key}.json", out)
    return out


def _usable(row: dict, kind: str, fmt: str) -> dict | str:
    """The row with its implicit prompt extracted, or the reason it is skipped."""
    if kind == "implicit":
        c, r = row.get("chosen"), row.get("rejected")
        if c is None or r is None:
            return "chosen/rejected is null"
        if type(c) is not type(r) or not isinstance(c, (str, list)):
            return "mixed formats"
        row = dict(zip(("prompt", "chosen", "rejected"), extract_prompt(c, r)))
    return row_problem(row, kind, fmt) or row


def _tokenize_rows(rows: list[dict], tok, kind: str, fmt: str, rule: str, unpair: bool) -> Tokenized:
    """Every usable row tokenized (`rule`: "dpo" or "row"), the others counted by reason.
    `unpair`: paired rows become two unpaired examples (KTO), as TRL unpairs them."""
    from jaxpref.data.trl_rules import row_template_kwargs, tokenize_pair_row

    if tok.eos_token is None and (fmt != "conversational" or tok.pad_token is None):
        # TRL appends it to every plain-text completion and pads with it without a pad_token: both
        # fail there; here completions would silently end without one.
        raise ModelSourceError(f"the tokenizer ({tok.name_or_path}) has no eos_token, which ends every completion (TRL appends it, "
                               "and pads with it when there is no pad_token); set `eos_token` in its "
                               "tokenizer_config.json, or another tokenizer with `models[].tokenizer_id`")
    out = Tokenized(prompt=[], format=fmt if kind != "implicit" else f"implicit-{fmt}", rows_in=len(rows))
    skipped: Counter = Counter()
    pending: list = []
    for n, row in enumerate(rows):
        if pending and n // UNPAIR_BLOCK != pending[0][4] // UNPAIR_BLOCK:
            _flush_unpaired(out, pending)   # TRL's blocks are of dataset rows, skipped ones included
        template = ((row_template_kwargs if rule == "row" else template_kwargs)(row)
                    if fmt == "conversational" else {})
        row = template if isinstance(template, str) else _usable(row, kind, fmt)
        if isinstance(row, str):
            skipped[row] += 1
            continue
        if kind == "unpaired":
            p, comp, moved = tokenize_single(tok, row["prompt"], row["completion"], fmt, template)
            out.prompt.append(p); out.completion.append(comp); out.label.append(bool(row["label"]))
            out.source.append(n)
        elif unpair:
            # TRL unpairs the text first, then tokenizes each (prompt, completion) alone.
            pc, c, moved_c = tokenize_single(tok, row["prompt"], row["chosen"], fmt, template)
            pr, r, moved_r = tokenize_single(tok, row["prompt"], row["rejected"], fmt, template)
            pending.append((pc, c, pr, r, n))
            moved = moved_c or moved_r
        elif rule == "row":
            got = tokenize_pair_row(tok, row["prompt"], row["chosen"], row["rejected"], fmt, template)
            if isinstance(got, str):
                skipped[got] += 1
                continue
            p, c, r, xc, xr, moved = got
            out.chosen_prompt_extra.append(xc); out.rejected_prompt_extra.append(xr)
            out.prompt.append(p); out.chosen.append(c); out.rejected.append(r); out.source.append(n)
        else:
            p, c, r, moved = tokenize_pair(tok, row["prompt"], row["chosen"], row["rejected"], fmt, template)
            out.prompt.append(p); out.chosen.append(c); out.rejected.append(r); out.source.append(n)
        out.prompt_boundary_mismatches += int(moved)
    if pending:
        _flush_unpaired(out, pending)
    if not any(out.chosen_prompt_extra) and not any(out.rejected_prompt_extra):
        out.chosen_prompt_extra, out.rejected_prompt_extra = [], []
    out.skipped = dict(skipped)
    return out


def _warn_boundary(t: Tokenized) -> None:
    """Said whenever the data is prepared, from the cache too."""
    if t.prompt_boundary_mismatches:
        log.warning("the tokenized prompt is not a prefix of prompt+completion in %d rows; the "
                    "completion starts where they diverge", t.prompt_boundary_mismatches)


UNPAIR_BLOCK = 1000  # TRL unpairs with a batched map: per block, all chosen then all rejected


def _flush_unpaired(out: Tokenized, pending: list) -> None:
    for pc, c, _, _, n in pending:
        out.prompt.append(pc); out.completion.append(c); out.label.append(True); out.source.append(n)
    for _, _, pr, r, n in pending:
        out.prompt.append(pr); out.completion.append(r); out.label.append(False); out.source.append(n)
    pending.clear()


def _save_cache(path: Path, t: Tokenized) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(t.__dict__))
    tmp.replace(path)


def _load_cache(path: Path) -> Tokenized | None:
    if not path.is_file():
        return None
    try:
        return Tokenized(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError):
        return None

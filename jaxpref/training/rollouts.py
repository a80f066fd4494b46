"""One rollout batch of an online method (GRPO, RLOO): prompts -> completions sampled by the
generation engine with the current adapter -> rewards from the reward functions -> the arrays
the method's `score` and loss read.

Layout (TRL's): N = prompts x G rows, prompt p's G completions in rows p*G .. p*G+G-1. Each row
is its prompt left-padded to P tokens followed by its completion right-padded to C =
`max_completion_length` slots; `mask` [N, C] marks the completion's tokens up to and including
its first end-of-sequence id (TRL's `completion_mask`). Log-probs and entropies of the completion
tokens are those of logits / temperature, as GRPOTrainer's `_get_per_token_logps_and_entropies`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.data import rewards as rw
from jaxpref.data.prompts import Prompts, decode_completions, truncated_mask
from jaxpref.generation.engine import DecodeOptions, bucket
from jaxpref.models.attention import MaskInfo
from jaxpref.objectives.head import completion_stats


@dataclass
class Rollout:
    """ids [N, P + C] int32 (prompt left-padded, completion right-padded), valid [N, P + C] int32
    (real tokens), P, mask [N, C] float32, lengths [N] int32 (completion tokens, EOS included),
    truncated [N] bool (cut at C: the last token not an EOS, nor the pad id with `pad_ends`), the raw
    prompts and decoded completions (what the reward functions got), completion token lists,
    per_func [N, F] rewards (NaN: None), `rows` the prompts' indices in the split, the metrics and
    columns the functions logged (`log_metric`, `log_extra`)."""
    ids: np.ndarray
    valid: np.ndarray
    P: int
    mask: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray
    prompts: list
    completions: list
    completion_ids: list
    per_func: np.ndarray
    rows: list
    extra_metrics: dict
    extra_columns: dict = dataclasses.field(default_factory=dict)

    def extra(self, i: int) -> dict:
        """{"extra": {column: completion i's value}} of the columns the reward functions logged with
        `log_extra` (TRL's completions table has them), or {}; a value JSON cannot hold as its text."""
        if not self.extra_columns:
            return {}
        return {"extra": {c: _json_value(v[i]) for c, v in self.extra_columns.items()}}


def _json_value(v):
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return str(v)


def decode_options(pt, tok, eos_ids: list[int]) -> DecodeOptions:
    from jaxpref.generation.sampling import Sampling

    pad = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
    return DecodeOptions(max_new_tokens=pt.max_completion_length,
                         sampling=Sampling(temperature=pt.temperature, top_p=pt.top_p, top_k=pt.top_k,
                                           min_p=pt.min_p or 0.0, repetition_penalty=pt.repetition_penalty),
                         eos_ids=tuple(eos_ids), pad_id=pad)


def sample(generator, data: Prompts, idx: list[int], G: int, opts: DecodeOptions, lora, seed: int) -> tuple:
    """Prompts `idx`, each G times -> (rows, completion token lists, prompt ids left-padded [N, P],
    prompt lengths [N])."""
    rows = [i for i in idx for _ in range(G)]
    prompts = [data.prompt_ids[i] for i in rows]
    outs = generator.generate(prompts, opts, lora=lora, seed=seed)
    return rows, [o.ids for o in outs], prompts


def assemble(tok, data: Prompts, rows: list[int], prompts: list[list[int]], comps: list[list[int]],
             opts: DecodeOptions, funcs: list, state: rw.TrainerState, pad_ends: bool = False) -> Rollout:
    """Token lists -> padded arrays, decoded completions and their rewards. `pad_ends`: a
    completion whose last token is the pad id is not truncated (GRPOTrainer's and RLOOTrainer's
    rule; otherwise only an EOS ends one)."""
    n, C = len(rows), opts.max_new_tokens
    P = bucket(max(len(p) for p in prompts))
    ids = np.full((n, P + C), opts.pad_id, np.int32)
    valid = np.zeros((n, P + C), np.int32)
    mask = np.zeros((n, C), np.float32)
    for r, (p, c) in enumerate(zip(prompts, comps)):
        ids[r, P - len(p):P] = p
        ids[r, P:P + len(c)] = c
        valid[r, P - len(p):P + len(c)] = 1
        mask[r, :len(c)] = 1.0
    lengths = np.array([len(c) for c in comps], np.int32)
    truncated = truncated_mask(comps, list(opts.eos_ids), opts.pad_id if pad_ends else None)
    raw, columns = data.rows(rows)
    texts = decode_completions(tok, comps, data.conversational)
    scored = rw.score(funcs, raw, texts, comps, columns, state)
    return Rollout(ids, valid, P, mask, lengths, truncated, raw, texts, comps, scored.per_func, rows,
                   scored.extra_metrics, scored.extra_columns)


def completion_logps(bundle, params, lora, ids, valid, P: int, temperature: float, rngs=None):
    """Rows [B, P + C] -> (log-prob [B, C], entropy [B, C]) of the completion tokens under
    softmax(logits / temperature), float32; `lora=None`: the base model (adapter off)."""
    pos = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    hidden = bundle.hidden(params, lora, ids, pos, MaskInfo.rows(valid, pos), rngs=rngs)
    a = bundle.args
    return completion_stats(hidden[:, P - 1:-1], bundle.head(params), ids[:, P:], temperature, a.vocab_chunk,
                            a.matmul_precision, a.spec().final_logit_softcap)


def make_logps_fn(bundle, P_temperature: float):
    """Jitted no-gradient pass: (params, lora, ids, valid, P) -> log-probs [N, C]."""
    def f(params, lora, ids, valid, P):
        return completion_logps(bundle, params, lora, ids, valid, P, P_temperature)[0]
    return jax.jit(f, static_argnames=("P",))

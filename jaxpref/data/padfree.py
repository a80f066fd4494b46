"""Padding-free micro-batches (`training.padding_free`, as TRL's option of that name).

The rows of a micro-batch (one pair in `shared_prompt`, one sequence in `concatenated`, a
completion or KL row in KTO) are laid end to end in `streams` rows of L tokens, one stream per
data-parallel shard. The matmuls then run on real tokens only. Attention keeps each original row
to itself: every layer gathers a row's queries, keys and values into a block of Tb slots, applies
that row's own mask, and puts the outputs back (`layers.AttnBlocks`).

Tokens that nothing reads are left out of the stream: the last token of a sequence predicts
nothing that is scored and no later token attends to it. Its id is still a target (its
log-prob is predicted by the token before it), and it is still counted in TRL's token count.
"""
from __future__ import annotations

import numpy as np

from jaxpref.data.layouts import token_rows, trl_token_count


def _scored(b: dict, num_seqs: int) -> np.ndarray:
    """[U, Ku] bool: target slots in use (a completion token, or ORPO's span)."""
    return (b["tgt_seq"] < num_seqs) | (b["tgt_full"] > 0)


def dead_tokens(b: dict, num_seqs: int) -> np.ndarray:
    """[U, T] bool: real tokens of unit rows whose hidden state nothing uses. A key at p is
    attended by a later query q of its segment when p is shared (branch 0) or q is on p's
    branch (`step.attention_mask`); targets read the hidden state at their `tgt_src`."""
    seg, br = b["segment_ids"], b["branch"]
    U, T = seg.shape
    pos = np.broadcast_to(np.arange(T), (U, T))
    # Last position of each (row, segment) and each (row, segment, branch).
    key_any = np.arange(U)[:, None] * (T + 1) + seg
    key_br = key_any * 4 + br
    last_any = np.full(U * (T + 1), -1)
    last_br = np.full(U * (T + 1) * 4, -1)
    real = seg > 0
    np.maximum.at(last_any, key_any[real], pos[real])
    np.maximum.at(last_br, key_br[real], pos[real])
    attended = np.where(br == 0, last_any[key_any] > pos, last_br[key_br] > pos)
    src = np.zeros((U, T), bool)
    valid = _scored(b, num_seqs)
    rows = np.broadcast_to(np.arange(U)[:, None], valid.shape)
    src[rows[valid], b["tgt_src"][valid]] = True
    return real & ~attended & ~src


def stream_needs(units: list[tuple[int, int]], streams: int) -> tuple[int, int, int]:
    """Per-unit (live tokens, target slots) in unit order -> (L, K, Tb): the longest stream, its
    most target slots, and the longest unit. Stream r holds units [r*per, (r+1)*per)."""
    per = len(units) // streams
    groups = [units[r * per:(r + 1) * per] for r in range(streams)]
    return (max(sum(u[0] for u in g) for g in groups), max(max(sum(u[1] for u in g) for g in groups), 1),
            max(max(u[0] for u in units), 1))


def built_needs(b: dict, num_seqs: int, streams: int) -> tuple[int, int, int]:
    """(L, K, Tb) of a built unit micro-batch (after `compact_targets`)."""
    live = ((b["segment_ids"] > 0) & ~dead_tokens(b, num_seqs)).sum(axis=1)
    slots = _scored(b, num_seqs).sum(axis=1)
    return stream_needs([(int(a), int(k)) for a, k in zip(live, slots)], streams)


def to_stream(b: dict, num_seqs: int, streams: int, L: int, K: int, Tb: int, pad_id: int = 0,
              shared_prompt: bool = False, counted: int | None = None) -> dict:
    """A unit micro-batch with compacted targets ([U, T] token arrays, [U, Ku] `tgt_*`) -> the
    same tokens as `streams` rows of L, K target slots per row, and the attention blocks
    (`blk_idx` [R, U/R, Tb], `blk_back` [R, L]). `trl_tokens` [R] keeps TRL's token count
    (`shared_prompt`: the shared prompt counts once per completion; `counted`: only the first
    `counted` units count, as TRL counts KTO's completion rows and not its KL rows)."""
    U, T = b["input_ids"].shape
    R = streams
    per = U // R
    dead = dead_tokens(b, num_seqs)
    live = (b["segment_ids"] > 0) & ~dead
    out = {
        **token_rows(R, L, pad_id),
        "blk_idx": np.full((R, per, Tb), -1, np.int32),
        "blk_back": np.zeros((R, L), np.int32),
        "tgt_src": np.zeros((R, K), np.int32),
        "tgt_ids": np.zeros((R, K), np.int32),
        "tgt_seq": np.full((R, K), num_seqs, np.int32),
        "tgt_weight": np.zeros((R, K), np.float32),
        "tgt_full": np.zeros((R, K), np.float32),
        "trl_tokens": np.zeros((R,), np.int32),
    }
    where = np.full((U, T), -1, np.int64)  # unit position -> stream position
    valid = _scored(b, num_seqs)
    for r in range(R):
        off = koff = 0
        for j in range(per):
            u = r * per + j
            ps = np.flatnonzero(live[u])
            n = len(ps)
            if n > Tb or off + n > L:
                raise ValueError(f"padding-free stream of {L} tokens, blocks of {Tb}: unit needs {n} more "
                                 f"tokens after {off}")
            dst = off + np.arange(n)
            for key in ("input_ids", "positions", "segment_ids", "branch"):
                out[key][r, dst] = b[key][u, ps]
            out["blk_idx"][r, j, :n] = dst
            out["blk_back"][r, dst] = j * Tb + np.arange(n)
            where[u, ps] = dst
            off += n
            t = np.flatnonzero(valid[u])
            if koff + len(t) > K:
                raise ValueError(f"padding-free stream with {K} target slots: {koff + len(t)} needed")
            kd = koff + np.arange(len(t))
            src = where[u, b["tgt_src"][u, t]]
            assert (src >= 0).all(), "a target's predicting token was left out of the stream"
            out["tgt_src"][r, kd] = src
            for key in ("tgt_ids", "tgt_seq", "tgt_weight", "tgt_full"):
                out[key][r, kd] = b[key][u, t]
            koff += len(t)
        rows = slice(r * per, min((r + 1) * per, U if counted is None else counted))
        out["trl_tokens"][r] = trl_token_count(b["segment_ids"][rows], b["branch"][rows], shared_prompt)
    return out

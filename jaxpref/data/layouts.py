"""Token ids -> the token rows of one micro-batch, in every pair layout.

A batch describes its sequences token by token, so that one step function serves every layout:
- `concatenated`: rows prompt+chosen and prompt+rejected (TRL's layout);
- `shared_prompt`: one row [prompt | chosen | rejected]; the rejected branch continues the positions
  from the prompt's end and sees the prompt and itself only, so the prompt is computed once.

Per token (arrays [N, T]): `input_ids`, `positions`, `segment_ids` (0 = padding), `branch` (0 =
visible to the whole segment, 1/2 = chosen/rejected branch), `src` (row index of the hidden state
that predicts this token), `seq` (sequence slot of a completion token, S where none), `weight`
(LD-DPO weight of a completion token), `full` (1 on the chosen sequence's prompt+completion
tokens after its first: ORPO's NLL span; -1 on the unscored first completion token of a
sequence without prompt). Sequence slots: pair i's chosen is i, its rejected B+i.
`compact_targets` then gathers the scored tokens into `tgt_*` arrays [N, K], which is what the
step reads besides `input_ids`, `positions`, `segment_ids` and `branch`.
"""
from __future__ import annotations


import enum
from dataclasses import dataclass

import numpy as np

from jaxpref.data.lengths import truncate
from jaxpref.data.tokenize import Tokenized

# Padded lengths T: each distinct one is a compile. Steps of x1.5 / x1.33 waste at most a third of
# a row to padding (powers of two waste up to half) for about twice as many possible shapes.
DEFAULT_BUCKETS = (64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)



def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if length <= b:
            return b
    return int(-(-length // 64) * 64)


class PairLayout(enum.StrEnum):
    """How a pair's two sequences share rows (`training.pair_layout`)."""
    CONCATENATED = "concatenated"                  # two rows: prompt+chosen, prompt+rejected (TRL's)
    SHARED_PROMPT = "shared_prompt"                # one row [prompt | chosen | rejected], prompt once
    PACKED = "packed"                              # concatenated rows packed several to a row
    PACKED_SHARED_PROMPT = "packed_shared_prompt"  # shared-prompt rows packed several to a row

    @property
    def shares_prompt(self) -> bool:
        return self in (PairLayout.SHARED_PROMPT, PairLayout.PACKED_SHARED_PROMPT)

    @property
    def packed(self) -> bool:
        return self in (PairLayout.PACKED, PairLayout.PACKED_SHARED_PROMPT)


@dataclass(frozen=True)
class Layout:
    kind: PairLayout = PairLayout.CONCATENATED
    max_length: int | None = 1024
    truncation_mode: str = "keep_start"
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    pad_id: int = 0
    ld_alpha: float | None = None
    # packed / packed_shared_prompt: rows of this many tokens hold several sequences / pairs.
    pack_length: int | None = None
    # Mark the chosen sequence's prompt tokens too (ORPO's NLL span); otherwise the LM head runs
    # on completion tokens only.
    full_span: bool = True
    target_buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
    # Padding-free micro-batches (`jaxpref.padfree`): the rows laid end to end in `streams` rows
    # (one per data-parallel shard), attention kept per original row.
    padding_free: bool = False
    streams: int = 1
    # `training.max_tokens_per_batch`: a step's pairs packed into micro-batches of at most this
    # many stream tokens (`jaxpref.data.budget`); None: G micro-batches of B pairs.
    max_tokens: int | None = None
    # KTO's KL rows, in data order (unshuffled: evaluation, sequential training): example i takes the
    # completion of example i-1 within consecutive groups of this many examples, as TRL rotates the
    # completions over per_device_train_batch_size before batching (its eval batches too; on a mesh
    # the global micro-batch, `training.assemble`); None, or shuffled: within the micro-batch
    # (`jaxpref.data.unpaired`).
    kl_group: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "kind", PairLayout(self.kind))  # accepts the config's string


def token_rows(n: int, t: int, pad_id: int) -> dict:
    """The arrays the model reads per token, [n, t], all padding."""
    return {
        "input_ids": np.full((n, t), pad_id, np.int32),
        "positions": np.zeros((n, t), np.int32),
        "segment_ids": np.zeros((n, t), np.int32),
        "branch": np.zeros((n, t), np.int32),
    }


def trl_token_count(segment_ids: np.ndarray, branch: np.ndarray, shared_prompt: bool) -> int:
    """Tokens in TRL's accounting: every real token, a shared prompt (branch 0 of a shared-prompt
    row) once per completion."""
    seg = segment_ids > 0
    return int(seg.sum() + ((seg & (branch == 0)).sum() if shared_prompt else 0))


def _empty(n: int, t: int, s: int, pad_id: int) -> dict:
    return {
        **token_rows(n, t, pad_id),
        "src": np.zeros((n, t), np.int32),
        "seq": np.full((n, t), s, np.int32),
        "weight": np.zeros((n, t), np.float32),
        "full": np.zeros((n, t), np.float32),
    }


def _ld_weights(n_comp: int, shared: int, ld_alpha: float | None) -> np.ndarray:
    w = np.ones(n_comp, np.float32)
    if ld_alpha is not None:
        w[shared:] = ld_alpha
    return w


def _place(b: dict, row: int, start: int, ids: list[int], n_prompt: int, *, slot: int,
           segment: int, branch_of_completion: int, pos0: int, src_of_first: int | None,
           weights: np.ndarray, full: bool) -> None:
    """Write one sequence (prompt part already counted in n_prompt) at [row, start:]."""
    t = len(ids)
    sl = slice(start, start + t)
    b["input_ids"][row, sl] = ids
    b["positions"][row, sl] = pos0 + np.arange(t)
    b["segment_ids"][row, sl] = segment
    idx = start + np.arange(t)
    src = idx - 1
    comp = np.arange(t) >= n_prompt
    # A completion token needs a predictor: the first token of a sequence without a prompt has
    # none (as in TRL, where the labels are shifted by one), so it is not scored. It stays a
    # target of its slot marked `full` -1 (its own hidden state, weight 0): TRL's completion
    # lengths count it (ipo, sigmoid_norm).
    lead = src_of_first is None and t > 0 and comp[0]
    if src_of_first is not None and t > 0:
        src[0] = src_of_first
    elif lead:
        src[0] = start
    b["src"][row, sl] = np.maximum(src, 0)
    br = np.where(comp, branch_of_completion, 0)
    b["branch"][row, sl] = br
    seq = np.where(comp, slot, b["seq"][row, sl])
    b["seq"][row, sl] = seq
    scored = comp.copy()
    scored[:1] &= not lead
    wt = np.zeros(t, np.float32)
    wt[scored] = weights[: int(scored.sum())]   # `weights`: one per scored completion token
    b["weight"][row, sl] = np.where(seq == slot, wt, 0)
    if full:
        # ORPO's span: the chosen sequence's tokens, marked with their pair's slot + 1 so that
        # packed rows (several pairs) still sum per pair.
        f = np.full(t, slot + 1, np.float32)
        if src_of_first is None:
            f[0] = 0
        b["full"][row, sl] = f
    if lead:
        b["full"][row, start] = -1


def _scored(ids: list[int], n_prompt: int) -> int:
    """Completion tokens of a sequence that are scored: all but a first token at position 0 (a
    sequence without prompt), which nothing predicts."""
    return len(ids) - n_prompt - int(n_prompt == 0 and len(ids) > 0)


def _pair_sequences(data: Tokenized, i: int, layout: Layout):
    """Pair i truncated -> (chosen ids, its prompt length, rejected ids, its prompt length,
    whether both keep the same prompt). keep_end can cut the two prompts differently, and TRL's
    ORPO/CPO tokenization can leave the two branches prompts one token apart (`prompt_extras`)."""
    xc, xr = data.prompt_extras(i)
    p, c, r = data.prompt[i], data.chosen[i], data.rejected[i]
    pc, npc = truncate(p + c[:xc], c[xc:], layout.max_length, layout.truncation_mode)
    pr, npr = truncate(p + r[:xr], r[xr:], layout.max_length, layout.truncation_mode)
    return pc, npc, pr, npr, npc == npr and pc[:npc] == pr[:npr]


def _row_length(pc, npc, pr, npr, same_prompt: bool, kind: PairLayout) -> int:
    """Tokens one pair needs in its row (shared_prompt) or in its longer row (concatenated)."""
    if kind.shares_prompt:
        return len(pc) + len(pr) - (npr if same_prompt else 0)
    return max(len(pc), len(pr))


def make_pair_batch(data: Tokenized, idx: np.ndarray, layout: Layout, length: int | None = None) -> dict:
    """Pairs `idx` -> a batch in the layout; `length` forces the padded length T.

    shared_prompt: row k holds pair k as [prompt | chosen | rejected], the rejected branch seeing
    the prompt and itself. A pair whose truncated prompts differ (keep_end) takes the same row as
    two segments [prompt_c chosen][prompt_r rejected] instead, so every pair still fits one row."""
    B = len(idx)
    S = 2 * B
    seqs = [_pair_sequences(data, i, layout) for i in idx]
    need = max(_row_length(*q, layout.kind) for q in seqs)
    T = length or bucket_for(need, layout.buckets)
    if T < need:
        raise ValueError(f"batch length {T} < {need} tokens needed")
    if layout.kind.shares_prompt:
        b = _empty(B, T, S, layout.pad_id)
        for k, (pc, npc, pr, npr, same) in enumerate(seqs):
            # LD-DPO's shared length counts scored tokens, as TRL's shifted completion mask
            shared = min(_scored(pc, npc), _scored(pr, npr))
            _place(b, k, 0, pc, npc, slot=k, segment=1, branch_of_completion=1, pos0=0,
                   src_of_first=None, weights=_ld_weights(_scored(pc, npc), shared, layout.ld_alpha),
                   full=layout.full_span)
            w_r = _ld_weights(_scored(pr, npr), shared, layout.ld_alpha)
            if same:
                # The rejected branch continues from the prompt: its first token is predicted by
                # the last prompt token, and its positions follow the prompt's.
                _place(b, k, len(pc), pr[npr:], 0, slot=B + k, segment=1, branch_of_completion=2,
                       pos0=npr, src_of_first=npr - 1 if npr > 0 else None, weights=w_r, full=False)
            else:
                _place(b, k, len(pc), pr, npr, slot=B + k, segment=2, branch_of_completion=0,
                       pos0=0, src_of_first=None, weights=w_r, full=False)
                # Nothing is shared, so no token is branch 0 (segments already separate the two
                # sequences); token counts that add branch-0 tokens twice stay exact.
                b["branch"][k, :len(pc)] = 1
                b["branch"][k, len(pc):len(pc) + len(pr)] = 2
    else:
        b = _empty(2 * B, T, S, layout.pad_id)
        for k, (pc, npc, pr, npr, _) in enumerate(seqs):
            shared = min(_scored(pc, npc), _scored(pr, npr))
            _place(b, k, 0, pc, npc, slot=k, segment=1, branch_of_completion=0, pos0=0,
                   src_of_first=None, weights=_ld_weights(_scored(pc, npc), shared, layout.ld_alpha),
                   full=layout.full_span)
            _place(b, B + k, 0, pr, npr, slot=B + k, segment=1, branch_of_completion=0, pos0=0,
                   src_of_first=None, weights=_ld_weights(_scored(pr, npr), shared, layout.ld_alpha), full=False)
    return b


ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def pack_rows(b: dict, length: int, num_seqs: int, pad_id: int = 0, min_rows: int = 0,
              row_buckets=ROW_BUCKETS) -> dict:
    """Pack the rows of an unpacked batch (one sequence or one shared-prompt pair each) into fewer
    rows of `length` tokens, first-fit by decreasing length. Segments stay separate (the attention
    mask is block-diagonal), positions and predictors move with their tokens: the same log-probs,
    padding-free up to the row's end."""
    used = (b["segment_ids"] > 0).sum(axis=1)
    order = np.argsort(-used, kind="stable")
    fill: list[int] = []
    where: dict[int, tuple[int, int]] = {}
    for r in order:
        n = int(used[r])
        if n == 0:
            continue
        if n > length:
            raise ValueError(f"a sequence of {n} tokens does not fit packed rows of {length}")
        for k, f in enumerate(fill):
            if f + n <= length:
                where[r] = (k, f)
                fill[k] += n
                break
        else:
            where[r] = (len(fill), 0)
            fill.append(n)
    rows = max(bucket_for(max(len(fill), 1), row_buckets), min_rows)
    out = _empty(rows, length, num_seqs, pad_id)
    seg_next = np.ones(rows, np.int32)
    for r, (k, off) in where.items():
        n = int(used[r])
        sl, dst = slice(0, n), slice(off, off + n)
        for key in ("input_ids", "positions", "branch", "seq", "weight", "full"):
            out[key][k, dst] = b[key][r, sl]
        segs = b["segment_ids"][r, sl]
        out["segment_ids"][k, dst] = segs + seg_next[k] - 1
        seg_next[k] += int(segs.max())
        out["src"][k, dst] = b["src"][r, sl] + off
    return out


def compact_targets(b: dict, num_seqs: int, k: int | None = None, buckets=(32, 64, 128, 256, 512, 1024)) -> dict:
    """Gather the tokens whose log-prob the loss reads (completion tokens, and ORPO's span) into
    `tgt_*` arrays [N, K], so the LM head runs on K positions per row instead of T."""
    need = (b["seq"] < num_seqs) | (b["full"] > 0)
    counts = need.sum(axis=1)
    if k is None:
        k = bucket_for(max(int(counts.max()), 1), buckets)
    n = need.shape[0]
    idx = np.zeros((n, k), np.int64)
    valid = np.zeros((n, k), bool)
    for r in range(n):
        pos = np.flatnonzero(need[r])
        idx[r, :len(pos)] = pos
        valid[r, :len(pos)] = True
    take = lambda a: np.take_along_axis(a, idx, axis=1)
    out = {key: b[key] for key in ("input_ids", "positions", "segment_ids", "branch")}
    out["tgt_src"] = take(b["src"]).astype(np.int32)
    out["tgt_ids"] = take(b["input_ids"]).astype(np.int32)
    out["tgt_seq"] = np.where(valid, take(b["seq"]), num_seqs).astype(np.int32)
    out["tgt_weight"] = np.where(valid, take(b["weight"]), 0).astype(np.float32)
    out["tgt_full"] = np.where(valid, take(b["full"]), 0).astype(np.float32)
    return out



# Per-micro-batch arrays that are not token rows (KTO's labels): carried past target compaction
# and padding-free packing unchanged.
_EXTRA = ("kto_label",)


def _with_extra(p: dict, f) -> dict:
    extra = {k: p[k] for k in _EXTRA if k in p}
    out = f({k: v for k, v in p.items() if k not in extra})
    out.update(extra)
    return out

"""Token ids -> fixed-shape batches, in a deterministic order whose position is a small state.

A batch describes its sequences token by token, so that one step function serves every layout:
- `concatenated`: rows prompt+chosen and prompt+rejected (TRL's layout);
- `shared_prompt`: one row [prompt | chosen | rejected]; the rejected branch continues the positions
  from the prompt's end and sees the prompt and itself only, so the prompt is computed once.

Per token (arrays [N, T]): `input_ids`, `positions`, `segment_ids` (0 = padding), `branch` (0 =
visible to the whole segment, 1/2 = chosen/rejected branch), `src` (row index of the hidden state
that predicts this token), `seq` (sequence slot of a completion token, S where none), `weight`
(LD-DPO weight of a completion token), `full` (1 on the chosen sequence's prompt+completion
tokens after its first: ORPO's NLL span). Sequence slots: pair i's chosen is i, its rejected B+i.
`compact_targets` then gathers the scored tokens into `tgt_*` arrays [N, K], which is what the
step reads besides `input_ids`, `positions`, `segment_ids` and `branch`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from jaxpref.data import Tokenized

# Padded lengths T: each distinct one is a compile. Steps of x1.5 / x1.33 waste at most a third of
# a row to padding (powers of two waste up to half) for about twice as many possible shapes.
DEFAULT_BUCKETS = (64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


@dataclass
class LengthReport:
    truncated: int
    dropped: int
    kept: int


def apply_lengths(data: Tokenized, max_length: int | None, max_prompt_length: int | None,
                  truncation_mode: str) -> tuple[Tokenized, LengthReport]:
    """Prompt-length cap (keeps the prompt's end), then per-sequence truncation to max_length;
    rows whose prompt alone fills max_length are dropped (keep_start would leave no completion)."""
    keep, truncated = [], 0
    for i, p in enumerate(data.prompt):
        if max_prompt_length is not None and len(p) > max_prompt_length:
            data.prompt[i] = p = p[-max_prompt_length:]
        comps = [data.chosen[i], data.rejected[i]] if data.paired else [data.completion[i]]
        if max_length is not None:
            extra = max(data.prompt_extras(i)) if data.paired else 0
            if truncation_mode == "keep_start" and len(p) + extra >= max_length:
                continue
            if any(len(p) + len(c) > max_length for c in comps):
                truncated += 1
        keep.append(i)
    out = data.subset(np.asarray(keep, dtype=np.int64)) if len(keep) != len(data) else data
    out.rows_in = data.rows_in
    out.skipped = dict(data.skipped)
    dropped = len(data) - len(keep)
    if dropped:
        out.skipped["prompt fills max_length"] = dropped
    return out, LengthReport(truncated, dropped, len(keep))


def _truncate(prompt: list[int], comp: list[int], max_length: int | None, mode: str):
    """-> (tokens, number of leading prompt tokens) after truncating prompt+completion."""
    ids = prompt + comp
    n_prompt = len(prompt)
    if max_length is not None and len(ids) > max_length:
        if mode == "keep_start":
            ids = ids[:max_length]
            n_prompt = min(n_prompt, max_length)
        else:
            cut = len(ids) - max_length
            ids = ids[cut:]
            n_prompt = max(n_prompt - cut, 0)
    return ids, n_prompt


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if length <= b:
            return b
    return int(-(-length // 64) * 64)


@dataclass(frozen=True)
class Layout:
    kind: str = "concatenated"
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
    if src_of_first is not None and t > 0:
        src[0] = src_of_first
    b["src"][row, sl] = np.maximum(src, 0)
    comp = np.arange(t) >= n_prompt
    br = np.where(comp, branch_of_completion, 0)
    b["branch"][row, sl] = br
    seq = np.where(comp, slot, b["seq"][row, sl])
    # A completion token needs a predictor: the first token of a sequence without a prompt has
    # none (as in TRL, where the labels are shifted by one), so it is not scored.
    if src_of_first is None and t > 0 and comp[0]:
        seq[0] = b["seq"][row, start]
    b["seq"][row, sl] = seq
    wt = np.zeros(t, np.float32)
    wt[comp] = weights[: int(comp.sum())]
    b["weight"][row, sl] = np.where(seq == slot, wt, 0)
    if full:
        # ORPO's span: the chosen sequence's tokens, marked with their pair's slot + 1 so that
        # packed rows (several pairs) still sum per pair.
        f = np.full(t, slot + 1, np.float32)
        if src_of_first is None:
            f[0] = 0
        b["full"][row, sl] = f


def _pair_sequences(data: Tokenized, i: int, layout: Layout):
    """Pair i truncated -> (chosen ids, its prompt length, rejected ids, its prompt length,
    whether both keep the same prompt). keep_end can cut the two prompts differently, and TRL's
    ORPO/CPO tokenization can leave the two branches prompts one token apart (`prompt_extras`)."""
    xc, xr = data.prompt_extras(i)
    p, c, r = data.prompt[i], data.chosen[i], data.rejected[i]
    pc, npc = _truncate(p + c[:xc], c[xc:], layout.max_length, layout.truncation_mode)
    pr, npr = _truncate(p + r[:xr], r[xr:], layout.max_length, layout.truncation_mode)
    return pc, npc, pr, npr, npc == npr and pc[:npc] == pr[:npr]


def _row_length(pc, npc, pr, npr, same_prompt: bool, kind: str) -> int:
    """Tokens one pair needs in its row (shared_prompt) or in its longer row (concatenated)."""
    if "shared_prompt" in kind:
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
    if "shared_prompt" in layout.kind:
        b = _empty(B, T, S, layout.pad_id)
        for k, (pc, npc, pr, npr, same) in enumerate(seqs):
            shared = min(len(pc) - npc, len(pr) - npr)
            _place(b, k, 0, pc, npc, slot=k, segment=1, branch_of_completion=1, pos0=0,
                   src_of_first=None, weights=_ld_weights(len(pc) - npc, shared, layout.ld_alpha), full=layout.full_span)
            w_r = _ld_weights(len(pr) - npr, shared, layout.ld_alpha)
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
            shared = min(len(pc) - npc, len(pr) - npr)
            _place(b, k, 0, pc, npc, slot=k, segment=1, branch_of_completion=0, pos0=0,
                   src_of_first=None, weights=_ld_weights(len(pc) - npc, shared, layout.ld_alpha), full=layout.full_span)
            _place(b, B + k, 0, pr, npr, slot=B + k, segment=1, branch_of_completion=0, pos0=0,
                   src_of_first=None, weights=_ld_weights(len(pr) - npr, shared, layout.ld_alpha), full=False)
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


def shape_key(batch: dict) -> tuple:
    """What one compilation of the step is for: [G, rows, T] tokens, K target slots, and the
    padding-free attention blocks [per row, Tb] when present."""
    key = tuple(batch["input_ids"].shape) + tuple(batch["tgt_ids"].shape[-1:])
    return key + tuple(batch["blk_idx"].shape[-2:]) if "blk_idx" in batch else key


def round_up(n: int, multiple: int) -> int:
    return int(-(-n // multiple) * multiple)


def choose_shapes(needs: dict[tuple, int], cover: tuple, cost, max_shapes: int,
                  new_shape_steps: float = 2.0) -> tuple[tuple, ...]:
    """At most `max_shapes` padded shapes for steps whose needs are `needs` ({shape: count}); a
    shape holds a need when it is at least as large in every dimension ((T, K), or (L, K, Tb)
    padding-free).

    `cover` (the largest need any step can have) is always a shape, so no step is left without
    one. Shapes are added greedily, each time the one that cuts the summed `cost(*shape)` of all
    steps most; a shape that saves less than `new_shape_steps` steps of the largest shape (what one
    more compilation roughly costs) is not added."""
    shapes = [tuple(cover)]
    dims = len(cover)
    values = [sorted({n[d] for n in needs} | {cover[d]}) for d in range(dims)]
    fits = lambda s, n: all(a >= b for a, b in zip(s, n))
    if np.prod([len(v) for v in values]) <= 4096:
        cands = [c for c in itertools.product(*values) if fits(cover, c)]
    else:  # many distinct values: the needs themselves
        cands = sorted(set(needs) | {tuple(cover)})

    def total(shs):
        return sum(n * min(cost(*s) for s in shs if fits(s, need)) for need, n in needs.items())

    current = total(shapes)
    while len(shapes) < max_shapes:
        best, best_cost = None, current
        for c in cands:
            if c in shapes:
                continue
            v = total(shapes + [c])
            if v < best_cost:
                best, best_cost = c, v
        if best is None or current - best_cost < new_shape_steps * cost(*cover):
            break
        shapes.append(best)
        current = best_cost
    return tuple(sorted(shapes))


class BatchIterator:
    """Deterministic batches: epoch e visits a permutation drawn from (seed, e); the position is
    (epoch, index) and restoring it yields exactly the batches an uninterrupted run would.

    Each step takes `accum` micro-batches of `batch_size` pairs, padded to one shape: the padded
    length T and the LM-head target slots per row K. Without a plan, T comes from the layout's
    length buckets and K from its target buckets; `plan_shapes` instead picks at most a few
    shapes fitted to the run's own steps. The remainder of an epoch that does not fill a step is
    skipped (a different remainder each epoch)."""

    # Planned shapes are multiples of this (vector width friendly, fewer distinct candidates).
    ALIGN = 8

    def __init__(self, data: Tokenized, batch_size: int, accum: int, seed: int, layout: Layout,
                 shuffle: bool = True):
        self.data, self.B, self.G, self.seed, self.layout = data, batch_size, accum, seed, layout
        self.shuffle = shuffle
        self.epoch, self.index = 0, 0
        self.steps_per_epoch = len(data) // (batch_size * accum)
        self.shapes: tuple[tuple[int, int], ...] | None = None
        self._cost = None

    def state(self) -> dict:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.data)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def __iter__(self):
        return self

    def _advance(self, epoch: int, index: int) -> tuple[np.ndarray, int, int]:
        per_step = self.B * self.G
        if index + per_step > len(self.data):
            epoch, index = epoch + 1, 0
        return self.order(epoch)[index:index + per_step], epoch, index + per_step

    def __next__(self) -> tuple[dict, float]:
        if self.steps_per_epoch == 0:
            raise StopIteration
        idx, self.epoch, self.index = self._advance(self.epoch, self.index)
        progress = self.epoch + self.index / (self.steps_per_epoch * self.B * self.G)
        return self.make(idx), progress

    # --- shapes -----------------------------------------------------------------------------

    def _micro(self, idx: np.ndarray) -> list[np.ndarray]:
        return [idx[g * self.B:(g + 1) * self.B] for g in range(self.G)]

    def _parts(self, micro: list[np.ndarray], T: int) -> list[dict]:
        """Unpacked micro-batches of length T (before the targets are gathered)."""
        return [make_pair_batch(self.data, m, self.layout, T) for m in micro]

    def _pair_need(self, i: int) -> tuple[int, int]:
        """(tokens, scored tokens) of pair i's row, or of its longer row (concatenated). Scored
        tokens are at most the completion tokens, or with ORPO's span the chosen sequence's."""
        pc, npc, pr, npr, same = _pair_sequences(self.data, i, self.layout)
        k_c = len(pc) if self.layout.full_span else len(pc) - npc
        k_r = len(pr) - npr
        shared = "shared_prompt" in self.layout.kind
        return (_row_length(pc, npc, pr, npr, same, self.layout.kind),
                k_c + k_r if shared else max(k_c, k_r))

    def _unit_needs(self, m: np.ndarray) -> list[tuple[int, int]]:
        """(live tokens, scored tokens) of each row of micro-batch `m`, in row order, when laid out
        padding-free: a sequence's last token is left out (`padfree.dead_tokens`), so live is at
        most the row's length minus one per sequence that ends in it."""
        shared = "shared_prompt" in self.layout.kind
        first, second = [], []
        for i in m:
            pc, npc, pr, npr, same = _pair_sequences(self.data, int(i), self.layout)
            k_c = len(pc) if self.layout.full_span else len(pc) - npc
            k_r = len(pr) - npr
            if shared:
                # Same prompt: the chosen and rejected branches each end in a dead token when
                # non-empty (an empty branch leaves the prompt's last token attended). Different
                # prompts: two separate sequences.
                dead = (len(pc) > npc) + (len(pr) > npr) if same else (len(pc) > 0) + (len(pr) > 0)
                first.append((_row_length(pc, npc, pr, npr, same, self.layout.kind) - dead, k_c + k_r))
            else:
                first.append((len(pc) - (len(pc) > 0), k_c))
                second.append((len(pr) - (len(pr) > 0), k_r))
        return first + second

    def _needs(self, micro: list[np.ndarray]) -> tuple:
        """The shape these micro-batches need: (T, K) per row (K: an upper bound), or padding-free
        (L, K, Tb) per stream (`padfree.stream_needs`)."""
        if self.layout.padding_free:
            from jaxpref.padfree import stream_needs
            per = [stream_needs(self._unit_needs(m), self.layout.streams) for m in micro]
            return tuple(max(p[d] for p in per) for d in range(3))
        needs = [self._pair_need(int(i)) for m in micro for i in m]
        return max(t for t, _ in needs), max(max(k for _, k in needs), 1)

    def _row_cover(self) -> tuple[int, int]:
        """The largest (T, K) any row can need: rows do not depend on how pairs are grouped."""
        needs = [self._pair_need(int(i)) for i in range(len(self.data))]
        return max(t for t, _ in needs), max(max(k for _, k in needs), 1)

    def _cover(self) -> tuple:
        """The largest need any step can have (padding-free: a bound, every stream's rows at the
        longest row)."""
        t, k = self._row_cover()
        if not self.layout.padding_free:
            return t, k
        per = self.units_per_stream()
        return per * t, per * k, t

    def _units(self) -> int:
        """Rows per micro-batch before any packing."""
        return self.B if "shared_prompt" in self.layout.kind else 2 * self.B

    def units_per_stream(self) -> int:
        """Padding-free: rows (attention blocks) per stream."""
        return self._units() // self.layout.streams

    def _target_need(self, parts: list[dict]) -> int:
        """Scored tokens of the fullest row of built (possibly packed) micro-batches."""
        S = 2 * self.B
        return max(int(((p["seq"] < S) | (p["full"] > 0)).sum(axis=1).max()) for p in parts)

    def plannable(self) -> bool:
        return not self.layout.kind.startswith("packed")

    def plan_shapes(self, steps: int, cost, max_shapes: int = 4, sample_steps: int = 2000,
                    align: int | None = None) -> tuple:
        """Fit at most `max_shapes` batch shapes to the first `steps` steps of this iterator's
        order (at most `sample_steps` of them are looked at; every step is covered anyway).
        `cost(*shape)` is the relative cost of one step of that shape. Deterministic: a resumed
        run plans the same shapes."""
        if not self.plannable() or self.steps_per_epoch == 0:
            return ()
        a = align or self.ALIGN
        self._cost = cost
        needs: dict[tuple, int] = {}
        epoch, index = 0, 0
        for _ in range(min(steps, sample_steps)):
            idx, epoch, index = self._advance(epoch, index)
            key = tuple(round_up(x, a) for x in self._needs(self._micro(idx)))
            needs[key] = needs.get(key, 0) + 1
        if steps <= sample_steps:
            # Every step was looked at: the largest need is the cover.
            cover = tuple(max(n[d] for n in needs) for d in range(len(next(iter(needs)))))
        else:
            cover = tuple(round_up(x, a) for x in self._cover())
        self.shapes = choose_shapes(needs, cover, cost, max_shapes)
        return self.shapes

    def _shape(self, need: tuple) -> tuple | None:
        """The cheapest planned shape that holds `need`, or None."""
        fits = [s for s in self.shapes or () if all(a >= b for a, b in zip(s, need))]
        if fits:
            return min(fits, key=lambda s: (self._cost(*s), s))
        return None

    def make(self, idx: np.ndarray) -> dict:
        micro = self._micro(idx)
        S = 2 * self.B
        if self.layout.padding_free:
            shape = self._shape(self._needs(micro)) if self.shapes else None
            return self._stack(self._make_padding_free(micro, shape))
        need = self._needs(micro)
        shape = self._shape(need)
        T, K = shape if shape is not None else (bucket_for(need[0], self.layout.buckets), None)
        parts = self._parts(micro, T)
        if self.layout.kind.startswith("packed"):
            L = self.layout.pack_length or T
            packed = [pack_rows(p, max(L, T), S, self.layout.pad_id) for p in parts]
            rows = max(p["input_ids"].shape[0] for p in packed)
            parts = [pack_rows(p, max(L, T), S, self.layout.pad_id, rows) for p in parts]
        if K is None:
            K = min(bucket_for(max(self._target_need(parts), 1), self.layout.target_buckets),
                    parts[0]["input_ids"].shape[1])
        return self._stack([_with_extra(p, lambda q: compact_targets(q, S, K)) for p in parts])

    def _make_padding_free(self, micro: list[np.ndarray], shape: tuple | None) -> list[dict]:
        from jaxpref.padfree import built_needs, to_stream
        S, lay = 2 * self.B, self.layout
        units = [_with_extra(p, lambda q: compact_targets(q, S)) for p in self._parts(micro, None)]
        if shape is None:
            need = [built_needs(u, S, lay.streams) for u in units]
            L, K, Tb = (max(n[d] for n in need) for d in range(3))
            shape = (bucket_for(L, lay.buckets), bucket_for(K, lay.target_buckets), bucket_for(Tb, lay.buckets))
        L, K, Tb = shape
        return [_with_extra(u, lambda q: to_stream(q, S, lay.streams, L, K, Tb, lay.pad_id,
                                                   "shared_prompt" in lay.kind)) for u in units]

    @staticmethod
    def _stack(parts: list[dict]) -> dict:
        return {k: np.stack([p[k] for p in parts]) for k in parts[0]}


# Per-micro-batch arrays that are not token rows (KTO's labels): carried past target compaction
# and padding-free packing unchanged.
_EXTRA = ("kto_label",)


def _with_extra(p: dict, f) -> dict:
    extra = {k: p[k] for k in _EXTRA if k in p}
    out = f({k: v for k, v in p.items() if k not in extra})
    out.update(extra)
    return out

"""Micro-batches filled to a token budget (`training.max_tokens_per_batch`).

An optimizer step covers the same pairs as without the key: `B x G` pairs in the same order, in G
groups of B (the micro-batches the step would otherwise have). Only how they are cut changes:
the step's pairs are packed, first fit by decreasing size, into as few padding-free micro-batches
of at most `max_tokens` stream tokens as hold them (`padfree`: a shared prompt once, each
sequence's last token left out). A pair is never split.

The loss stays the mean over each group, averaged over the G groups (an epoch's last step: the
groups its pairs fill, the last one shorter). Each packed micro-batch carries per pair slot
`pair_w` (1/B for a pair, 1/b in a last group of b, 0 for an empty slot) and its group's token
totals `ntok_c` (chosen completion tokens) and `ntok_full` (ORPO's span), so that a pair mean
and a token mean over a group become sums of per-pair shares (`objectives.losses.Reduce`) and add
up over the micro-batches to what the G groups would give. Losses that compare the pairs of a
micro-batch with each other (aot's sorting, the KL estimates of KTO and kto_pair) cannot be cut
this way and are refused (`config.validate`).

Shapes: every packed micro-batch of a step is one stream of L <= `max_tokens` tokens with K target
slots, Ub attention blocks of Tb slots and Bp pair slots; a step holds P of them (empty ones are
skipped by the step). The micro-batches of a step are filled evenly (the P that first fit needs,
largest pair first into the emptiest), so that L, the fullest one's tokens, wastes little on the
others: every stream slot is computed, filled or not. (P, L, K, Ub, Tb, Bp) are the largest the
run's first steps need, so a run usually compiles one shape; a later step that needs more grows
them (another compilation).
"""
from __future__ import annotations

import numpy as np

from jaxpref.data.batches import StreamBatch, stack
from jaxpref.data.iterator import BatchIterator
from jaxpref.data.layouts import compact_targets, make_pair_batch, token_rows
from jaxpref.data.padfree import to_stream
from jaxpref.data.shapes import round_up


def first_fit(sizes: list[int], capacity: int) -> list[list[int]]:
    """Items (by size) -> bins of at most `capacity`, first fit by decreasing size (ties in item
    order); each bin lists its items in item order. Deterministic."""
    order = sorted(range(len(sizes)), key=lambda j: -sizes[j])
    bins: list[list[int]] = []
    fill: list[int] = []
    for j in order:
        for b, f in enumerate(fill):
            if f + sizes[j] <= capacity:
                bins[b].append(j)
                fill[b] += sizes[j]
                break
        else:
            bins.append([j])
            fill.append(sizes[j])
    return [sorted(b) for b in bins]


def balanced(sizes: list[int], bins: int, capacity: int) -> list[list[int]] | None:
    """Items -> `bins` bins filled evenly (largest first into the emptiest bin), each listing its
    items in item order; None when that overfills a bin."""
    fill = [0] * bins
    out: list[list[int]] = [[] for _ in range(bins)]
    for j in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        b = min(range(bins), key=lambda k: (fill[k], k))
        if fill[b] + sizes[j] > capacity:
            return None
        out[b].append(j)
        fill[b] += sizes[j]
    return [sorted(b) for b in out if b]


class BudgetIterator(BatchIterator):
    """`BatchIterator`'s order and steps, each step cut into packed micro-batches of at most
    `layout.max_tokens` stream tokens. Batches are `StreamBatch`es of [P, 1, L] tokens."""

    def __init__(self, data, batch_size: int, accum: int, seed: int, layout, shuffle: bool = True,
                 last_short: bool = False):
        super().__init__(data, batch_size, accum, seed, layout, shuffle, last_short)
        self.budget = int(layout.max_tokens)
        self._unit_cache: dict[int, list[tuple[int, int]]] = {}
        self.plan: tuple | None = None   # (P, L, K, Ub, Tb, Bp)

    # --- sizes ------------------------------------------------------------------------------

    def units(self, i: int) -> list[tuple[int, int]]:
        """Pair i's padding-free rows: (live tokens, scored tokens) each (`_unit_needs`)."""
        if i not in self._unit_cache:
            self._unit_cache[i] = self._unit_needs(np.array([i]))
        return self._unit_cache[i]

    def pair_tokens(self, i: int) -> int:
        return sum(u[0] for u in self.units(i))

    def longest_pair(self) -> int:
        """Stream tokens of the dataset's longest pair (what the budget must hold)."""
        return max((self.pair_tokens(i) for i in range(len(self.data))), default=0)

    def cut(self, idx: np.ndarray) -> list[list[int]]:
        """A step's pairs (positions in `idx`) -> its packed micro-batches: as few as first fit
        needs, filled evenly when they can be (so that the stream length L, the fullest one's
        tokens, wastes little on the others)."""
        sizes = [self.pair_tokens(int(i)) for i in idx]
        bins = first_fit(sizes, self.budget)
        return balanced(sizes, len(bins), self.budget) or bins

    def _step_need(self, idx: np.ndarray) -> tuple:
        """(P, L, K, Ub, Tb, Bp) of one step; L, K and Tb rounded up to multiples of ALIGN (L at
        most the budget)."""
        bins = self.cut(idx)
        units = [[u for j in b for u in self.units(int(idx[j]))] for b in bins]
        a = self.ALIGN
        fill = max(sum(u[0] for u in us) for us in units)
        return (len(bins), min(round_up(fill, a), self.budget),
                round_up(max(max(sum(u[1] for u in us), 1) for us in units), a),
                max(len(us) for us in units), round_up(max(u[0] for us in units for u in us), a),
                max(len(b) for b in bins))

    # --- shapes -----------------------------------------------------------------------------

    def plannable(self) -> bool:
        return True

    def plan_shapes(self, steps: int, cost=None, max_shapes: int = 1, sample_steps: int = 2000,
                    align: int | None = None) -> tuple:
        """One shape for the first `steps` steps (at most `sample_steps` looked at): the largest
        each dimension needs. `cost` and `max_shapes` are not used (the budget bounds L)."""
        if self.steps_per_epoch == 0:
            return ()
        epoch, index = 0, 0
        need = None
        for _ in range(min(steps, sample_steps)):
            idx, epoch, index = self._advance(epoch, index)
            n = self._step_need(idx)
            need = n if need is None else tuple(max(a, b) for a, b in zip(need, n))
        self.plan = need
        self.shapes = (need,)
        return self.shapes

    def shape_keys(self, accum: int) -> list[tuple]:
        """The planned batches' shape keys (`StreamBatch.shape_key`)."""
        if self.plan is None:
            return []
        P, L, K, Ub, Tb, Bp = self.plan
        return [(P, 1, L, K, Ub, Tb, Bp)]

    # --- batches ----------------------------------------------------------------------------

    def make(self, idx: np.ndarray) -> StreamBatch:
        need = self._step_need(idx)
        if self.plan is None or any(n > p for n, p in zip(need, self.plan)):
            self.plan = need if self.plan is None else tuple(max(a, b) for a, b in zip(need, self.plan))
            self.shapes = (self.plan,)
        P, L, K, Ub, Tb, Bp = self.plan
        bins = self.cut(idx)
        parts = [self._micro_batch(idx, b, L, K, Ub, Tb, Bp) for b in bins]
        parts += [self._empty(parts[0]) for _ in range(P - len(parts))]
        self._group_totals(parts, Bp)
        return stack(parts, self.layout.kind)

    def _micro_batch(self, idx: np.ndarray, positions: list[int], L: int, K: int, Ub: int, Tb: int,
                     Bp: int) -> dict:
        """Pairs idx[positions] -> one packed micro-batch with Bp pair slots (chosen k, rejected
        Bp + k) and its per-slot bookkeeping (`_group`: the pair's group, -1 for an empty slot)."""
        lay, n = self.layout, len(positions)
        unit = compact_targets(make_pair_batch(self.data, idx[positions], lay, None), 2 * n)
        seq = unit["tgt_seq"]
        unit["tgt_seq"] = np.where(seq < n, seq, np.where(seq < 2 * n, seq + Bp - n, 2 * Bp)).astype(np.int32)
        out = to_stream(unit, 2 * Bp, 1, L, K, Tb, lay.pad_id, lay.kind.shares_prompt)
        blk = np.full((1, Ub, Tb), -1, np.int32)
        blk[:, :out["blk_idx"].shape[1]] = out["blk_idx"]
        out["blk_idx"] = blk
        slots = np.arange(Bp)
        # A pair's share of its group's mean: 1/B, or 1/its size for an epoch's last, shorter group.
        size = [min(self.B, len(idx) - positions[k] // self.B * self.B) if k < n else 1 for k in slots]
        out["pair_w"] = np.where(slots < n, 1.0 / np.asarray(size, np.float32), np.float32(0)).astype(np.float32)
        scored = out["tgt_full"] >= 0   # not the unscored first token of a sequence without prompt
        out["ntok_c"] = np.array([((out["tgt_seq"] == k) & scored).sum() for k in slots], np.float32)
        out["ntok_r"] = np.array([((out["tgt_seq"] == Bp + k) & scored).sum() for k in slots], np.float32)
        out["ntok_full"] = np.array([(out["tgt_full"] == k + 1).sum() for k in slots], np.float32)
        out["_group"] = np.array([positions[k] // self.B if k < n else -1 for k in slots], np.int64)
        return out

    def _empty(self, like: dict) -> dict:
        """A micro-batch with no pair (the step skips it)."""
        Bp = like["pair_w"].shape[0]
        out = token_rows(1, like["input_ids"].shape[-1], self.layout.pad_id)
        out.update({k: np.zeros_like(like[k]) for k in ("blk_back", "tgt_src", "tgt_ids", "tgt_weight",
                                                         "tgt_full", "trl_tokens", "pair_w", "ntok_c",
                                                         "ntok_r", "ntok_full")})
        out["blk_idx"] = np.full_like(like["blk_idx"], -1)
        out["tgt_seq"] = np.full_like(like["tgt_seq"], 2 * Bp)
        out["_group"] = np.full(Bp, -1, np.int64)
        return out

    def _group_totals(self, parts: list[dict], Bp: int) -> None:
        """Each slot's token counts -> its group's totals (what a token mean over the group divides
        by); drops the `_group` bookkeeping."""
        keys = ("ntok_c", "ntok_r", "ntok_full")
        groups = max(int(p["_group"].max()) for p in parts) + 1
        tot = {k: np.zeros(groups, np.float64) for k in keys}
        for p in parts:
            real = p["_group"] >= 0
            for k in keys:
                np.add.at(tot[k], p["_group"][real], p[k][real])
        for p in parts:
            g = p.pop("_group")
            real = g >= 0
            for k in keys:
                p[k] = np.where(real, tot[k][np.maximum(g, 0)], 0).astype(np.float32)


def plan_line(it: BudgetIterator, batches: list[StreamBatch]) -> str:
    """The dry run's micro-batch plan: micro-batches per step and the tokens in each."""
    used = [int((np.asarray(b.pair_w) > 0).any(axis=-1).sum()) for b in batches]
    toks = [int(n) for b in batches for n, w in zip((np.asarray(b.segment_ids) > 0).sum(axis=(1, 2)),
                                                    (np.asarray(b.pair_w) > 0).any(axis=-1)) if w]
    P, L, K, Ub, Tb, Bp = it.plan
    return (f"max_tokens_per_batch {it.budget}: {min(used)}-{max(used)} micro-batches per step (mean "
            f"{np.mean(used):.2f}, compiled for {P}; without the key {it.G} of {it.B} pairs), each a stream of "
            f"{L} token slots holding {int(np.percentile(toks, 50))} tokens at p50, {max(toks)} at most, "
            f"up to {Bp} pairs")

"""The deterministic, resumable batch order and the batches it yields (`BatchIterator`)."""
from __future__ import annotations

import numpy as np

from jaxpref.data.batches import Batch, LastStep, stack
from jaxpref.data.layouts import (Layout, _pair_sequences, _row_length, _with_extra, bucket_for, compact_targets,
                                  make_pair_batch, pack_rows)
from jaxpref.data.shapes import choose_shapes, round_up
from jaxpref.data.tokenize import Tokenized


class BatchIterator:
    """Deterministic batches: epoch e visits a permutation drawn from (seed, e); the position is
    (epoch, index) and restoring it yields exactly the batches an uninterrupted run would.

    Each step takes `accum` micro-batches of `batch_size` pairs, padded to one shape: the padded
    length T and the LM-head target slots per row K. Without a plan, T comes from the layout's
    length buckets and K from its target buckets; `plan_shapes` instead picks at most a few
    shapes fitted to the run's own steps. `last_short`: an epoch ends with the step its remaining
    pairs fill, as TRL's Trainer (its dataloader keeps a shorter last batch): whole micro-batches of
    B and one shorter (`batches.LastStep`); else the remainder that does not fill a step is skipped
    (a different remainder each epoch)."""

    # Planned shapes are multiples of this (vector width friendly, fewer distinct candidates).
    ALIGN = 8

    def __init__(self, data: Tokenized, batch_size: int, accum: int, seed: int, layout: Layout,
                 shuffle: bool = True, last_short: bool = False):
        self.data, self.B, self.G, self.seed, self.layout = data, batch_size, accum, seed, layout
        self.shuffle, self.last_short = shuffle, last_short
        self.epoch, self.index = 0, 0
        # Micro-batches per epoch (TRL's dataloader length), and optimizer steps per epoch.
        self.micro_per_epoch = -(-len(data) // batch_size) if last_short else len(data) // (batch_size * accum) * accum
        self.steps_per_epoch = -(-self.micro_per_epoch // accum)
        self.shapes: tuple[tuple[int, int], ...] | None = None
        self._cost = None
        self._tails: dict[int, BatchIterator] = {}

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
        per_step, n = self.B * self.G, len(self.data)
        if index >= n if self.last_short else index + per_step > n:
            epoch, index = epoch + 1, 0
        idx = self.order(epoch)[index:index + per_step]
        return idx, epoch, index + len(idx)

    def __next__(self) -> tuple[Batch | LastStep, float]:
        if self.steps_per_epoch == 0:
            raise StopIteration
        idx, self.epoch, self.index = self._advance(self.epoch, self.index)
        # TRL's epoch: micro-batches done over micro-batches per epoch.
        progress = self.epoch + -(-self.index // self.B) / self.micro_per_epoch
        return self.make(idx), progress

    # --- shapes -----------------------------------------------------------------------------

    def _micro(self, idx: np.ndarray) -> list[np.ndarray]:
        """The step's whole micro-batches (a last step's shorter one is not among them)."""
        return [idx[g * self.B:(g + 1) * self.B] for g in range(len(idx) // self.B)]

    def _parts(self, micro: list[np.ndarray], T: int) -> list[dict]:
        """Unpacked micro-batches of length T (before the targets are gathered)."""
        return [make_pair_batch(self.data, m, self.layout, T) for m in micro]

    def _pair_need(self, i: int) -> tuple[int, int]:
        """(tokens, scored tokens) of pair i's row, or of its longer row (concatenated). Scored
        tokens are at most the completion tokens, or with ORPO's span the chosen sequence's."""
        pc, npc, pr, npr, same = _pair_sequences(self.data, i, self.layout)
        k_c = len(pc) if self.layout.full_span else len(pc) - npc
        k_r = len(pr) - npr
        shared = self.layout.kind.shares_prompt
        return (_row_length(pc, npc, pr, npr, same, self.layout.kind),
                k_c + k_r if shared else max(k_c, k_r))

    def _unit_needs(self, m: np.ndarray) -> list[tuple[int, int]]:
        """(live tokens, scored tokens) of each row of micro-batch `m`, in row order, when laid out
        padding-free: a sequence's last token is left out (`padfree.dead_tokens`), so live is at
        most the row's length minus one per sequence that ends in it."""
        shared = self.layout.kind.shares_prompt
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
            from jaxpref.data.padfree import stream_needs
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
        return self.B if self.layout.kind.shares_prompt else 2 * self.B

    def units_per_stream(self) -> int:
        """Padding-free: rows (attention blocks) per stream."""
        return self._units() // self.layout.streams

    def _target_need(self, parts: list[dict]) -> int:
        """Scored tokens of the fullest row of built (possibly packed) micro-batches."""
        S = 2 * self.B
        return max(int(((p["seq"] < S) | (p["full"] > 0)).sum(axis=1).max()) for p in parts)

    def plannable(self) -> bool:
        return not self.layout.kind.packed

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
        tails: list[tuple] = []   # what the epochs' last, shorter micro-batches need (covered, not planned for)
        epoch, index = 0, 0
        for _ in range(min(steps, sample_steps)):
            idx, epoch, index = self._advance(epoch, index)
            whole = len(idx) // self.B * self.B
            if whole < len(idx):
                tails.append(tuple(round_up(x, a) for x in self._tail(len(idx) - whole)._needs([idx[whole:]])))
            if whole:
                key = tuple(round_up(x, a) for x in self._needs(self._micro(idx)))
                needs[key] = needs.get(key, 0) + 1
        if not needs:
            return ()
        if steps <= sample_steps:
            # Every step was looked at: the largest need is the cover.
            cover = tuple(max(n[d] for n in [*needs, *tails]) for d in range(len(next(iter(needs)))))
        else:
            cover = tuple(round_up(x, a) for x in self._cover())
        self.shapes = choose_shapes(needs, cover, cost, max_shapes)
        return self.shapes

    def shape_keys(self, accum: int) -> list[tuple]:
        """The planned shapes (T, K), or padding-free (L, K, Tb), as batch shape keys
        (`data.batches`) of steps of `accum` micro-batches."""
        return [(accum, self._units(), *s) if len(s) == 2
                else (accum, self.layout.streams, s[0], s[1], self.units_per_stream(), s[2])
                for s in self.shapes or ()]

    def _shape(self, need: tuple) -> tuple | None:
        """The cheapest planned shape that holds `need`, or None."""
        fits = [s for s in self.shapes or () if all(a >= b for a, b in zip(s, need))]
        if fits:
            return min(fits, key=lambda s: (self._cost(*s), s))
        return None

    def _tail(self, pairs: int) -> "BatchIterator":
        """The iterator that builds a last step's short micro-batch of `pairs` pairs (B = pairs, the
        same data, layout and planned shapes)."""
        if pairs not in self._tails:
            t = type(self)(self.data, pairs, 1, self.seed, self.layout, self.shuffle)
            self._tails[pairs] = t
        t = self._tails[pairs]
        t.shapes, t._cost = self.shapes, self._cost
        return t

    def make(self, idx: np.ndarray) -> Batch | LastStep:
        whole = len(idx) // self.B * self.B
        if whole < len(idx):   # an epoch's last step, with a shorter micro-batch
            head = self.make(idx[:whole]) if whole else None
            return LastStep(head, self._tail(len(idx) - whole).make(idx[whole:]), len(idx) - whole)
        micro = self._micro(idx)
        S = 2 * self.B
        if self.layout.padding_free:
            shape = self._shape(self._needs(micro)) if self.shapes else None
            return stack(self._make_padding_free(micro, shape), self.layout.kind)
        need = self._needs(micro)
        shape = self._shape(need)
        T, K = shape if shape is not None else (bucket_for(need[0], self.layout.buckets), None)
        parts = self._parts(micro, T)
        if self.layout.kind.packed:
            L = self.layout.pack_length or T
            packed = [pack_rows(p, max(L, T), S, self.layout.pad_id) for p in parts]
            # A multiple of the data-parallel devices: the mesh splits the rows evenly.
            rows = round_up(max(p["input_ids"].shape[0] for p in packed), self.layout.streams)
            parts = [pack_rows(p, max(L, T), S, self.layout.pad_id, rows) for p in parts]
        if K is None:
            K = min(bucket_for(max(self._target_need(parts), 1), self.layout.target_buckets),
                    parts[0]["input_ids"].shape[1])
        return stack([_with_extra(p, lambda q: compact_targets(q, S, K)) for p in parts], self.layout.kind)

    def _make_padding_free(self, micro: list[np.ndarray], shape: tuple | None) -> list[dict]:
        from jaxpref.data.padfree import built_needs, to_stream
        S, lay = 2 * self.B, self.layout
        units = [_with_extra(p, lambda q: compact_targets(q, S)) for p in self._parts(micro, None)]
        if shape is None:
            need = [built_needs(u, S, lay.streams) for u in units]
            L, K, Tb = (max(n[d] for n in need) for d in range(3))
            shape = (bucket_for(L, lay.buckets), bucket_for(K, lay.target_buckets), bucket_for(Tb, lay.buckets))
        L, K, Tb = shape
        # KTO (`kto_label`): TRL counts the completion rows (units 0..B-1), not the KL rows.
        return [_with_extra(u, lambda q: to_stream(q, S, lay.streams, L, K, Tb, lay.pad_id, lay.kind.shares_prompt,
                                                   self.B if "kto_label" in u else None)) for u in units]

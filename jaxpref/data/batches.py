"""What the compiled step reads: one batch class per layout kind, frozen and registered as pytrees.

Every pair layout describes its tokens the same way (`layouts`), so one step serves them all:

- `Batch`: rows of T tokens (the `concatenated`, `shared_prompt` and packed layouts);
- `StreamBatch`: padding-free streams of L tokens (`padfree`), plus the attention blocks that keep
  each original row to itself.

Shapes are those of one optimizer step: a leading micro-batch axis G, then rows N (streams R) and
tokens T (L) or target slots K. The step's scan over micro-batches hands its body the same class
without the G axis. Sequence slots: pair i's chosen sequence is slot i, its rejected B + i (KTO: the
completion i and its KL row B + i); S = 2B marks "no sequence".
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import jax
import numpy as np

from jaxpref.data.layouts import PairLayout, trl_token_count

Array = jax.Array | np.ndarray


@jax.tree_util.register_dataclass
@dataclass(frozen=True, kw_only=True)
class Batch:
    """Padded rows. Per token, [G, N, T]: `input_ids` int32; `positions` int32 (RoPE positions: a
    shared prompt's rejected branch continues from the prompt's end); `segment_ids` int32 (the
    sequence or pair a token belongs to within its row, 0 = padding); `branch` int32 (0: seen by
    the whole segment; 1/2: the chosen / rejected branch, which sees branch 0 and itself).
    Per target slot, [G, N, K]: `tgt_src` int32 (row position of the hidden state that predicts the
    target), `tgt_ids` int32, `tgt_seq` int32 (its sequence slot, S when the slot is empty),
    `tgt_weight` float32 (LD-DPO weight of a completion token, 0 when not a completion token),
    `tgt_full` float32 (ORPO's span: the pair's slot + 1 on the chosen sequence's tokens; -1 on the
    first completion token of a sequence without prompt, which nothing predicts: not scored, but
    counted in TRL's completion lengths).
    `labels` [G, B] float32: KTO's desirability of each completion (None for pairs)."""
    input_ids: Array
    positions: Array
    segment_ids: Array
    branch: Array
    tgt_src: Array
    tgt_ids: Array
    tgt_seq: Array
    tgt_weight: Array
    tgt_full: Array
    labels: Array | None = None
    layout: PairLayout = field(default=PairLayout.CONCATENATED, metadata={"static": True})

    @property
    def shape_key(self) -> tuple:
        """What one compilation of the step is for: [G, rows, T] tokens and K target slots."""
        return tuple(self.input_ids.shape) + tuple(self.tgt_ids.shape[-1:])

    def trl_token_count(self) -> int:
        """Tokens in TRL's accounting: every real token, a shared prompt once per completion; KTO
        (`labels`): its completion rows (the first B of each micro-batch), not its KL rows."""
        seg, br = np.asarray(self.segment_ids), np.asarray(self.branch)
        if self.labels is not None:
            b = self.labels.shape[-1]
            seg, br = seg[..., :b, :], br[..., :b, :]
        return trl_token_count(seg, br, self.layout.shares_prompt)

    def micro(self, g: int) -> "Batch":
        """Micro-batch g, without the leading axis."""
        return jax.tree_util.tree_map(lambda v: v[g], self)

    def on_device(self) -> "Batch":
        """The arrays the step reads (host-only bookkeeping left out)."""
        return self

    def arrays(self) -> dict[str, Array]:
        """The batch's arrays by name (None fields left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "layout" and getattr(self, f.name) is not None}


@jax.tree_util.register_dataclass
@dataclass(frozen=True, kw_only=True)
class StreamBatch(Batch):
    """Padding-free streams: the token and target arrays of `Batch` as [G, R, L] and [G, R, K]
    (R = one stream per data-parallel shard), plus `blk_idx` [G, R, U, Tb] int32 (stream position of
    each slot of the U attention blocks of a stream, -1 = empty slot), `blk_back` [G, R, L] int32
    (the block slot each stream position reads its output from) and `trl_tokens` [G, R] int32 (TRL's
    token count of each stream before dead tokens were left out; host only).
    Micro-batches cut to a token budget (`budget`) also carry per pair slot, [G, Bp] float32:
    `pair_w` (1/B for a pair, 1/b in an epoch's last group of b, 0 for an empty slot) and its
    group's token totals `ntok_c` (chosen completion tokens), `ntok_r` (rejected completion tokens: the `logits/rejected` mean) and `ntok_full` (ORPO's span); None otherwise."""
    blk_idx: Array
    blk_back: Array
    trl_tokens: Array | None = None
    pair_w: Array | None = None
    ntok_c: Array | None = None
    ntok_r: Array | None = None
    ntok_full: Array | None = None

    @property
    def shape_key(self) -> tuple:
        """... and the padding-free attention blocks [per stream, Tb] (and the pair slots Bp of a
        token budget's micro-batches)."""
        extra = () if self.pair_w is None else tuple(self.pair_w.shape[-1:])
        return super().shape_key + tuple(self.blk_idx.shape[-2:]) + extra

    def trl_token_count(self) -> int:
        return int(np.asarray(self.trl_tokens).sum())

    def on_device(self) -> "StreamBatch":
        return replace(self, trl_tokens=None)


def from_arrays(arrays: dict, layout: PairLayout) -> Batch:
    """Arrays by name, as the builders make them (`layouts`, `padfree`, `unpaired`; KTO's labels
    as `kto_label`) -> a `StreamBatch` when they hold attention blocks, else a `Batch`."""
    arrays = dict(arrays)
    if "kto_label" in arrays:
        arrays["labels"] = arrays.pop("kto_label")
    cls = StreamBatch if "blk_idx" in arrays else Batch
    return cls(**arrays, layout=PairLayout(layout))


def stack(parts: list[dict], layout: PairLayout) -> Batch:
    """Micro-batches built as arrays by name -> one batch with the micro-batch axis first."""
    return from_arrays({k: np.stack([p[k] for p in parts]) for k in parts[0]}, layout)


def shape_parts(key: tuple) -> list[tuple]:
    """A step's shape key -> the batch shape keys it compiles (a `LastStep`'s: its parts'), what the
    memory plan reads."""
    return [k for k in key[1:] if k is not None] if key[0] == "last" else [key]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LastStep:
    """An epoch's last, shorter step (as TRL's Trainer takes it): `head`, the whole micro-batches of
    B pairs it still has (None if none), and `tail`, one micro-batch of the `pairs` (< B) left, built
    with B = `pairs` (its own sequence slots, S = 2 x pairs). The step averages over head + 1
    micro-batches."""
    head: Batch | None
    tail: Batch
    pairs: int = field(metadata={"static": True})

    @property
    def shape_key(self) -> tuple:
        return ("last", None if self.head is None else self.head.shape_key, self.tail.shape_key)

    def trl_token_count(self) -> int:
        return sum(b.trl_token_count() for b in (self.head, self.tail) if b is not None)

    def on_device(self) -> "LastStep":
        return LastStep(None if self.head is None else self.head.on_device(), self.tail.on_device(), self.pairs)

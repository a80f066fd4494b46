"""Planned batch shapes: at most `max_shapes` (T, K) per run, every step fits one, less padding than
fixed buckets, deterministic (a resumed run plans and builds the same batches)."""
from __future__ import annotations

import numpy as np
import pytest

from jaxpref.data.iterator import BatchIterator
from jaxpref.data.layouts import Layout, compact_targets
from jaxpref.data.shapes import choose_shapes
from jaxpref.data.tokenize import Tokenized
from jaxpref.data.unpaired import UnpairedIterator


def random_pairs(n: int, seed: int = 0) -> Tokenized:
    rng = np.random.default_rng(seed)
    ids = lambda k: [int(x) for x in rng.integers(3, 50, k)]
    return Tokenized(prompt=[ids(int(rng.integers(1, 40))) for _ in range(n)],
                     chosen=[ids(int(rng.integers(1, 60))) for _ in range(n)],
                     rejected=[ids(int(rng.integers(1, 60))) for _ in range(n)], rows_in=n)


def cost(T, K):
    return T * 100 + T * T + K * 30


def needs_of(batch, S: int) -> tuple[int, int]:
    """(tokens, target slots) this batch really uses per row, at most."""
    seg = batch.segment_ids > 0
    used = int(seg.sum(axis=-1).max())
    k = int((batch.tgt_seq < S).sum(axis=-1).max())
    return used, k


@pytest.mark.parametrize("kind", ["concatenated", "shared_prompt"])
def test_plan_covers_every_step_with_few_shapes_and_less_padding(kind):
    data = random_pairs(90)
    layout = Layout(kind, 128, "keep_start", full_span=False)
    B, G, steps = 4, 2, 40  # several epochs of 11 steps
    fixed = BatchIterator(data, B, G, 3, layout)
    planned = BatchIterator(data, B, G, 3, layout)
    shapes = planned.plan_shapes(steps, cost, max_shapes=3)
    assert 1 <= len(shapes) <= 3
    seen, slots = set(), {"fixed": 0, "planned": 0}
    for _ in range(steps):
        a, _ = next(fixed)
        b, _ = next(planned)
        T, K = b.input_ids.shape[-1], b.tgt_ids.shape[-1]
        seen.add((T, K))
        for g in range(G):
            t, k = needs_of(b.micro(g), 2 * B)
            assert t <= T and k <= K
            # Same pairs, same tokens, same targets as the bucketed batch.
            ra = a.micro(g).arrays()
            rb = b.micro(g).arrays()
            for key in ("input_ids", "positions", "segment_ids", "branch"):
                n = min(ra[key].shape[-1], rb[key].shape[-1])
                np.testing.assert_array_equal(ra[key][:, :n] * (ra["segment_ids"][:, :n] > 0),
                                              rb[key][:, :n] * (rb["segment_ids"][:, :n] > 0))
            for key in ("tgt_ids", "tgt_seq"):
                va, vb = ra[key][ra["tgt_seq"] < 2 * B], rb[key][rb["tgt_seq"] < 2 * B]
                np.testing.assert_array_equal(va, vb)
        slots["fixed"] += cost(a.input_ids.shape[-1], a.tgt_ids.shape[-1])
        slots["planned"] += cost(T, K)
    assert seen <= set(shapes)
    assert slots["planned"] < slots["fixed"]


def test_plan_is_deterministic_and_resume_builds_the_same_batches():
    data = random_pairs(50, seed=1)
    layout = Layout("shared_prompt", 128, "keep_start", full_span=False)
    a = BatchIterator(data, 3, 1, 5, layout)
    shapes = a.plan_shapes(30, cost, 4)
    straight = [next(a)[0] for _ in range(30)]
    b = BatchIterator(data, 3, 1, 5, layout)
    assert b.plan_shapes(30, cost, 4) == shapes
    for _ in range(12):
        next(b)
    state = b.state()
    c = BatchIterator(data, 3, 1, 5, layout)
    c.plan_shapes(30, cost, 4)
    c.restore(state)
    for want in straight[12:]:
        got = next(c)[0].arrays()
        for k, v in want.arrays().items():
            np.testing.assert_array_equal(got[k], v)


def test_one_shape_when_asked():
    data = random_pairs(40, seed=2)
    it = BatchIterator(data, 2, 1, 0, Layout("concatenated", 128, "keep_start", full_span=False))
    assert len(it.plan_shapes(20, cost, max_shapes=1)) == 1
    assert len({next(it)[0].input_ids.shape for _ in range(20)}) == 1


def test_kto_plan_covers_its_kl_rows():
    rng = np.random.default_rng(4)
    ids = lambda k: [int(x) for x in rng.integers(3, 50, k)]
    n = 30
    data = Tokenized(prompt=[ids(int(rng.integers(1, 30))) for _ in range(n)],
                     completion=[ids(int(rng.integers(1, 50))) for _ in range(n)],
                     label=[bool(i % 2) for i in range(n)], rows_in=n)
    it = UnpairedIterator(data, 4, 1, 0, Layout("concatenated", 64, "keep_start", full_span=False))
    shapes = it.plan_shapes(20, cost, 2)
    assert 1 <= len(shapes) <= 2
    for _ in range(20):
        b, _ = next(it)
        assert (b.input_ids.shape[-1], b.tgt_ids.shape[-1]) in shapes
        t, k = needs_of(b.micro(0), 8)
        assert t <= b.input_ids.shape[-1] and k <= b.tgt_ids.shape[-1]


def test_choose_shapes_keeps_the_cover_and_stops_when_a_shape_does_not_pay():
    needs = {(32, 8): 1, (64, 16): 10}
    # One short step is not worth a compilation: only the cover.
    assert choose_shapes(needs, (64, 16), cost, 4, new_shape_steps=2.0) == ((64, 16),)
    needs = {(32, 8): 30, (64, 16): 1}
    assert choose_shapes(needs, (64, 16), cost, 4, new_shape_steps=2.0) == ((32, 8), (64, 16))


@pytest.mark.parametrize("kind", ["concatenated", "shared_prompt"])
def test_plan_covers_orpo_span_targets(kind):
    """ORPO scores the chosen sequence's prompt tokens too: the planned K must hold all of them
    (the same scored tokens as with the fixed target buckets)."""
    data = random_pairs(40, seed=5)
    layout = Layout(kind, 64, "keep_end", full_span=True)
    planned, fixed = BatchIterator(data, 3, 1, 0, layout), BatchIterator(data, 3, 1, 0, layout)
    shapes = planned.plan_shapes(13, cost, max_shapes=2)
    for _ in range(13):
        a, b = next(fixed)[0], next(planned)[0]
        assert (b.input_ids.shape[-1], b.tgt_ids.shape[-1]) in shapes
        scored = lambda x: ((x.tgt_seq < 6) | (x.tgt_full > 0)).sum(axis=-1)
        np.testing.assert_array_equal(scored(b), scored(a))
        assert scored(b).max() > 0


@pytest.mark.parametrize("kind,max_length,mode", [("shared_prompt", 128, "keep_start"),
                                                   ("shared_prompt", 40, "keep_end"),
                                                   ("concatenated", 40, "keep_start")])
@pytest.mark.parametrize("streams", [1, 2])
def test_padding_free_needs_from_lengths_equal_the_built_streams(kind, max_length, mode, streams):
    """The plan's (L, K, Tb) come from sequence lengths; the streams built from the same pairs
    (dead tokens found on the arrays) must need exactly L and Tb, and at most K."""
    from jaxpref.data.padfree import built_needs
    data = random_pairs(60, seed=4)
    data.prompt[3] = []  # an empty prompt
    layout = Layout(kind, max_length, mode, full_span=False, padding_free=True, streams=streams)
    it = BatchIterator(data, 4, 2, 5, layout)
    shapes = it.plan_shapes(7, lambda L, K, Tb: L * 100 + K * 30 + Tb * Tb, max_shapes=2)
    S = 8
    for _ in range(7):
        idx, it.epoch, it.index = it._advance(it.epoch, it.index)
        micro = it._micro(idx)
        L, K, Tb = it._needs(micro)
        units = [compact_targets(p, S) for p in it._parts(micro, None)]
        built = [built_needs(u, S, streams) for u in units]
        assert max(b[0] for b in built) == L and max(b[2] for b in built) == Tb
        assert max(b[1] for b in built) <= K
        batch = it.make(idx)
        assert batch.shape_key[-4:-2] == (batch.input_ids.shape[-1], batch.tgt_ids.shape[-1])
        assert (batch.input_ids.shape[-1], batch.tgt_ids.shape[-1], batch.blk_idx.shape[-1]) in shapes
        assert batch.input_ids.shape[1] == streams

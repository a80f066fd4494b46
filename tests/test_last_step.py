"""An epoch's last, shorter step (`BatchIterator(last_short=True)`): the steps, micro-batches and
epoch progress TRL's Trainer takes over a split that does not divide into whole steps (its
dataloader keeps a shorter last batch; transformers' `_inner_training_loop` cuts the epoch's
micro-batches into steps of `gradient_accumulation_steps` and a last one of the rest). The losses
and metrics of such runs against TRL: `tests/test_trl_partial_step.py` (slow)."""
from __future__ import annotations

import numpy as np
import pytest

from jaxpref.data.batches import Batch, LastStep
from jaxpref.data.iterator import BatchIterator
from jaxpref.data.layouts import Layout
from jaxpref.data.unpaired import UnpairedIterator
from jaxpref.training.reference import batch_reference, next_indices
from tests.test_shapes import random_pairs


def trl_steps(n: int, B: int, G: int) -> list[list[int]]:
    """Pairs per micro-batch of each step of one epoch, as transformers' Trainer takes them."""
    micro = [min(B, n - s) for s in range(0, n, B)]
    return [micro[i:i + G] for i in range(0, len(micro), G)]


def sizes(b) -> list[int]:
    if isinstance(b, LastStep):
        head = [] if b.head is None else [b.head.input_ids.shape[1] // 2] * b.head.input_ids.shape[0]
        return head + [b.pairs]
    return [b.input_ids.shape[1] // 2] * b.input_ids.shape[0]


@pytest.mark.parametrize("n,B,G", [(10, 4, 1), (9, 2, 2), (12, 2, 4), (7, 3, 2), (12, 4, 3), (3, 4, 2)])
def test_epochs_take_trls_steps_and_progress(n, B, G):
    data = random_pairs(n)
    it = BatchIterator(data, B, G, 5, Layout("concatenated", 256, "keep_end", full_span=False), last_short=True)
    want = trl_steps(n, B, G)
    M = sum(len(s) for s in want)
    assert it.steps_per_epoch == len(want) and it.micro_per_epoch == M
    for epoch in range(2):
        seen, done = [], 0
        for s in want:
            b, progress = next(it)
            assert sizes(b) == s
            done += len(s)
            assert progress == pytest.approx(epoch + done / M, abs=1e-12)   # TRL's epoch + (step + 1) / len(dataloader)
            if isinstance(b, LastStep):
                assert s[-1] < B and b.tail.input_ids.shape[0] == 1
                parts = ([] if b.head is None else [b.head.micro(g) for g in range(b.head.input_ids.shape[0])]) + [b.tail.micro(0)]
            else:
                parts = [b.micro(g) for g in range(b.input_ids.shape[0])]
            for mb in parts:   # the pairs each micro-batch holds: chosen sequence slots 0..b-1
                k = mb.input_ids.shape[0] // 2
                seen += [tuple(mb.input_ids[r][mb.segment_ids[r] > 0]) for r in range(k)]
        # Every pair once per epoch.
        order = it.order(epoch)
        assert len(seen) == n and len(set(seen)) == len({tuple(data.prompt[i] + data.chosen[i]) for i in order})


def test_without_last_short_the_remainder_is_left_out():
    it = BatchIterator(random_pairs(10), 4, 1, 5, Layout("concatenated", 256, "keep_end", full_span=False))
    assert it.steps_per_epoch == 2
    assert [sizes(next(it)[0]) for _ in range(3)] == [[4], [4], [4]]


def test_a_short_unpaired_micro_batch_keeps_its_kl_groups():
    """KTO: the last micro-batch of 2 rows (8 rows, batch 3) takes its KL completions from the data's
    groups of 3 (TRL rotates the dataset's completions before batching), not from within itself."""
    rng = np.random.default_rng(0)
    ids = lambda k: [int(x) for x in rng.integers(3, 50, k)]
    from jaxpref.data.tokenize import Tokenized
    data = Tokenized(prompt=[ids(3) for _ in range(8)], completion=[ids(4) for _ in range(8)],
                     label=[i % 2 == 0 for i in range(8)], rows_in=8)
    layout = Layout("concatenated", 256, "keep_end", full_span=False, kl_group=3)
    it = UnpairedIterator(data, 3, 1, 0, layout, shuffle=False, last_short=True)
    *_, (last, _) = [next(it) for _ in range(it.steps_per_epoch)]
    assert isinstance(last, LastStep) and last.head is None and last.pairs == 2
    kl_rows = last.tail.micro(0)
    # Rows 6, 7 of a group of 2 (6..7): KL completions of rows 7 and 6.
    for r, (i, j) in enumerate([(6, 7), (7, 6)]):
        toks = kl_rows.input_ids[2 + r][kl_rows.segment_ids[2 + r] > 0]
        assert list(toks) == data.prompt[i] + data.completion[j]


def test_precomputed_reference_follows_the_last_step():
    table = np.arange(20, dtype=np.float32).reshape(10, 2)
    it = BatchIterator(random_pairs(10), 2, 2, 5, Layout("concatenated", 256, "keep_end", full_span=False),
                       shuffle=False, last_short=True)
    next(it)
    next(it)
    idx = next_indices(it)
    assert list(idx) == [8, 9]
    head, tail = batch_reference(table, np.arange(5, 10), 2)   # 2 whole micro-batches and 1 pair
    np.testing.assert_array_equal(head, [[10, 12, 11, 13], [14, 16, 15, 17]])
    np.testing.assert_array_equal(tail, [[18, 19]])
    assert isinstance(batch_reference(table, idx, 2), np.ndarray)
    assert isinstance(next(it)[0], Batch)


def test_the_plan_covers_the_last_shorter_micro_batch():
    """The longest pair in the epoch's last, shorter micro-batch: the planned shapes still hold it
    (the plan's cover counts it), so that step compiles a planned length, not a new bucket."""
    from tests.test_shapes import cost
    data = random_pairs(10)
    data.chosen[9] = data.chosen[9] * 4   # the longest pair by far, the last of the epoch
    it = BatchIterator(data, 4, 1, 5, Layout("concatenated", None, "keep_end", full_span=False),
                       shuffle=False, last_short=True)
    shapes = it.plan_shapes(3, cost, max_shapes=2)
    *_, (last, _) = [next(it) for _ in range(3)]
    assert isinstance(last, LastStep)
    T = last.tail.input_ids.shape[-1]
    assert T in {s[0] for s in shapes} and T >= len(data.prompt[9]) + len(data.chosen[9])


def test_mean_token_accuracy_divides_by_the_chosen_tokens_as_logits_chosen_does():
    """TRL's `mean_token_accuracy`: a micro-batch's correct chosen tokens over its chosen tokens,
    averaged over the micro-batches (trl DPOTrainer._compute_loss). It shares its count with
    `logits/chosen`; it was taken by the first of the two (accuracy = correct tokens per pair)."""
    import jax.numpy as jnp

    from jaxpref.training.step import reduce_metrics

    # two micro-batches of two pairs: chosen tokens 3 + 2 and 4 + 1; correct 1 + 0 and 2 + 1
    m = {"logits/chosen": jnp.array([[0.3, 0.2], [0.4, 0.1]]), "_tokens/chosen": jnp.array([[3.0, 2.0], [4.0, 1.0]]),
         "mean_token_accuracy": jnp.array([[1.0, 0.0], [2.0, 1.0]])}
    out = reduce_metrics(m)
    assert float(out["mean_token_accuracy"]) == pytest.approx((1 / 5 + 3 / 5) / 2, rel=1e-6)
    assert float(out["logits/chosen"]) == pytest.approx((0.5 / 5 + 0.5 / 5) / 2, rel=1e-6)

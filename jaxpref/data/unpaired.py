"""Unpaired (KTO) batches: each completion plus a mismatched one for the KL estimate. The KL rows
pair prompt i with completion i-1 (TRL's rotation): in data order (evaluation, sequential training)
within consecutive groups of `Layout.kl_group` examples, as TRL rotates the dataset's completions
over per_device_train_batch_size before batching (an eval batch of another size, or the data's last
short group, included); shuffled, within the micro-batch."""
from __future__ import annotations

import numpy as np

from jaxpref.data.iterator import BatchIterator
from jaxpref.data.layouts import Layout, _empty, _place, bucket_for
from jaxpref.data.lengths import truncate
from jaxpref.data.tokenize import Tokenized


def kl_partner(i: int, b: int) -> int:
    """Row i of the KL half uses the completion of example i-1 (cyclically) of the batch."""
    return (i - 1) % b


def kl_sources(idx: np.ndarray, n: int, group: int | None) -> list[int]:
    """The example whose completion each KL row of the micro-batch `idx` takes: with `group`, example
    i's predecessor (cyclically) in its group of `group` consecutive examples of the n; without,
    its predecessor in `idx`."""
    if group is None:
        return [int(idx[kl_partner(k, len(idx))]) for k in range(len(idx))]
    out = []
    for i in map(int, idx):
        start = i - i % group
        out.append(start + kl_partner(i - start, min(group, n - start)))
    return out


def make_unpaired_batch(data: Tokenized, idx: np.ndarray, layout: Layout, length: int | None = None,
                        group: int | None = None) -> dict:
    """Examples `idx` -> rows [completion rows (slots 0..B-1) | KL rows (slots B..2B-1)] + labels;
    `group`: `kl_sources`'."""
    B = len(idx)
    S = 2 * B
    seqs = []
    for k, i in enumerate(idx):
        seqs.append(truncate(data.prompt[i], data.completion[i], layout.max_length, layout.truncation_mode))
    kl = []
    for i, j in zip(idx, kl_sources(idx, len(data), group)):
        kl.append(truncate(data.prompt[i], data.completion[j], layout.max_length, layout.truncation_mode))
    need = max(len(s[0]) for s in seqs + kl)
    T = length or bucket_for(need, layout.buckets)
    b = _empty(2 * B, T, S, layout.pad_id)
    ones = lambda n: np.ones(n, np.float32)
    for k, (ids, n_p) in enumerate(seqs):
        _place(b, k, 0, ids, n_p, slot=k, segment=1, branch_of_completion=0, pos0=0,
               src_of_first=None, weights=ones(len(ids) - n_p), full=False)
    for k, (ids, n_p) in enumerate(kl):
        _place(b, B + k, 0, ids, n_p, slot=B + k, segment=1, branch_of_completion=0, pos0=0,
               src_of_first=None, weights=ones(len(ids) - n_p), full=False)
    b["kto_label"] = np.asarray([1.0 if data.label[i] else 0.0 for i in idx], np.float32)
    return b


class UnpairedIterator(BatchIterator):
    """BatchIterator over unpaired (KTO) examples; same order, resumable state and shape plans."""

    def _kl_group(self) -> int | None:
        return None if self.shuffle else self.layout.kl_group

    def _parts(self, micro, T):
        return [make_unpaired_batch(self.data, m, self.layout, T, self._kl_group()) for m in micro]

    def _rows(self, m: np.ndarray) -> list[tuple[int, int]]:
        """(tokens, completion tokens) of each row: completion rows, then KL rows (prompt i
        with completion i-1)."""
        out = []
        sources = kl_sources(m, len(self.data), self._kl_group())
        for kl in (False, True):
            for row, i in enumerate(m):
                c = self.data.completion[sources[row] if kl else i]
                ids, n_p = truncate(self.data.prompt[i], c, self.layout.max_length, self.layout.truncation_mode)
                out.append((len(ids), len(ids) - n_p))
        return out

    def _needs(self, micro):
        """(T, K) of the completion rows and KL rows of these micro-batches (padding-free: the
        streams' (L, K, Tb))."""
        if self.layout.padding_free:
            return super()._needs(micro)
        rows = [r for m in micro for r in self._rows(m)]
        return max(max(t for t, _ in rows), 1), max(max(k for _, k in rows), 1)

    def _unit_needs(self, m):
        return [(t - (t > 0), k) for t, k in self._rows(m)]

    def _row_cover(self):
        # A KL row joins prompt i with another example's completion: bound by the longest one.
        longest = max(len(c) for c in self.data.completion)
        cap = self.layout.max_length
        T = max(len(p) + longest if cap is None else min(len(p) + longest, cap) for p in self.data.prompt)
        return T, min(longest, T)

"""Precomputed reference log-probs: one pass of the frozen reference over the training pairs
before training, cached on disk by a fingerprint of model, tokenizer-produced tokens and layout, so
that training needs no reference forward and the next run reuses the pass."""
from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxpref.data.iterator import BatchIterator
from jaxpref.objectives.logps import sequence_logps


def cache_key(model_fp: str, data, layout, ref_id: str) -> str:
    h = hashlib.sha256()
    h.update(f"{model_fp}|{ref_id}|{layout.kind}|{layout.max_length}|{layout.truncation_mode}|{layout.ld_alpha}".encode())
    h.update(data.digest().encode())
    return h.hexdigest()[:24]


def precompute(bundle, params, data, layout, batch_size: int, cache_dir: Path, key: str) -> np.ndarray:
    """-> [n, 2] float32 summed reference log-probs (chosen, rejected) per pair, cached."""
    path = Path(cache_dir) / f"{key}.npy"
    if path.is_file():
        print(f"jaxpref: reusing cached reference log-probs {path}", file=sys.stderr)
        return np.load(path)
    t0 = time.time()
    n = len(data)
    it = BatchIterator(data, batch_size, 1, 0, layout, shuffle=False)
    fn = jax.jit(lambda p, mb: sequence_logps(bundle, p, None, mb, 2 * batch_size))
    out = np.zeros((n, 2), np.float32)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n   # the last batch wraps around; extra rows dropped
        b = it.make(idx)
        mb = b.on_device().micro(0)
        s = np.asarray(fn(params, mb))
        k = min(batch_size, n - start)
        out[start:start + k, 0] = s[:k]
        out[start:start + k, 1] = s[batch_size:batch_size + k]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    print(f"jaxpref: reference log-probs of {n} pairs computed in {time.time() - t0:.1f} s -> {path}",
          file=sys.stderr)
    return out


def next_indices(it: BatchIterator) -> np.ndarray:
    """The example indices the iterator's next step will use (its own rule)."""
    return it._advance(it.epoch, it.index)[0]


def batch_reference(table: np.ndarray, idx: np.ndarray, batch_size: int):
    """[G, 2B]: per micro-batch of `batch_size` pairs, the chosen then rejected reference log-probs;
    for an epoch's last, shorter step (`batches.LastStep`): (its whole micro-batches' or None, [1, 2b]
    of the shorter one)."""
    rows = lambda m: np.concatenate([table[m, 0], table[m, 1]]).astype(np.float32)
    whole = len(idx) // batch_size * batch_size
    head = np.stack([rows(m) for m in idx[:whole].reshape(-1, batch_size)]) if whole else None
    return head if whole == len(idx) else (head, rows(idx[whole:])[None])

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
    """The example indices the iterator's next step will use (same rule as BatchIterator.__next__)."""
    per = it.B * it.G
    epoch, index = it.epoch, it.index
    if index + per > len(it.data):
        epoch, index = epoch + 1, 0
    return it.order(epoch)[index:index + per]


def batch_reference(table: np.ndarray, idx: np.ndarray, accum: int) -> np.ndarray:
    """[G, 2B]: per micro-batch, the chosen then rejected reference log-probs."""
    micro = idx.reshape(accum, -1)
    return np.stack([np.concatenate([table[m, 0], table[m, 1]]) for m in micro]).astype(np.float32)

"""Matmul FLOPs of a training step, counted on the shapes it executes (padding included).

Used by the batch-shape planner (relative cost of a padded shape) and by `scripts/bench.py`
(model FLOP/s). Per token: every frozen base kernel costs in*out multiply-adds (of a mixture's
experts, the `experts_per_token` that run) in the policy forward, in the backward (dX only; LoRA
training builds no base-weight gradient) and in the reference forward; LoRA's a and b cost
r*(in+out) forward plus twice backward (dX and dW). Attention (QK^T and AV) costs
2*S*heads*head_dim per query over S attended positions, its backward
twice that. The LM head costs D*V per target slot in each pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np


@dataclass(frozen=True)
class FlopModel:
    base: int        # base-kernel MACs per token (all layers)
    lora: int        # LoRA MACs per token (all layers)
    attn: int        # attention MACs per token per attended position (all layers)
    head: int        # LM-head MACs per target slot

    @classmethod
    def of(cls, abstract: dict, args, lora=None) -> "FlopModel":
        layers = abstract["layers"]
        base = sum(_per_token(x, args) for p, x in jax.tree_util.tree_leaves_with_path(layers)
                   if x.ndim in (3, 4) and "kernel" in jax.tree_util.keystr(p))
        low = sum(_per_token(x, args) for x in jax.tree_util.tree_leaves(lora)) if lora is not None else 0
        return cls(base, low, 2 * args.num_heads * args.head_dim * args.num_layers,
                   args.hidden_size * args.vocab_size)

    def step(self, rows: int, T: int, K: int, micro: int = 1, reference: bool = True,
             blocks: tuple[int, int] | None = None) -> float:
        """FLOPs of one optimizer step: `micro` micro-batches of `rows` rows x T tokens, K target
        slots per row; `reference` adds the reference forward. `blocks` = (per row, Tb): the rows
        are padding-free streams whose attention runs in that many blocks of Tb slots."""
        passes = 3 if reference else 2
        tokens = micro * rows * T
        attended = micro * rows * (blocks[0] * blocks[1] ** 2 if blocks else T * T)
        macs = tokens * (self.base * passes + self.lora * 3) + attended * self.attn * (passes + 1) \
            + micro * rows * K * self.head * passes
        return 2.0 * macs


def _per_token(x, args) -> int:
    """MACs per token of a stacked kernel or LoRA factor: [L, in, out], or a mixture's experts
    [L, E, in, out], of which each token runs `experts_per_token`."""
    n = int(np.prod(x.shape))
    return n * args.experts_per_token // x.shape[1] if x.ndim == 4 else n

"""What every architecture module provides: its arguments and its weight-name table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class ArchArgs:
    """Hyper-parameters common to all decoders, plus the run options that shape the forward."""
    vocab_size: int = 0
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    head_dim: int = 0
    tie_word_embeddings: bool = False
    dtype: Any = jnp.float32          # compute dtype
    param_dtype: Any = jnp.float32    # storage dtype of the base weights
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    deterministic: bool = True        # False turns LoRA dropout on (training)
    gradient_checkpointing: bool = False
    remat_policy: str = "nothing_saveable"
    vocab_chunk: int = 0              # LM head over this many vocabulary columns at a time (0: all)


@dataclass(frozen=True)
class WeightRule:
    """One Hugging Face tensor name (with `{i}` for the layer) and where it goes in our tree."""
    hf_name: str
    path: tuple[str, ...]
    transpose: bool = False
    optional_if_tied: bool = False

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name


def remat_policy(name: str):
    """Named `jax.checkpoint` policies: which activations a remat'd layer keeps for backward."""
    policies = {
        "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
        "dots_saveable": jax.checkpoint_policies.dots_saveable,
        "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "everything_saveable": jax.checkpoint_policies.everything_saveable,
    }
    return policies[name]


def stacked(block, args: ArchArgs, in_axes=None):
    """`block` repeated `num_layers` times with `nn.scan` (parameters stacked on a leading layer
    axis; compile time does not grow with depth), rematerialised when gradient checkpointing is on."""
    import flax.linen as nn

    if args.gradient_checkpointing:
        block = nn.remat(block, prevent_cse=False, policy=remat_policy(args.remat_policy))
    return nn.scan(block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=nn.broadcast if in_axes is None else in_axes, length=args.num_layers)

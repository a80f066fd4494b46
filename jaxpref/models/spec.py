"""What every architecture module provides (its arguments, their `spec()` and its weight-name
table), and how the decoder's layers are stacked: `nn.scan` or a loop."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # blocks imports this module
    from jaxpref.models.blocks import DecoderSpec


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
    # False: the layers run as a Python loop over per-layer weights (`ModelBundle.runtime_params`)
    # instead of a scan over stacked ones. No per-layer weight copies and no stacked activations,
    # for a longer compile (it grows with depth).
    scan_layers: bool = True
    # Recompute the attention core (scores, softmax, AV) and the MLP's activation in the backward
    # pass instead of storing them: about 1/3 less activation memory for negligible FLOPs.
    recompute_activations: bool = True
    # The attention backend (`jaxpref.models.attention`): auto | xla | xla_chunked | flash.
    attention: str = "auto"
    # fp32 matmuls: "highest" (true fp32 on every backend), "tf32" (GPU tensor cores), None (XLA's
    # default: TF32 on recent GPUs). bf16 compute ignores it (bf16 products, fp32 accumulation).
    matmul_precision: str | None = "highest"
    mesh: Any = None                  # the device mesh: custom attention kernels run per shard in it

    def spec(self) -> DecoderSpec:
        """This architecture's choices for the shared decoder (`jaxpref.models.blocks`)."""
        raise NotImplementedError


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
    axis; compile time does not grow with depth), rematerialised when gradient checkpointing is on.
    With `args.scan_layers` off, a loop of `num_layers` blocks named "0", "1", ... instead (the
    same parameters, one tree per layer: `split_layers`)."""
    if args.gradient_checkpointing:
        block = nn.remat(block, prevent_cse=False, policy=remat_policy(args.remat_policy))
    axes = nn.broadcast if in_axes is None else in_axes
    if not args.scan_layers:
        per_layer = tuple(a is not nn.broadcast for a in in_axes) if in_axes is not None else ()
        return lambda a, name=None: _Layers(block, per_layer, a, name=name)
    return nn.scan(block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=axes, length=args.num_layers)


class _Layers(nn.Module):
    """`block` `num_layers` times, one after another (children "0", "1", ...); the inputs marked in
    `per_layer` are indexed by the layer, the others broadcast (as `nn.scan`'s in_axes)."""
    block: Any
    per_layer: tuple
    a: Any

    @nn.compact
    def __call__(self, x, *inputs):
        ys = []
        for i in range(self.a.num_layers):
            xs = [v[i] if j < len(self.per_layer) and self.per_layer[j] else v for j, v in enumerate(inputs)]
            x, y = self.block(self.a, name=str(i))(x, *xs)
            ys.append(y)
        # The blocks' outputs stacked on a leading layer axis, as `nn.scan` gives them.
        return x, jax.tree.map(lambda *y: jnp.stack(y), *ys)


def split_layers(tree: dict, num_layers: int, consume: bool = False) -> dict:
    """A tree whose "layers" leaves are stacked [L, ...] -> "layers" as {"0": layer 0's tree, ...}
    (what `scan_layers: False` reads). Trees already split are returned as they are. `consume`
    empties the given tree's "layers" leaf by leaf as they are split, so that the peak is one
    copy of the weights plus one stacked leaf (the caller must not use that tree again). Inside a
    differentiated function the gradients of the pieces are stacked back in one concatenation."""
    from flax import traverse_util

    if "layers" not in tree or "0" in tree["layers"]:
        return tree
    paths = list(traverse_util.flatten_dict(tree["layers"]))
    per = [{} for _ in range(num_layers)]
    for path in paths:
        parent = tree["layers"]
        for k in path[:-1]:
            parent = parent[k]
        leaf = parent.pop(path[-1]) if consume else parent[path[-1]]
        for i, piece in enumerate(_unstack(leaf)):
            per[i][path] = piece
        del leaf
    return {**tree, "layers": {str(i): traverse_util.unflatten_dict(per[i]) for i in range(num_layers)}}


@jax.custom_vjp
def _unstack(x: jax.Array) -> tuple:
    """x [L, ...] -> its L slices. (Autodiff of plain slicing would pad each slice's gradient to
    [L, ...] and add them up: L full-size buffers per leaf.)"""
    return tuple(x[i] for i in range(x.shape[0]))


def _unstack_fwd(x):
    return _unstack(x), None


def _unstack_bwd(_, cts):
    return (jnp.stack(cts),)


_unstack.defvjp(_unstack_fwd, _unstack_bwd)

"""The mixture-of-experts sublayer (Mixtral, Qwen3-MoE), in place of the MLP: a router picks
`top_k` of `num_experts` gated MLPs for each token, and each expert runs only on its tokens.

Routing is transformers': router logits in the compute dtype, a softmax over all experts in
fp32, the top k, and (Mixtral; Qwen3-MoE with `norm_topk_prob`) the k weights divided by their
sum. Ties matter in bf16, where two experts often get the same logit: torch.topk does not break
them by the lower index on CPUs (ATen's CPU kernel runs libstdc++'s `nth_element`, e.g. top-2 of
[.1, .3, .3, .3] is experts {2, 3}), so `ties="torch_cpu"` replays that selection for the tokens
whose k-th and (k+1)-th probabilities tie (`torch_cpu_topk`), and `ties="lowest"` keeps
`jax.lax.top_k`'s lower index first, which is what CUDA's radix-select topk takes (equal values
in index order; read from PyTorch's kernel, not run here). "auto": torch_cpu on a CPU, lowest on
an accelerator, i.e. as transformers on the same kind of device.

Dispatch: the N*k (token, expert) assignments are sorted by expert (stable), so that each
expert's rows are contiguous, and a grouped matmul runs every expert on its own rows only
(`grouped_matmul`). Weights are held as transformers 5 holds them: `experts/gate_up_proj/kernel`
[E, D, 2I] ([gate | up] per expert) and `experts/down_proj/kernel` [E, I, D], with a leading
layer axis under the layer scan; LoRA on them is per expert (a [E, in, r], b [E, r, out]; PEFT's
`target_parameters` tensors, `jaxpref.lora.experts`).

The load-balancing loss TRL adds (`router_aux_loss_coef * aux_loss`, transformers'
`load_balancing_loss_func`) needs each layer's routing statistics: with the `aux` collection
mutable, every MoE layer sows its token-weighted expert counts and probability sums
(`load_balancing_loss` reduces them).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpref.models.layers import ACTIVATIONS, PRECISIONS, Linear, matmul, upcast_on_cpu
from jaxpref.models.spec import ArchArgs

f32 = jnp.float32
DISPATCH = ("auto", "tiles", "ragged_dot")
TIES = ("auto", "torch_cpu", "lowest")


@dataclass(frozen=True)
class MoESpec:
    """A sparse MoE sublayer (`DecoderSpec.mlp`). Names are transformers 5's module names."""
    name: str                     # the sublayer ("mlp")
    num_experts: int
    top_k: int                    # experts per token
    width: int                    # each expert's intermediate size
    activation: str               # a key of `layers.ACTIVATIONS`
    renormalize: bool             # the k weights divided by their sum (Mixtral; Qwen3-MoE's norm_topk_prob)
    router: str = "gate"          # Linear D -> E
    experts: str = "experts"
    up: str = "gate_up_proj"      # [E, D, 2I]: [gate | up]
    down: str = "down_proj"       # [E, I, D]


class MoE(nn.Module):
    """Router, top-k, sorted dispatch, the experts, the weighted sum of their outputs."""
    args: ArchArgs
    spec: MoESpec

    @nn.compact
    def __call__(self, h: jax.Array, mask=None) -> jax.Array:
        """h [B, T, D] compute dtype; mask (`attention.MaskInfo`): which tokens count in the
        load-balancing statistics -> [B, T, D]."""
        a, s = self.args, self.spec
        b, t, d = h.shape
        logits = Linear(s.num_experts, name=s.router, dtype=a.dtype, param_dtype=a.param_dtype,
                        lora_scale=a.lora_scale, lora_dropout=a.lora_dropout, deterministic=a.deterministic,
                        precision=a.matmul_precision)(h)                          # [B, T, E]
        probs = jax.nn.softmax(logits.astype(f32), axis=-1)
        experts = top_k_experts(probs.reshape(-1, s.num_experts), s.top_k, _ties(a)).reshape(b, t, s.top_k)
        weights = jnp.take_along_axis(probs, experts, axis=-1)                   # [B, T, k] fp32
        if s.renormalize:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        if mask is not None and self.is_mutable_collection("aux"):
            self._sow_routing(probs, experts, trl_token_weights(mask))
        groups = _dispatch_groups(a, b)
        x = h.reshape(groups, -1, d)                                              # [G, n, D]
        plan = Plan.of(experts.reshape(groups, -1, s.top_k), s.num_experts, _dispatch(a))
        xs = jnp.take_along_axis(x, plan.token[..., None], axis=1)               # [G, M, D] sorted by expert
        ys = Experts(a, s, name=s.experts)(xs, plan)                             # [G, M, D]
        y = jnp.take_along_axis(ys, plan.inverse[..., None], axis=1)             # [G, n*k, D] token-major
        y = y.reshape(b, t, s.top_k, d).astype(f32)
        return jnp.einsum("btkd,btk->btd", y, weights, precision="highest").astype(a.dtype)

    def _sow_routing(self, probs, experts, w):
        """Per-layer sums for `load_balancing_loss`: probs [B, T, E], experts [B, T, k], w [B, T]."""
        e = self.spec.num_experts
        chosen = jnp.sum(jax.nn.one_hot(experts, e, dtype=f32), axis=-2)          # [B, T, E]
        self.sow("aux", "router_counts", jax.lax.stop_gradient(jnp.einsum("bte,bt->e", chosen, w)))
        self.sow("aux", "router_probs", jnp.einsum("bte,bt->e", probs, w, precision="highest"))
        self.sow("aux", "router_tokens", jnp.sum(w))


def trl_token_weights(mask) -> jax.Array:
    """[B, T] float32: how many of TRL's rows hold each token (0 for padding; a shared prompt's
    tokens twice, once with each completion): the `attention_mask` transformers weighs the
    load-balancing statistics by, in TRL's layout."""
    real = (mask.segment_ids > 0).astype(f32)
    if mask.shared_prompt:
        return real * (1.0 + (mask.branch == 0).astype(f32))
    return real


def load_balancing_loss(aux: dict, num_experts: int) -> jax.Array:
    """transformers' `load_balancing_loss_func` from the sums the MoE layers sowed (any tree: the
    layer scan stacks them, the layer loop nests them): E * sum_e f_e P_e, where f_e is the share
    of (weighted) token-choices that went to expert e, summed over the k choices, and P_e the mean
    router probability of e, both over every MoE layer's tokens. A float32 scalar."""
    from flax import traverse_util

    sums = {"router_counts": 0.0, "router_probs": 0.0, "router_tokens": 0.0}
    for path, leaf in traverse_util.flatten_dict(aux).items():
        name = next(p for p in reversed(path) if p in sums)
        total = jnp.sum(jnp.asarray(leaf, f32).reshape(-1, num_experts if name != "router_tokens" else 1), axis=0)
        sums[name] = sums[name] + total
    tokens = jnp.maximum(sums["router_tokens"][0], 1e-9)
    return num_experts * jnp.sum((sums["router_counts"] / tokens) * (sums["router_probs"] / tokens))


class Experts(nn.Module):
    """The E gated MLPs, each on its own rows (sorted by expert, `Plan`)."""
    args: ArchArgs
    spec: MoESpec

    @nn.compact
    def __call__(self, xs: jax.Array, plan: "Plan") -> jax.Array:
        """xs [G, M, D] compute dtype, rows grouped by expert -> [G, M, D]."""
        a, s = self.args, self.spec
        gate, up = jnp.split(GroupedLinear(a, 2 * s.width, s.num_experts, name=s.up)(xs, plan), 2, axis=-1)
        core = _gated(s.activation)
        core = jax.checkpoint(core) if a.recompute_activations else core
        return GroupedLinear(a, a.hidden_size, s.num_experts, name=s.down)(core(gate, up), plan)


@functools.lru_cache(maxsize=None)
def _gated(activation: str):
    act = ACTIVATIONS[activation]
    return lambda g, u: act(g) * u


class GroupedLinear(nn.Module):
    """Row m of expert e's group: y = x W[e] (+ scale * x A[e] B[e]). W [E, in, out] (frozen, as
    every base weight); LoRA A [E, in, r] and B [E, r, out], one pair per expert. No LoRA dropout
    (PEFT's ParamWrapper, which holds these adapters, refuses it)."""
    args: ArchArgs
    features: int
    num_experts: int

    @nn.compact
    def __call__(self, x: jax.Array, plan: "Plan") -> jax.Array:
        a = self.args
        kernel = self.param("kernel", nn.initializers.normal(0.02), (self.num_experts, x.shape[-1], self.features),
                            a.param_dtype)
        y = grouped_matmul(x, kernel, plan, a.dtype, a.matmul_precision)
        if self.has_variable("lora", "a"):
            low = grouped_matmul(x, self.get_variable("lora", "a"), plan, a.dtype, a.matmul_precision)
            y = y + a.lora_scale * grouped_matmul(low, self.get_variable("lora", "b"), plan, a.dtype,
                                                  a.matmul_precision)
        return y


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["token", "inverse", "sizes", "src", "tile_expert", "slot"], meta_fields=["kind"])
@dataclass(frozen=True)
class Plan:
    """Where the assignments go, per dispatch group (leading axis G). A group's n tokens make
    n*k token-major (token, choice) assignments; sorted by expert they are its M = n*k rows.
    token [G, M]: the token of sorted row m; inverse [G, n*k]: the sorted row of each assignment;
    sizes [G, E]: rows per expert. "tiles" adds src [G, U, Tt] (the sorted row in each slot of U
    tiles of Tt rows; M marks an empty slot), tile_expert [G, U] and slot [G, M] (where each
    sorted row sits in the tiles, flattened)."""
    token: jax.Array
    inverse: jax.Array
    sizes: jax.Array
    src: jax.Array | None = None
    tile_expert: jax.Array | None = None
    slot: jax.Array | None = None
    kind: str = "tiles"

    @staticmethod
    def of(experts: jax.Array, num_experts: int, kind: str) -> "Plan":
        """experts [G, n, k] int32 (each token's k choices) -> the plan of `kind`."""
        g, n, k = experts.shape
        flat = experts.reshape(g, n * k)
        order = jnp.argsort(flat, axis=-1, stable=True).astype(jnp.int32)    # sorted row -> assignment
        rows = jnp.broadcast_to(jnp.arange(n * k, dtype=jnp.int32), (g, n * k))
        inverse = jnp.zeros((g, n * k), jnp.int32).at[jnp.arange(g)[:, None], order].set(rows)
        sizes = jax.vmap(lambda e: jnp.bincount(e, length=num_experts))(flat).astype(jnp.int32)
        plan = Plan(order // k, inverse, sizes, kind=kind)
        return plan if kind == "ragged_dot" else _with_tiles(plan, num_experts)


def tile_rows(rows: int, num_experts: int) -> int:
    """Rows per tile: about rows / E, a multiple of 8. Each expert's group is padded to whole
    tiles, so a tiled grouped matmul computes at most rows + E * tile = about 2x its rows (never
    every expert on every row), and gathers at most about 2E expert matrices."""
    return max(8, -(-max(1, -(-rows // num_experts)) // 8) * 8)


def _with_tiles(plan: Plan, num_experts: int) -> Plan:
    g, m = plan.token.shape
    tile = tile_rows(m, num_experts)
    u = -(-m // tile) + num_experts                    # enough tiles for any split of the rows
    take = functools.partial(jnp.take_along_axis, axis=-1)
    find = jax.vmap(lambda ends, x: jnp.searchsorted(ends, x, side="right"), in_axes=(0, None))
    tiles = -(-plan.sizes // tile)                      # [G, E] tiles of each expert
    tile_end = jnp.cumsum(tiles, axis=-1)
    tile_start = tile_end - tiles
    row_end = jnp.cumsum(plan.sizes, axis=-1)
    row_start = row_end - plan.sizes
    t = jnp.arange(u, dtype=jnp.int32)
    expert = jnp.minimum(find(tile_end, t), num_experts - 1).astype(jnp.int32)      # [G, U]
    local = (t - take(tile_start, expert))[..., None] * tile + jnp.arange(tile)     # [G, U, Tt]
    src = jnp.where(local < take(plan.sizes, expert)[..., None], take(row_start, expert)[..., None] + local, m)
    r = jnp.arange(m, dtype=jnp.int32)
    group = find(row_end, r)                                                         # [G, M]
    within = r - take(row_start, group)
    slot = (take(tile_start, group) + within // tile) * tile + within % tile
    return Plan(plan.token, plan.inverse, plan.sizes, src.astype(jnp.int32), expert, slot.astype(jnp.int32),
                kind="tiles")


def grouped_matmul(x: jax.Array, w: jax.Array, plan: Plan, dtype, precision: str | None = "highest") -> jax.Array:
    """x [G, M, in] rows sorted by expert (`plan`), w [E, in, out] -> [G, M, out] in `dtype`:
    each row times its own expert's matrix, fp32 accumulation (`layers.matmul`'s rules).

    "ragged_dot": `jax.lax.ragged_dot` over the group sizes, a grouped GEMM where XLA has one (TPU).
    XLA's CPU lowering and its GPU `RaggedDotRewriter` (unless the experimental cuDNN fusion is
    on) expand it into every expert times every row instead, E times the work; so elsewhere
    "tiles": the rows padded per expert to whole tiles, each tile multiplied by its expert's
    gathered matrix in one batched matmul (`tile_rows` bounds the padding)."""
    if plan.kind == "ragged_dot":
        prec = PRECISIONS[precision] if jnp.dtype(dtype) == f32 else None
        cdt = f32 if upcast_on_cpu(dtype) else dtype
        wc = w.astype(dtype).astype(cdt)
        xc = x.astype(dtype).astype(cdt)
        # One call per dispatch group (ragged_dot has no batching rule for an unbatched rhs).
        return jnp.stack([jax.lax.ragged_dot(xc[i], wc, plan.sizes[i], precision=prec, preferred_element_type=f32)
                          for i in range(x.shape[0])]).astype(dtype)
    g, m, _ = x.shape
    u, tile = plan.src.shape[1:]
    padded = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)                 # row M: empty slot
    xt = jnp.take_along_axis(padded, plan.src.reshape(g, u * tile, 1), axis=1).reshape(g, u, tile, -1)
    wt = jnp.take(w, plan.tile_expert, axis=0)                                       # [G, U, in, out]
    yt = matmul("guti,guio->guto", xt, wt, dtype, precision=precision).reshape(g, u * tile, -1)
    return jnp.take_along_axis(yt, plan.slot[..., None], axis=1)


def _dispatch(a: ArchArgs) -> str:
    kind = getattr(a, "moe_dispatch", "auto")
    if kind == "auto":
        return "ragged_dot" if jax.default_backend() == "tpu" else "tiles"
    return kind


def _dispatch_groups(a: ArchArgs, rows: int) -> int:
    """Dispatch groups: one per data-parallel shard of the rows on a mesh (each sorts and runs
    its own tokens), else one."""
    mesh = getattr(a, "mesh", None)
    if mesh is None:
        return 1
    n = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    return n if n > 1 and rows % n == 0 else 1


def _ties(a: ArchArgs) -> str:
    kind = getattr(a, "moe_ties", "auto")
    if kind == "auto":
        return "torch_cpu" if jax.default_backend() == "cpu" else "lowest"
    return kind


def top_k_experts(probs: jax.Array, k: int, ties: str = "lowest") -> jax.Array:
    """probs [N, E] float32 -> the k chosen experts [N, k] int32, largest first. `ties`: "lowest"
    (the lower index first, `jax.lax.top_k`) or "torch_cpu" (as torch.topk on a CPU: only the
    tokens whose k-th and (k+1)-th probabilities tie are replayed, `torch_cpu_topk`, and only when
    some token has such a tie)."""
    probs = jax.lax.stop_gradient(probs)
    e = probs.shape[-1]
    if ties == "lowest" or k >= e or not uses_nth_element(k, e):
        return jax.lax.top_k(probs, k)[1]
    vals, idx = jax.lax.top_k(probs, k + 1)
    tie = vals[:, k - 1] == vals[:, k]
    return jax.lax.cond(jnp.any(tie), lambda: jnp.where(tie[:, None], torch_cpu_topk(probs, k), idx[:, :k]),
                        lambda: idx[:, :k])


def uses_nth_element(k: int, num_experts: int) -> bool:
    """ATen's CPU topk takes `std::nth_element` unless k * 64 <= E (then `std::partial_sort`,
    not replayed here: "torch_cpu" falls back to the lower index first there)."""
    return k * 64 > num_experts


# The steps of libstdc++'s introselect (`std::nth_element` with ATen's comparator x > y), one
# pointer move per step so that a batch of rows runs it as one while loop.
_OUTER, _SCAN_LO, _SCAN_HI, _DONE = 0, 1, 2, 3


def torch_cpu_topk(probs: jax.Array, k: int) -> jax.Array:
    """probs [N, E] -> the k experts torch.topk picks on a CPU [N, k] int32 (as a set; their
    order differs and only changes the summation order). ATen's CPU kernel pairs each value with
    its index and runs `std::nth_element(begin, begin + k - 1, end, greater)`: libstdc++'s
    introselect (median-of-3 pivot moved to the front, Hoare partition, insertion sort once at
    most 3 elements remain). Which of several equal values end up in the first k depends on
    those moves, so they are replayed here. Not replayed: introselect's fallback to heap select
    after 2 * log2(E) partitions of the same range (none of the ranges here get that far unless
    the values are adversarial)."""
    perm = jax.vmap(functools.partial(_nth_element, nth=k - 1))(probs)
    return perm[:, :k]


def _nth_element(v: jax.Array, nth: int) -> jax.Array:
    """One row: values v [E] -> the index permutation nth_element leaves."""
    e = v.shape[0]
    at = lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False)

    def swap(x, i, j):
        xi, xj = at(x, i), at(x, j)
        return x.at[i].set(xj).at[j].set(xi)

    def outer(s):
        v, p, first, last, depth, lo, hi, _ = s
        a_, b_, c_ = first + 1, first + (last - first) // 2, last - 1
        va, vb, vc = at(v, a_), at(v, b_), at(v, c_)
        med = jnp.where(va > vb, jnp.where(vb > vc, b_, jnp.where(va > vc, c_, a_)),
                        jnp.where(va > vc, a_, jnp.where(vb > vc, c_, b_)))
        partition = (last - first > 3) & (depth > 0)
        v2, p2 = swap(v, first, med), swap(p, first, med)
        v, p = jnp.where(partition, v2, v), jnp.where(partition, p2, p)
        v, p = jax.lax.cond(partition, lambda: (v, p), lambda: _insertion_sort(v, p, first, last))
        return (v, p, first, last, depth - partition, first + 1, last,
                jnp.where(partition, _SCAN_LO, _DONE))

    def scan_lo(s):
        v, p, first, last, depth, lo, hi, _ = s
        more = at(v, lo) > at(v, first)
        return (v, p, first, last, depth, lo + more, hi - (~more), jnp.where(more, _SCAN_LO, _SCAN_HI))

    def scan_hi(s):
        v, p, first, last, depth, lo, hi, _ = s
        more = at(v, first) > at(v, hi)
        cross = ~more & (lo >= hi)
        exchange = ~more & (lo < hi)
        v2, p2 = swap(v, lo, hi), swap(p, lo, hi)
        v, p = jnp.where(exchange, v2, v), jnp.where(exchange, p2, p)
        first = jnp.where(cross & (lo <= nth), lo, first)
        last = jnp.where(cross & (lo > nth), lo, last)
        return (v, p, first, last, depth, lo + exchange, hi - more,
                jnp.where(more, _SCAN_HI, jnp.where(exchange, _SCAN_LO, _OUTER)))

    def body(s):
        return jax.lax.switch(s[-1], (outer, scan_lo, scan_hi, lambda s: s), s)

    depth = 2 * int(math.floor(math.log2(e)))
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    init = (v, jnp.arange(e, dtype=jnp.int32), i32(0), i32(e), i32(depth), i32(0), i32(0), i32(_OUTER))
    return jax.lax.while_loop(lambda s: s[-1] != _DONE, body, init)[1]


def _insertion_sort(v, p, first, last):
    """libstdc++'s insertion sort of the (at most 3) positions [first, last) under x > y: a
    stable sort by descending value."""
    pos = first + jnp.arange(3)
    inside = pos < last
    pos = jnp.minimum(pos, v.shape[0] - 1)
    key = jnp.where(inside, -v[pos], jnp.inf)
    order = jnp.argsort(key, stable=True)
    dest = jnp.where(inside, pos, v.shape[0])        # out of range: dropped
    return (v.at[dest].set(v[pos][order], mode="drop"), p.at[dest].set(p[pos][order], mode="drop"))

"""The compiled train step: policy (and reference) log-probs -> loss -> LoRA gradients -> optax.

Gradient accumulation runs inside the compiled step (`lax.scan` over micro-batches), so one host
call does one optimizer update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxpref import losses
from jaxpref.losses import LossSpec, PairStats
from jaxpref.head import head_logps
from jaxpref.models.layers import AttnBlocks


def attention_mask(segment_ids: jax.Array, branch: jax.Array) -> jax.Array:
    """[N, T] -> [N, T, T] bool: same segment, causal, and a branch sees shared tokens and itself.
    Padding queries see only themselves (keeps softmax finite; their outputs are never used)."""
    t = segment_ids.shape[-1]
    q_seg, k_seg = segment_ids[:, :, None], segment_ids[:, None, :]
    q_br, k_br = branch[:, :, None], branch[:, None, :]
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    allowed = (q_seg == k_seg) & (k_seg > 0) & causal & ((k_br == 0) | (k_br == q_br))
    return allowed | jnp.eye(t, dtype=bool)[None]


def stream_blocks(mb: dict) -> AttnBlocks:
    """A padding-free micro-batch's attention blocks: each original row's tokens gathered from its
    stream (`blk_idx`, -1 = empty slot) with that row's own mask."""
    r, per, tb = mb["blk_idx"].shape
    idx = mb["blk_idx"].reshape(r, per * tb)
    ok = idx >= 0
    take = lambda x: jnp.where(ok, jnp.take_along_axis(x, jnp.maximum(idx, 0), axis=1), 0)
    seg, br = take(mb["segment_ids"]).reshape(-1, tb), take(mb["branch"]).reshape(-1, tb)
    return AttnBlocks(idx, mb["blk_back"], attention_mask(seg, br))


@dataclass(frozen=True)
class StepOptions:
    spec: LossSpec
    num_seqs: int                 # sequence slots per micro-batch (2 x pairs)
    need_wpo: bool = False
    orpo_span: str = "prompt_and_completion"
    ref_mode: str = "lora_off"    # lora_off | initial_adapter | separate | precomputed | none


def token_logps(bundle, params, lora, mb: dict, rngs=None, need_wpo: bool = False):
    """Log-probs of the target tokens (`tgt_*`, [N, K]) given their predicting hidden states.

    The LM head runs on the K gathered positions only (`jaxpref.head`). Returns (logp, mean_logit, wpo_aligned),
    each [N, K] float32."""
    mask = stream_blocks(mb) if "blk_idx" in mb else attention_mask(mb["segment_ids"], mb["branch"])
    hidden = bundle.hidden(params, lora, mb["input_ids"], mb["positions"], mask, rngs=rngs)
    h = jnp.take_along_axis(hidden, mb["tgt_src"][..., None], axis=1)
    return head_logps(h, bundle.head(params), mb["tgt_ids"], bundle.args.vocab_chunk, need_wpo)


def _seg_sum(x: jax.Array, seq: jax.Array, s: int) -> jax.Array:
    return jax.ops.segment_sum(x.reshape(-1), seq.reshape(-1), num_segments=s + 1)[:s]


def pair_stats(logp, mean_logit, wpo, mb: dict, num_seqs: int) -> PairStats:
    s = num_seqs
    b = s // 2
    seq, w = mb["tgt_seq"], mb["tgt_weight"]
    is_comp = (seq < s).astype(jnp.float32)
    sums = _seg_sum(logp * w, seq, s)
    lens = _seg_sum(is_comp, seq, s)
    logit_sums = _seg_sum(mean_logit * is_comp, seq, s)
    if wpo is not None:
        wl = _seg_sum(wpo * is_comp, seq, s) / jnp.maximum(lens, 1.0)
    else:
        wl = jnp.zeros((s,), jnp.float32)
    # ORPO's span: all tokens of the chosen sequence after its first (prompt and completion),
    # marked with their pair's slot + 1 (any layout, packed rows included).
    full = mb["tgt_full"]
    owner = jnp.where(full > 0, full.astype(jnp.int32) - 1, b)
    in_span = (full > 0).astype(jnp.float32)
    chosen_full_nll = -_seg_sum(logp * in_span, owner, b)
    chosen_full_len = _seg_sum(in_span, owner, b)
    return PairStats(
        logps_chosen=sums[:b], logps_rejected=sums[b:],
        len_chosen=lens[:b], len_rejected=lens[b:],
        nll_full_chosen=chosen_full_nll, len_full_chosen=chosen_full_len,
        wlog_chosen=wl[:b], wlog_rejected=wl[b:],
        logit_sum_chosen=logit_sums[:b], logit_sum_rejected=logit_sums[b:],
    )


def sequence_logps(bundle, params, lora, mb: dict, num_seqs: int) -> jax.Array:
    """Summed completion log-probs [S] (chosen slots then rejected): reference / evaluation pass."""
    logp, _, _ = token_logps(bundle, params, lora, mb)
    return _seg_sum(logp * mb["tgt_weight"], mb["tgt_seq"], num_seqs)


def micro_loss(lora, params, mb: dict, ref_logps: jax.Array | None, bundle, ref_bundle, ref_params,
               opts: StepOptions, rngs=None):
    """Loss and metric vectors for one micro-batch."""
    spec = opts.spec
    logp, mean_logit, wpo = token_logps(bundle, params, lora, mb, rngs=rngs, need_wpo=opts.need_wpo)
    st = pair_stats(logp, mean_logit, wpo, mb, opts.num_seqs)
    b = opts.num_seqs // 2
    if spec.method == "orpo":
        loss, m = losses.orpo_loss(st, spec, opts.orpo_span)
    elif spec.method in ("simpo", "cpo"):
        loss, m = losses.simpo_cpo_loss(st, spec)
    else:
        if opts.ref_mode == "precomputed":
            ref = ref_logps
        elif opts.ref_mode == "none":
            ref = jnp.zeros((opts.num_seqs,), jnp.float32)
        elif opts.ref_mode == "separate":
            ref = sequence_logps(ref_bundle, ref_params, None, mb, opts.num_seqs)
        elif opts.ref_mode == "initial_adapter":
            # Continuing from an adapter: the reference is its frozen initial copy (as TRL does).
            ref = sequence_logps(ref_bundle, params, ref_params, mb, opts.num_seqs)
        else:
            ref = sequence_logps(bundle, params, None, mb, opts.num_seqs)
        ref = jax.lax.stop_gradient(ref)
        if spec.method == "kto":
            from jaxpref.kto import micro_loss_kto
            return micro_loss_kto(st, ref, mb, spec, opts.num_seqs)
        sft = None
        if "sft" in spec.loss_types:
            # Unweighted token-mean NLL (LD-DPO weights apply to the preference term only).
            is_c = (mb["tgt_seq"] < b).astype(jnp.float32)
            sft = -jnp.sum(logp * is_c) / jnp.maximum(jnp.sum(is_c), 1.0)
        loss, m = losses.dpo_loss(st, ref[:b], ref[b:], spec, sft)
    m = dict(m)
    m["logits/chosen"] = st.logit_sum_chosen
    m["logits/rejected"] = st.logit_sum_rejected
    m["_tokens/chosen"] = st.len_chosen
    m["_tokens/rejected"] = st.len_rejected
    return loss, m


@jax.tree_util.register_dataclass
@dataclass
class TrainState:
    lora: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def reduce_metrics(m: dict) -> dict:
    """Per-pair metric vectors (stacked over micro-batches) -> scalars with TRL's semantics."""
    out = {}
    tc = jnp.sum(m.pop("_tokens/chosen"))
    tr = jnp.sum(m.pop("_tokens/rejected"))
    for k, v in m.items():
        if k == "logits/chosen":
            out[k] = jnp.sum(v) / jnp.maximum(tc, 1.0)
        elif k == "logits/rejected":
            out[k] = jnp.sum(v) / jnp.maximum(tr, 1.0)
        else:
            out[k] = jnp.mean(v)
    return out


def make_train_step(bundle, opts: StepOptions, optimizer: optax.GradientTransformation,
                    schedule: Callable, ref_bundle=None, dropout: bool = False,
                    full_finetune: bool = False):
    """-> step(state, params, ref_params, batch, ref_logps) -> (state, metrics), jit-compiled.

    batch: dict of [G, N, T] arrays (G micro-batches); ref_logps: [G, S] or None."""

    def loss_and_grad(lora, params, ref_params, mb, ref, rng):
        rngs = {"dropout": rng} if dropout else None
        if full_finetune:
            # The trainable tree (state.lora) is the whole base tree; no adapter.
            def f(p):
                return micro_loss(None, p, mb, ref, bundle, ref_bundle, ref_params, opts, rngs)
            (loss, m), g = jax.value_and_grad(f, has_aux=True)(lora)
            return loss, m, g
        (loss, m), g = jax.value_and_grad(micro_loss, has_aux=True)(
            lora, params, mb, ref, bundle, ref_bundle, ref_params, opts, rngs)
        return loss, m, g

    def step(state: TrainState, params, ref_params, batch, ref_logps):
        G = batch["input_ids"].shape[0]
        rng = jax.random.fold_in(state.rng, state.step)

        def body(carry, xs):
            gsum, lsum = carry
            mb, ref, i = xs
            loss, m, g = loss_and_grad(state.lora, params, ref_params, mb, ref, jax.random.fold_in(rng, i))
            gsum = jax.tree_util.tree_map(jnp.add, gsum, g)
            return (gsum, lsum + loss), m

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.lora)
        refs = ref_logps if ref_logps is not None else jnp.zeros((G, opts.num_seqs), jnp.float32)
        (gsum, lsum), ms = jax.lax.scan(body, (zeros, 0.0), (batch, refs, jnp.arange(G)))
        grads = jax.tree_util.tree_map(lambda g: g / G, gsum)
        metrics = reduce_metrics({k: v.reshape(-1) if v.ndim > 1 else v for k, v in ms.items()})
        metrics["loss"] = lsum / G
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["learning_rate"] = schedule(state.step)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
        lora = optax.apply_updates(state.lora, updates)
        return TrainState(lora, opt_state, state.step + 1, state.rng), metrics

    return jax.jit(step, donate_argnums=(0,))


def compile_ahead(step_fn, *args) -> None:
    """Compile `step_fn` (jitted) for these arguments before running it, then release the
    compiler's freed memory (`host_memory.release_free_memory`), so that a new batch shape's first
    step does not hold the compiler's leftovers and the step's temporaries at once. The call that
    follows finds the compiled executable in JAX's cache."""
    from jaxpref.host_memory import release_free_memory
    step_fn.lower(*args).compile()
    release_free_memory()


def make_eval_step(bundle, opts: StepOptions, ref_bundle=None):
    """-> eval(lora, params, ref_params, batch, ref_logps) -> metrics (no update)."""

    def ev(lora, params, ref_params, batch, ref_logps):
        G = batch["input_ids"].shape[0]
        refs = ref_logps if ref_logps is not None else jnp.zeros((G, opts.num_seqs), jnp.float32)

        def body(_, xs):
            mb, ref = xs
            loss, m = micro_loss(lora, params, mb, ref, bundle, ref_bundle, ref_params, opts)
            m["loss"] = jnp.broadcast_to(loss, (1,))
            return None, m

        _, ms = jax.lax.scan(body, None, (batch, refs))
        loss = jnp.mean(ms.pop("loss"))
        out = reduce_metrics({k: v.reshape(-1) for k, v in ms.items()})
        out["loss"] = loss
        return out

    return jax.jit(ev)


def make_optimizer(tcfg, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """optax optimizer and schedule from the `training` section (HF semantics for the schedule)."""
    lr = tcfg.learning_rate
    warm = tcfg.warmup_steps or int(round(tcfg.warmup_ratio * total_steps))
    warm = min(warm, max(total_steps, 1))
    decay_steps = max(total_steps - warm, 1)
    kind = tcfg.lr_scheduler_type
    if kind in ("constant", "constant_with_warmup"):
        after = optax.constant_schedule(lr)
    elif kind == "linear":
        after = optax.linear_schedule(lr, 0.0, decay_steps)
    else:
        after = optax.cosine_decay_schedule(lr, decay_steps)
    if warm > 0 and kind != "constant":
        schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])
    else:
        schedule = after
    if tcfg.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=tcfg.adam_beta1, b2=tcfg.adam_beta2, eps=tcfg.adam_epsilon,
                          weight_decay=tcfg.weight_decay)
    elif tcfg.optimizer == "sgd":
        opt = optax.chain(optax.add_decayed_weights(tcfg.weight_decay), optax.sgd(schedule))
    else:
        opt = optax.adafactor(schedule, weight_decay_rate=tcfg.weight_decay or None)
    parts = [optax.clip_by_global_norm(tcfg.max_grad_norm)] if tcfg.max_grad_norm > 0 else []
    return optax.chain(*parts, opt), schedule
